"""Recorder throughput on production-shaped records, beside the plain insert a user would
write instead, on SQLite and PostgreSQL, in bulk and at a paced arrival rate.

    python -m bench.recorder_throughput [--pairs 4000] [--rate 1500] [--seconds 4]

A pair is what one mirrored request leaves: its request row and two output rows, each
output with its own 64x64 PNG (what the tiny models render, ~12 KB, every one distinct
so content addressing stores each). Records are 3 per pair.

- bulk: every record handed over as fast as the caller can; time until the last row is
  committed (`flush`). Beside it, the plain way: per record, write the image file, then
  INSERT and COMMIT (one transaction each), on the same backend.
- paced: records arrive at `--rate` records/s for `--seconds`, as the router hands them
  over under live traffic; printed: rows per transaction, how far behind the writer is
  at the end (flush time after the last record), and spills (must be 0).
Each runs with the images on the current directory's filesystem (where
`.cutover/artifacts` lives by default) and on a tmpfs, beside the rate that filesystem
stores files at all: one file per image is bounded by the filesystem, not by SQL.
Target: >= 5,000 records/s with artifacts on both backends.

With `--s3`, one more row: PostgreSQL with the images in an S3-compatible store (moto's S3
server, started locally; `--s3-endpoint URL` for a real one), written through from the
artifact directory: records/s until every row is committed and every image uploaded,
beside the same run with the local disk alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from PIL import Image
from sqlalchemy import insert

from bench.databases import DEFAULT_POSTGRES, backends, bench_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.recorder import Recorder
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.store import Store
from controller.storage.tables import Output, Request, utcnow


def pngs(count: int, seed: int = 0) -> list[bytes]:
    """Distinct 64x64 PNGs shaped like a tiny model's output (smooth colour, some noise)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3)
    out = []
    for _ in range(count):
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def pair(i: int) -> tuple[RequestRecord, list[OutputRecord]]:
    request_id = str(uuid.uuid4())
    now = utcnow()
    request = RequestRecord(
        request_id,
        "bench",
        "generate",
        "shadow",
        "incumbent",
        f"user-{i % 997}",
        f'a poster that says "SALE {i}", studio lighting, 35mm',
        {"size": "64x64", "n": 1, "steps": 4, "guidance": 7.5},
        i,
        True,
        now,
    )
    outputs = [
        OutputRecord(
            str(uuid.uuid4()),
            request_id,
            role,
            0,
            role == "incumbent",
            "ok",
            now,
            latency_ms=250.0 + i % 50,
            queue_ms=3.0,
            batch_size=2,
            timeout_s=60.0,
            model=f"sd-{role}",
        )
        for role in ("incumbent", "candidate")
    ]
    return request, outputs


def prepared(url: str) -> Store:
    return bench_rollout(url)[0]


def cutover_bulk(
    url: str, work: Path, images: list[bytes], object_store: Any = None
) -> dict[str, float]:
    from controller.storage.artifact_store import Artifacts

    store = prepared(url)
    artifacts = Artifacts(work / "artifacts-a", object_store)
    recorder = Recorder(
        url,
        work / "artifacts-a",
        work / "spill-a",
        artifacts=artifacts,
        artifact_writers=16 if object_store else 4,
    )
    pairs = len(images) // 2
    started = time.perf_counter()
    for i in range(pairs):
        request, outputs = pair(i)
        recorder.record(request)
        for k, output in enumerate(outputs):
            recorder.record(output, png=images[2 * i + k])
    assert recorder.flush(600)
    assert not artifacts.pending(), "every image is in the store"
    elapsed = time.perf_counter() - started
    counters = recorder.counters
    recorder.close()
    artifacts.close()
    store.close()
    assert counters.recorded == 3 * pairs and counters.spilled == 0, counters
    return {"rate": 3 * pairs / elapsed, "rows_per_txn": counters.recorded / counters.batches}


@contextlib.contextmanager
def s3_store(endpoint: str | None) -> Iterator[Any]:
    """A fresh bucket on `endpoint`, or on a moto S3 server started here."""
    import os
    import shutil
    import socket
    import subprocess

    import boto3

    from controller.config import ObjectStoreConfig
    from controller.storage.artifact_store import ObjectStore

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc = None
    if endpoint is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield ObjectStore(
            ObjectStoreConfig(bucket=bucket, endpoint_url=endpoint, region="us-east-1")
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def plain_bulk(url: str, work: Path, images: list[bytes]) -> dict[str, float]:
    """What a user writes without cutover: the file, then one INSERT and COMMIT a record."""
    store = prepared(url)
    rollout_id = 1
    pairs = len(images) // 2
    started = time.perf_counter()
    for i in range(pairs):
        request, outputs = pair(i)
        row = {k: v for k, v in request.__dict__.items() if k != "rollout"}
        with store.session() as session:
            session.execute(insert(Request), [row | {"rollout_id": rollout_id}])
        for k, output in enumerate(outputs):
            output.artifact_sha256 = store_artifact(work / "artifacts-b", images[2 * i + k])
            with store.session() as session:
                session.execute(insert(Output), [dict(output.__dict__)])
    elapsed = time.perf_counter() - started
    store.close()
    return {"rate": 3 * pairs / elapsed, "rows_per_txn": 1.0}


def cutover_paced(
    url: str, work: Path, images: list[bytes], rate: float, seconds: float
) -> dict[str, float]:
    store = prepared(url)
    recorder = Recorder(url, work / "artifacts-c", work / "spill-c")
    records = int(rate * seconds) // 3 * 3
    started = time.perf_counter()
    sent = 0
    for i in range(records // 3):
        request, outputs = pair(i)
        for k, record in enumerate([request, *outputs]):
            due = started + sent / rate
            while time.perf_counter() < due:
                time.sleep(max(min(due - time.perf_counter(), 0.001), 0.0))
            png = None if k == 0 else images[(2 * i + k - 1) % len(images)]
            recorder.record(record, png=png)
            sent += 1
    last = time.perf_counter()
    assert recorder.flush(600)
    behind = time.perf_counter() - last
    counters = recorder.counters
    recorder.close()
    store.close()
    return {
        "offered": rate,
        "achieved": sent / (last - started),
        "rows_per_txn": counters.recorded / max(counters.batches, 1),
        "behind_s": behind,
        "spilled": counters.spilled,
    }


def workdir(root: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(dir=root, prefix=".bench-recorder-")


def file_rate(root: str, images: list[bytes]) -> float:
    """Images/s the filesystem under `root` takes through `store_artifact`, one thread: the
    ceiling any recorder storing one file per image has there."""
    with workdir(root) as tmp:
        started = time.perf_counter()
        for image in images:
            store_artifact(Path(tmp), image)
        return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--plain-pairs", type=int, default=1000, help="the plain way is slow")
    parser.add_argument("--rate", type=float, default=1500.0, help="paced records/s")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--s3", action="store_true", help="also PostgreSQL with an object store")
    parser.add_argument("--s3-endpoint", default=None, help="default: a local moto S3 server")
    parser.add_argument("--s3-pairs", type=int, default=1000)
    parser.add_argument(
        "--artifact-roots",
        default=".,/dev/shm",
        help="where images go: the current directory (where .cutover/artifacts lives by "
        "default) and a tmpfs, to tell the filesystem's limit from the recorder's",
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    images = pngs(2 * args.pairs)
    print(f"{len(images)} PNGs of {sum(map(len, images)) / len(images) / 1024:.1f} KB on average")
    for root in args.artifact_roots.split(","):
        if not Path(root).is_dir():
            continue
        ceiling = file_rate(root, images[:1000])
        print(
            f"\nartifacts under {Path(root).resolve()}: the filesystem stores {ceiling:.0f} "
            f"images/s on one thread ({ceiling * 3 / 2:.0f} records/s of pairs at most)"
        )
        print(
            f"{'backend':<11} {'cutover rec/s':>14} {'rows/txn':>9} {'plain rec/s':>12} "
            f"{'ratio':>6}   paced: {'offered':>7} {'achieved':>8} {'rows/txn':>8} "
            f"{'behind s':>8} {'spilled':>7}  target >= 5000 rec/s"
        )
        for backend in ("sqlite", "postgresql"):
            with workdir(root) as tmp, backends(Path(tmp), args.postgres) as urls:
                ours = cutover_bulk(urls[backend], Path(tmp) / "a", images)
            with workdir(root) as tmp, backends(Path(tmp), args.postgres) as urls:
                plain = plain_bulk(urls[backend], Path(tmp) / "b", images[: 2 * args.plain_pairs])
            with workdir(root) as tmp, backends(Path(tmp), args.postgres) as urls:
                paced = cutover_paced(
                    urls[backend], Path(tmp) / "c", images, args.rate, args.seconds
                )
            verdict = "ok" if ours["rate"] >= 5000 else "BELOW TARGET"
            print(
                f"{backend:<11} {ours['rate']:>14.0f} {ours['rows_per_txn']:>9.1f} "
                f"{plain['rate']:>12.0f} {ours['rate'] / plain['rate']:>5.1f}x   "
                f"{'':>7} {paced['offered']:>7.0f} {paced['achieved']:>8.0f} "
                f"{paced['rows_per_txn']:>8.1f} {paced['behind_s']:>8.2f} "
                f"{paced['spilled']:>7.0f}  {verdict}"
            )

    if args.s3:
        object_store_row(args, images[: 2 * args.s3_pairs])


def put_rate(object_store: Any, images: list[bytes]) -> float:
    """PUTs per second the store takes from 16 threads, nothing else running."""
    from concurrent.futures import ThreadPoolExecutor

    def put(i: int) -> None:
        object_store.client.put_object(
            Bucket=object_store.settings.bucket, Key=f"ceiling/{i}.png", Body=images[i]
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(images))))
    return len(images) / (time.perf_counter() - started)


def object_store_row(args: argparse.Namespace, images: list[bytes]) -> None:
    with s3_store(args.s3_endpoint) as object_store:
        ceiling = put_rate(object_store, images[:300])
        rows = {}
        for label, target in (("local disk", None), ("object store", object_store)):
            with workdir(".") as tmp, backends(Path(tmp), args.postgres) as urls:
                rows[label] = cutover_bulk(urls["postgresql"], Path(tmp) / "a", images, target)
    where = args.s3_endpoint or "a local moto S3 server"
    print(
        f"\nthe store takes {ceiling:.0f} PUTs/s from 16 threads (its ceiling: {ceiling * 3 / 2:.0f} rec/s of pairs)"
    )
    print(f"\npostgresql, {len(images) // 2} pairs, images on the local disk or also in {where}:")
    for label, row in rows.items():
        print(f"{label:<13} {row['rate']:>8.0f} rec/s  {row['rows_per_txn']:>6.1f} rows/txn")
    print(
        f"object store / local disk: {rows['object store']['rate'] / rows['local disk']['rate']:.2f}x"
    )


if __name__ == "__main__":
    main()
