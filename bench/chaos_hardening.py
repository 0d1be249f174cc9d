"""Three faults from issue 10, each on a real local Ray with tiny CPU models, and what a
client and the audit trail saw.

    python -m bench.chaos_hardening [--scenario wedge|stall|outage|scorer|all]

  wedge   one request too big to finish (512x512, 50 steps, `request_timeout` 5 s), then
          20 small ones: do the small ones get answers in their normal time?
  stall   PostgreSQL behind a TCP proxy that stops forwarding for 20 s while traffic flows
          (a partition: connections are accepted, nothing comes back). Are records spilled,
          how many sat only in memory at the end of the stall, and how many log lines did
          the outage cost?
  outage  PostgreSQL refuses connections for 20 s while traffic flows: spill files left, and
          log lines per minute of outage.
  scorer  SQLite, every request mirrored, the controller loop scoring (OCR) beside the
          recorder for 60 s with no outage at all: how many records spilled?

Each prints requests sent, 2xx, 5xx, records lost (expected rows not in SQL after a full
flush) and records duplicated (rows beyond one per id). The faults of a cluster deployment
(kills, outages of each store, a full disk) are in bench/chaos.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench.databases import DEFAULT_POSTGRES, allow_connections, fresh_postgres

PG_ADMIN = DEFAULT_POSTGRES
RECORDER_EVENTS = {
    "records_spilled",
    "database_unavailable",
    "database_still_unavailable",
    "database_recovered",
    "spill_replayed",
    "recorder_loop_error",
}


class Bench:
    """One local Ray and Serve for every scenario; one application per scenario."""

    def __init__(self) -> None:
        from ray import serve

        from controller.serving.app import free_port, start_local_ray
        from workers.tiny import make_tiny_pipeline, variant_seed

        self.work = Path(tempfile.mkdtemp(prefix="cutover-chaos-"))
        self.models = {
            "incumbent": make_tiny_pipeline(self.work / "models/incumbent", variant="incumbent"),
            "candidate": make_tiny_pipeline(
                self.work / "models/candidate", seed=variant_seed("incumbent"), variant="candidate"
            ),
        }
        self.port = free_port()
        self.ray_dir = self.work / "ray"
        start_local_ray(4, "cutover-chaos", temp_dir=str(self.ray_dir))
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def deploy(self, name: str, database_url: str, **sections: Any) -> tuple[Any, Any, Any]:
        from controller.config import Config
        from controller.rollout.transitions import create_rollout
        from controller.serving import app as serving
        from controller.storage.store import Store

        model = {"steps": 2, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5}
        data = {
            "name": name,
            "database_url": database_url,
            "artifact_dir": str(self.work / name / "artifacts"),
            "spill_dir": str(self.work / name / "spill"),
            "models": {role: {"pipeline": str(p), **model} for role, p in self.models.items()},
            "rollout": {"min_samples": 10**6, **sections.pop("rollout", {})},
            "server": {"num_cpus": 0.25, **sections.pop("server", {})},
            **{k: v for k, v in sections.items() if k in Config.model_fields},
        }
        config = Config.model_validate(data)
        config._base_dir = self.work / name
        store = Store(config.resolved_database_url)
        store.upgrade()
        create_rollout(store, config, "bench")
        router = serving.start(config, http_port=self.port)
        for _ in range(240):
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        return config, store, router

    def post(self, **body: Any) -> tuple[int, float, str]:
        started = time.monotonic()
        try:
            response = self.client.post(
                "/v1/images/generations", json={"prompt": "a fox", **body}, timeout=30
            )
            status, request_id = (
                response.status_code,
                response.headers.get("x-cutover-request-id", ""),
            )
        except httpx.TransportError:
            status, request_id = 0, ""
        return status, time.monotonic() - started, request_id

    def recorder_lines(self) -> int:
        """Recorder events in every Ray worker's stderr (where both old and new code log)."""
        count = 0
        for path in self.ray_dir.rglob("worker-*.err"):
            for line in path.read_text(errors="replace").splitlines():
                start = line.find("{")
                if start < 0:
                    continue
                try:
                    event = json.loads(line[start:])
                except ValueError:
                    continue
                count += event.get("event") in RECORDER_EVENTS
        return count


def accounting(store: Any, router: Any, ids: list[str]) -> dict:
    """After a full flush (spill included): rows missing from SQL, and rows there twice.

    Each answered request owes a request row and one output per side that served it: the
    primary, plus the mirror when its row says it was mirrored (excess mirrors are skipped
    by design, and the row records that)."""
    from controller.storage.tables import Output, Request

    router.flush.remote(120, True).result(timeout_s=180)
    wanted = [i for i in ids if i]
    with store.reader() as session:
        mirrored = {
            row.id: row.mirrored
            for row in session.execute(
                select(Request.id, Request.mirrored).where(Request.id.in_(wanted))
            )
        }
        outputs = session.scalar(
            select(func.count()).select_from(Output).where(Output.request_id.in_(wanted))
        )
        distinct = session.scalar(
            select(func.count(func.distinct(Output.id))).where(Output.request_id.in_(wanted))
        )
    owed_outputs = sum(1 + bool(mirrored.get(i, False)) for i in wanted)
    return {
        "records lost": (len(wanted) - len(mirrored)) + (owed_outputs - outputs),
        "records duplicated": outputs - distinct,
    }


def summary(statuses: list[int]) -> dict:
    return {
        "requests sent": len(statuses),
        "2xx": sum(200 <= s < 300 for s in statuses),
        "5xx": sum(500 <= s < 600 for s in statuses),
        "no answer": sum(s == 0 for s in statuses),
    }


def wedge(bench: Bench) -> dict:
    config, store, router = bench.deploy(
        "wedge",
        f"sqlite:///{bench.work / 'wedge.db'}",
        rollout={"mirror_percent": 0},
        server={"request_timeout": 5},
    )
    # First, before the replica has timed anything: nothing can refuse it, so it starts.
    big = bench.post(user="w", size="512x512", steps=50)
    small = [bench.post(user="w", steps=2) for _ in range(20)]
    normal = statistics.median(bench.post(user="w", steps=2)[1] for _ in range(5))
    again = bench.post(user="w", size="512x512", steps=50)  # now the learned speed is known
    latencies = [t for s, t, _ in small if s == 200]
    result = {
        "big request (cold)": big[0],
        "big request (warm)": again[0],
        "big warm answered in s": round(again[1], 2),
        **summary([big[0], again[0]] + [s for s, _, _ in small]),
        "small 2xx": sum(s == 200 for s, _, _ in small),
        "small p50 s": round(statistics.median(t for _, t, _ in small), 2),
        "normal p50 s": round(normal, 2),
        "small p50 / normal": round(statistics.median(latencies) / normal, 2)
        if latencies
        else None,
    }
    result |= accounting(store, router, [big[2], again[2]] + [i for _, _, i in small])
    _remove("wedge")
    return result


def through_a_fault(
    bench: Bench,
    store: Any,
    router: Any,
    start: Callable[[], None],
    end: Callable[[], None],
    observe: Callable[[list[int]], dict],
    seconds: float,
) -> dict:
    """Steady traffic (about 5 requests/s); 5 s in, the database fault starts and lasts
    `seconds`; `observe` reports just before it ends; 5 s of recovery, then the accounts."""
    statuses: list[int] = []
    ids: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            status, _, request_id = bench.post(user=f"u{len(ids)}", steps=1)
            statuses.append(status)
            ids.append(request_id)
            time.sleep(0.1)

    lines_before = bench.recorder_lines()
    sender = threading.Thread(target=traffic)
    sender.start()
    time.sleep(5)
    start()
    time.sleep(seconds)
    observed = observe(statuses)
    end()
    time.sleep(5)
    stop.set()
    sender.join()
    result = {**summary(statuses), **observed, **accounting(store, router, ids)}
    result["recorder log lines per minute of outage"] = round(
        (bench.recorder_lines() - lines_before) / (seconds / 60), 1
    )
    return result


def stall(bench: Bench, seconds: float = 20.0) -> dict:
    """A partition: PostgreSQL behind a proxy that accepts and then forwards nothing."""
    StallProxy = _stall_proxy()  # noqa: N806 (a class)

    with fresh_postgres(PG_ADMIN) as url:
        direct = make_url(url)
        proxy = StallProxy((direct.host, direct.port or 5432))
        through = direct.set(host="127.0.0.1", port=proxy.port)
        config, store, router = bench.deploy(
            "stall",
            through.render_as_string(hide_password=False),
            rollout={"mirror_percent": 0},
            database={"write_timeout": 5},
        )

        def observe(statuses: list[int]) -> dict:
            stats = bench.client.get("/v1/stats").json()["recorder"]
            made = 2 * sum(s == 200 for s in statuses)  # a request row and its output
            return {
                "spilled during the stall": stats["spilled"],
                "records only in memory at its end": made - stats["recorded"] - stats["spilled"],
            }

        result = through_a_fault(bench, store, router, proxy.stall, proxy.resume, observe, seconds)
        _remove("stall")
        store.close()
        proxy.close()
    return result


def outage(bench: Bench, seconds: float = 20.0) -> dict:
    """PostgreSQL refuses connections for `seconds` (new ones refused, open ones killed)."""
    with fresh_postgres(PG_ADMIN) as url:
        config, store, router = bench.deploy("outage", url, rollout={"mirror_percent": 0})

        def allow(on: bool) -> None:
            allow_connections(PG_ADMIN, url, on)

        def observe(_statuses: list[int]) -> dict:
            files = list(config.spill_path.glob("spill-*.jsonl"))
            return {"spill files at the end of the outage": len(files)}

        result = through_a_fault(
            bench, store, router, lambda: allow(False), lambda: allow(True), observe, seconds
        )
        _remove("outage")
        store.close()
    return result


def scorer(bench: Bench, seconds: float = 60.0) -> dict:
    from controller.rollout.loop import ControllerLoop

    config, store, router = bench.deploy(
        "scorer",
        f"sqlite:///{bench.work / 'scorer.db'}",
        rollout={"mirror_percent": 100, "evaluation_interval": 1},
    )
    stop = threading.Event()
    loop = threading.Thread(target=ControllerLoop(config).run, args=(stop,), daemon=True)
    loop.start()
    statuses: list[int] = []
    ids: list[str] = []

    def traffic(worker: int) -> None:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            status, _, request_id = bench.post(
                user=f"c{worker}-{i}", steps=2, prompt=f'a shop sign that says "SALE {i}"'
            )
            statuses.append(status)
            ids.append(request_id)
            i += 1

    senders = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    stats = bench.client.get("/v1/stats").json()["recorder"]
    stop.set()
    loop.join(30)
    with store.reader() as session:
        from controller.storage.tables import Output

        scored = session.scalar(
            select(func.count()).select_from(Output).where(Output.scored_at.is_not(None))
        )
    result = {**summary(statuses), "spilled with no outage": stats["spilled"], "scored": scored}
    result |= accounting(store, router, ids)
    _remove("scorer")
    return result


def _stall_proxy() -> type:
    """tests/stall_proxy.py, loaded by path: no change to sys.path, which Ray hands to its
    workers (an older checkout measured through PYTHONPATH must stay the code they run)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "stall_proxy.py"
    spec = importlib.util.spec_from_file_location("stall_proxy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StallProxy


def _remove(name: str) -> None:
    from ray import serve

    serve.delete(name)


SCENARIOS: dict[str, Callable[[Bench], dict]] = {
    "wedge": wedge,
    "stall": stall,
    "outage": outage,
    "scorer": scorer,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    bench = Bench()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    try:
        for name in names:
            print(f"{name}: {json.dumps(SCENARIOS[name](bench))}", flush=True)
    finally:
        from controller.serving import app as serving

        serving.stop()


if __name__ == "__main__":
    main()
