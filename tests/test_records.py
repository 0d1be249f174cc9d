"""One record type from a model server's result to the SQL row: its fields are the columns."""

from __future__ import annotations

from dataclasses import fields

from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.tables import Output, Request, utcnow
from workers.jobs import ImageJob, ImageResult, OutputStatus


def test_output_record_fields_are_the_output_columns():
    assert {f.name for f in fields(OutputRecord)} == set(Output.__table__.columns.keys())


def test_request_record_fields_are_the_request_columns_naming_the_rollout():
    columns = set(Request.__table__.columns.keys())
    record = {f.name for f in fields(RequestRecord)}
    # The router knows rollouts by name; the recorder swaps the name for the row id. How far
    # the judge has folded a request is the judge's to write (its default follows `mirrored`).
    assert record - {"rollout"} == columns - {"rollout_id", "judge_progress"}


def test_a_result_becomes_a_record_with_nothing_dropped():
    job = ImageJob("r1", 2, "a fox", 7, 64, 64)
    result = ImageResult(
        OutputStatus.OOM,
        error="CUDA out of memory",
        latency_ms=12.5,
        queue_ms=3.0,
        batch_size=4,
        peak_gpu_bytes=123,
        oom_count=2,
        batch_ooms=1,
    )
    record = OutputRecord.of(
        "o1",
        job,
        result,
        role="fallback",
        model="sd-fast",
        is_primary=True,
        timeout_s=3.0,
        created_at=utcnow(),
        fallback_of="o0",
    )
    assert (record.request_id, record.image_index, record.status, record.error) == (
        "r1",
        2,
        "oom",
        "CUDA out of memory",
    )
    assert (record.latency_ms, record.queue_ms, record.batch_size, record.peak_gpu_bytes) == (
        12.5,
        3.0,
        4,
        123,
    )
    assert (record.oom_count, record.batch_ooms, record.model, record.fallback_of) == (
        2,
        1,
        "sd-fast",
        "o0",
    )
    # Every field of the result reaches the record (png goes to the artifact store).
    assert {f.name for f in fields(ImageResult)} - {"png"} <= {f.name for f in fields(record)}


def test_a_batch_reads_back_as_written_and_a_duplicate_is_an_integrity_error(db_url):
    """The recorder's batch insert (COPY on PostgreSQL): awkward text, JSON, NULLs and
    aware datetimes come back equal; a clash fails the whole batch as SQLAlchemy's error."""
    import pytest
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from controller.storage.bulk_insert import insert_rows
    from controller.storage.store import Store
    from controller.storage.tables import judge_progress_of

    store = Store(db_url)
    store.upgrade()
    now = utcnow()
    request = {f.name: None for f in fields(RequestRecord) if f.name != "rollout"} | {
        "id": "r-1",
        "route": "generate",
        "stage": "shadow",
        "primary_role": "incumbent",
        "sticky_key": "user\t1",
        "prompt": 'a sign that says "OPEN"\nback\\slash, ünïcode, 漢字',
        "params": {"size": "64x64", "n": 2, "nested": {"guidance": 7.5, "tags": [None, True]}},
        "seed": 2**40,
        "mirrored": True,
        "created_at": now,
    }
    request["judge_progress"] = judge_progress_of(request)
    outputs = [
        {f.name: None for f in fields(OutputRecord)}
        | {
            "id": f"o-{k}",
            "request_id": "r-1",
            "role": role,
            "image_index": 0,
            "is_primary": role == "incumbent",
            "status": "ok" if k else "error",
            "error": None if k else "CUDA out of memory\r\n\\N",
            "latency_ms": 12.5 * k,
            "oom_count": 0,
            "batch_ooms": 0,
            "created_at": now,
        }
        for k, role in enumerate(("incumbent", "candidate"))
    ]
    with store.session() as session:
        insert_rows(session, Request.__table__, [request])
        insert_rows(session, Output.__table__, outputs)
    with store.reader() as session:
        stored = session.get(Request, "r-1")
        assert {k: getattr(stored, k) for k in request} == request
        rows = session.scalars(select(Output).order_by(Output.id)).all()
        assert [{k: getattr(row, k) for k in outputs[0]} for row in rows] == outputs

    clash = [outputs[1] | {"id": "o-9"}]  # same request, role and image as o-1
    with pytest.raises(IntegrityError):
        with store.session() as session:
            insert_rows(session, Output.__table__, [outputs[0] | {"id": "o-8", "role": "x"}])
            insert_rows(session, Output.__table__, clash)
    with store.reader() as session:  # the failed transaction left nothing behind
        assert session.scalars(select(Output.id).order_by(Output.id)).all() == ["o-0", "o-1"]
    store.close()
