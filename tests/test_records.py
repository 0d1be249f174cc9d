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
