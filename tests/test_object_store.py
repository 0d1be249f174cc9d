"""Images in an S3-compatible store: written through, fetched back on a node that lacks
them, and held on local disk through an outage of the store, then uploaded: none lost.

The store is moto's S3 server (`moto_server`, a real HTTP server speaking S3), started by
the tests: MinIO's server has no pip or Debian package here. The outage is a TCP proxy
that stops forwarding (the store hangs, as behind a partition), not a mock.
"""

from __future__ import annotations

import os
import time
import uuid

from sqlalchemy import select

from bench.pairs import png
from controller.config import Config
from controller.storage.artifact_store import Artifacts, ObjectStore, ensure_local
from controller.storage.recorder import Recorder
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.store import Store
from controller.storage.tables import Output, utcnow
from tests.conftest import wait_until


def config_with(tmp_path, db_url, s3_settings) -> Config:
    config = Config.model_validate(
        {
            "name": "s3",
            "database_url": db_url,
            "artifact_dir": str(tmp_path / "artifacts"),
            "spill_dir": str(tmp_path / "spill"),
            "models": {"incumbent": {"pipeline": "a/b"}, "candidate": {"pipeline": "c/d"}},
            "object_store": s3_settings,
        }
    )
    config._base_dir = tmp_path
    return config


def keys_in(store: ObjectStore) -> set[str]:
    listed = store.client.list_objects_v2(Bucket=store.settings.bucket)
    return {item["Key"] for item in listed.get("Contents", [])}


def record_images(recorder: Recorder, images: list[bytes]) -> list[str]:
    ids = []
    for i, image in enumerate(images):
        request_id = str(uuid.uuid4())
        now = utcnow()
        recorder.record(
            RequestRecord(
                request_id, None, "generate", "none", "incumbent", "u", "p", {}, i, False, now
            )
        )
        output_id = str(uuid.uuid4())
        recorder.record(
            OutputRecord(output_id, request_id, "incumbent", 0, True, "ok", now), png=image
        )
        ids.append(output_id)
    return ids


def test_images_are_written_through_and_fetched_back_where_missing(tmp_path, sqlite_url, s3):
    settings, _ = s3
    config = config_with(tmp_path, sqlite_url, settings)
    Store(sqlite_url).upgrade()
    from controller.storage.artifact_store import artifacts_for

    artifacts = artifacts_for(config)
    images = [png((i, 2 * i, 3 * i)) for i in range(5)]
    recorder = Recorder(sqlite_url, config.artifact_path, config.spill_path, artifacts=artifacts)
    record_images(recorder, images)
    assert recorder.flush(30)
    recorder.close()
    with Store(sqlite_url).reader() as session:
        shas = session.scalars(select(Output.artifact_sha256)).all()
    assert len(shas) == 5 and all(shas)
    assert keys_in(artifacts.store) == {artifacts.store.key(sha) for sha in shas}
    assert artifacts.pending() == []
    # Another node: the file is not on its disk; a reader gets it from the store.
    lost = artifacts.path(shas[0])
    lost.unlink()
    found = ensure_local(lost)
    assert found == lost and found.read_bytes() in images


def test_an_outage_of_the_store_holds_images_locally_and_loses_none(tmp_path, sqlite_url, s3):
    settings, proxy = s3
    config = config_with(tmp_path, sqlite_url, settings)
    Store(sqlite_url).upgrade()
    artifacts = Artifacts(config.artifact_path, ObjectStore(config.object_store))
    recorder = Recorder(sqlite_url, config.artifact_path, config.spill_path, artifacts=artifacts)
    try:
        record_images(recorder, [png((1, 1, 1))])
        assert recorder.flush(30)
        proxy.stall()  # the store hangs: every call runs into its timeout
        started = time.monotonic()
        images = [png((10 + i, 20, 30)) for i in range(12)]
        record_images(recorder, images)
        assert recorder.flush(30)
        # The first upload ran into the 1 s timeout; the rest were held at once.
        assert time.monotonic() - started < 6
        assert len(artifacts.pending()) == 12
        with Store(sqlite_url).reader() as session:
            assert len(session.scalars(select(Output.artifact_sha256)).all()) == 13
        proxy.resume()
        assert wait_until(lambda: not artifacts.pending(), 30), artifacts.pending()
        with Store(sqlite_url).reader() as session:
            shas = set(session.scalars(select(Output.artifact_sha256)).all())
        assert keys_in(artifacts.store) == {artifacts.store.key(sha) for sha in shas}
    finally:
        recorder.close()
        artifacts.close()


def test_images_held_by_a_process_that_died_are_uploaded_by_the_next(tmp_path, s3):
    settings, proxy = s3
    config = config_with(tmp_path, "sqlite://", settings)
    proxy.stall()
    first = Artifacts(config.artifact_path, ObjectStore(config.object_store))
    sha = first.put(png((7, 7, 7)))
    first.close()  # gone before the store came back
    assert os.listdir(config.artifact_path / ".pending") == [sha]
    proxy.resume()
    second = Artifacts(config.artifact_path, ObjectStore(config.object_store))
    try:
        assert wait_until(lambda: not second.pending(), 30)
        assert second.store.key(sha) in keys_in(second.store)
    finally:
        second.close()
