"""Recorder throughput: records per second into SQLite and PostgreSQL, batched, measured side by side.

    python bench/recorder_throughput.py [--records 30000] [--postgres URL]

A record is one request row or one output row (no image bytes, so this
measures the SQL path). Time runs from the first `record()` call until
`flush()` returns, i.e. until every row is committed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller.config import Config
from controller.rollout.transitions import create_rollout
from controller.storage.recorder import Recorder
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.store import Store
from controller.storage.tables import utcnow


def one_run(url: str, records: int, work: Path) -> float:
    store = Store(url)
    store.upgrade()
    config = Config.model_validate(
        {
            "name": "bench",
            "database_url": url,
            "models": {"incumbent": {"pipeline": "a/b"}, "candidate": {"pipeline": "c/d"}},
        }
    )
    create_rollout(store, config, "bench")
    recorder = Recorder(url, work / "artifacts", work / "spill")
    pairs = records // 3
    now = utcnow()
    started = time.perf_counter()
    for i in range(pairs):
        request_id = str(uuid.uuid4())
        recorder.record(
            RequestRecord(
                request_id,
                "bench",
                "generate",
                "shadow",
                "incumbent",
                f"u{i}",
                "a prompt",
                {"size": "64x64"},
                i,
                True,
                now,
            )
        )
        for role in ("incumbent", "candidate"):
            recorder.record(
                OutputRecord(
                    str(uuid.uuid4()),
                    request_id,
                    role,
                    0,
                    role == "incumbent",
                    "ok",
                    now,
                    latency_ms=10.0,
                )
            )
    assert recorder.flush(300)
    elapsed = time.perf_counter() - started
    counters = recorder.counters
    recorder.close()
    store.close()
    assert counters.recorded == pairs * 3 and counters.spilled == 0, counters
    return pairs * 3 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "CUTOVER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["sqlite"] = one_run(f"sqlite:///{work / 'bench.db'}", args.records, work)
        name = f"cutover_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
            results["postgresql"] = one_run(url, args.records, work)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    print(f"{'backend':<12} {'records':>8} {'records/s':>10}  target >= 5000/s")
    for backend, rate in results.items():
        print(
            f"{backend:<12} {args.records // 3 * 3:>8} {rate:>10.0f}  {'ok' if rate >= 5000 else 'BELOW TARGET'}"
        )


if __name__ == "__main__":
    main()
