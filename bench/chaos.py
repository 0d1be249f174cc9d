"""The chaos suite: the faults a cluster deployment sees, under traffic, and what each cost.

    python -m bench.chaos [--fault NAME ...] [--seconds 20] [--seed N]

Every fault runs on one local Ray with tiny CPU models: a router, the incumbent and the
candidate as Ray Serve deployments, a rollout mirroring every request, and the controller
loop as its own `cutover control` process. Three clients post steadily; one request in
ten is malformed (a 4xx that must record nothing). The faults:

  router_kill        kill -9 of one of two router replicas, after a random number of answers
  model_kill         kill -9 of the candidate's replica while it serves 30% of users
  loop_kill          kill -9 of the leading controller loop after a random number of
                     answers (ticks come every 0.5 s), three times, while the rollout
                     advances; a new loop is started each time
  db_outage_pg       PostgreSQL refuses connections (open ones are killed) for --seconds
  db_outage_sqlite   another process holds SQLite's write lock for --seconds
  object_store       the S3 endpoint (moto's server behind a proxy) stalls for --seconds
  spill_disk_full    the spill directory's disk is full (a tmpfs filled up) while SQLite's
                     write lock is held for --seconds: no journal, no spill file

Columns: requests sent, 2xx, 4xx, 5xx, no ans (the connection dropped); records (the
answered requests' rows in SQL); lost (an answered request without its request row, its
answer's output or its mirror's output, or with the object store an image not in the
bucket); dup (outputs beyond one per request, role and image); 4xx rec (rows of refused
requests); cut short (mirrors in flight on a killed router, which never produced an
output: the loop marks them `lost` later); moves and moves dup (transitions, and any
taken twice in a row or skipping a stage); recover s (from the fault's end, or a kill,
until every request sent before it is whole in SQL, held images are uploaded and a new
request is answered; for the loop: until a new loop holds the lease); spilled, journal
in (rows replayed from a dead replica's journal) and journal err (rows the journal could
not take) from the recorder's counters (one replica's). tests/test_chaos.py runs the
same faults with assertions, each outage lasting until it has bitten (rows spilled,
images held) and 8 more requests are answered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import select
from sqlalchemy.engine import make_url

from bench.databases import DEFAULT_POSTGRES, allow_connections, fresh_postgres

PG_ADMIN = DEFAULT_POSTGRES
# moto's S3 server takes any credentials, but boto3 signs nothing without some. Replicas
# inherit Ray's environment, so these are set before Ray starts.
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BAD_EVERY = 10  # one request in ten is malformed
# A policy that decides on a handful of pairs: the rollout advances every few seconds, so the
# loop is killed around real transitions.
CHAOS_POLICY = {
    "alpha": 0.05,
    "checks": [
        {
            "name": "error_rate",
            "kind": "rate",
            "metric": "failure",
            "tolerance": {"absolute": 0.5},
            "critical": True,
            "min_samples": 4,
        }
    ],
}


@dataclass
class Sent:
    status: int  # 0: no answer (the connection dropped or timed out)
    request_id: str
    bad: bool
    at: float


class Traffic:
    """Clients posting back to back until stopped; waits are on answers, not on time."""

    def __init__(self, base_url: str, clients: int = 3) -> None:
        self.sent: list[Sent] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=base_url, timeout=60)
        self._threads = [
            threading.Thread(target=self._post, args=(k,), daemon=True) for k in range(clients)
        ]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        self._client.close()

    def answered(self, since: float = 0.0) -> int:
        return sum(200 <= s.status < 500 and s.at >= since for s in list(self.sent))

    def wait_answers(self, count: int, since: float | None = None, timeout: float = 180) -> bool:
        """Until `count` requests sent after `since` (default: now) are answered (2xx or 4xx)."""
        since = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.answered(since) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _post(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            bad = i % BAD_EVERY == BAD_EVERY - 1
            body = (
                {"prompt": "a fox", "size": "7x7", "user": f"c{k}-{i}"}
                if bad
                else {"prompt": f"a fox number {i}", "user": f"c{k}-{i}", "steps": 1}
            )
            started = time.monotonic()
            try:
                response = self._client.post("/v1/images/generations", json=body)
                status, rid = response.status_code, response.headers.get("x-cutover-request-id")
            except httpx.HTTPError:
                status, rid = 0, None
            with self._changed:
                self.sent.append(Sent(status, rid or "", bad, started))
                self._changed.notify_all()
            i += 1


class LoopProcess:
    """`cutover control` in its own process (its log in `loop.log` beside the config)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.config_path.with_name("loop.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller", "-c", str(self.config_path), "control"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | {"CUTOVER_LOG_FORMAT": "json", "CUTOVER_LOG_LEVEL": "info"},
            )

    def leads(self, deployment: Deployment) -> bool:
        """This process holds the rollout's lease (it acts on the rollout)."""
        from controller.storage.tables import ControllerLease

        assert self.proc is not None
        with deployment.store.reader() as session:
            holders = session.scalars(select(ControllerLease.holder)).all()
        return any(f":{self.proc.pid}:" in holder for holder in holders)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Deployment:
    name: str
    work: Path
    config_path: Path
    config: Any
    store: Any
    database_url: str


class Rig:
    """One local Ray and Serve for every fault; one application (and database) per fault."""

    def __init__(self, work: Path | None = None, port: int | None = None) -> None:
        """Starts a local Ray and Serve, or (given Serve's HTTP `port`) uses the running one."""
        from ray import serve

        from controller.serving.app import free_port, start_local_ray
        from workers.tiny import make_tiny_pipeline, variant_seed

        self.work = work or Path(tempfile.mkdtemp(prefix="cutover-chaos-"))
        # The candidate has the incumbent's weights: the same quality, so the rollout advances.
        self.models = {
            "incumbent": make_tiny_pipeline(self.work / "models/incumbent", variant="incumbent"),
            "candidate": make_tiny_pipeline(
                self.work / "models/candidate", seed=variant_seed("incumbent"), variant="candidate"
            ),
        }
        self.owns_ray = port is None
        self.port = port or free_port()
        if self.owns_ray:
            for key, value in S3_TEST_CREDENTIALS.items():
                os.environ.setdefault(key, value)
            start_local_ray(4, "cutover-chaos", temp_dir=str(self.work / "ray"))
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base_url = f"http://127.0.0.1:{self.port}"

    def deploy(self, name: str, database_url: str, **sections: Any) -> Deployment:
        """Write the fault's config file, create its rollout, deploy it, wait for health."""
        from controller.config import load_config
        from controller.rollout.transitions import create_rollout
        from controller.serving.app import start
        from controller.storage.store import Store

        work = self.work / name
        work.mkdir(parents=True, exist_ok=True)
        policy = work / "policy.yaml"
        policy.write_text(yaml.safe_dump(CHAOS_POLICY))
        model = {"steps": 1, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5}
        rollout = {
            "stages": ["shadow", 10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
            "mirror_percent": 100,
            "min_samples": 4,
            "auto_advance": True,
            "evaluation_interval": 0.5,
            "lease_ttl": 3,
        }
        data = {
            "name": name,
            "database_url": database_url,
            "artifact_dir": str(work / "artifacts"),
            "spill_dir": str(work / "spill"),
            "policy": str(policy),
            "models": {role: {"pipeline": str(p), **model} for role, p in self.models.items()},
            "rollout": rollout | sections.pop("rollout", {}),
            "server": {"num_cpus": 0.25, "refresh_interval": 0.5} | sections.pop("server", {}),
            "scorer": {"actors": 0},
            **sections,
        }
        path = work / "cutover.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_config(path)
        store = Store(config.resolved_database_url)
        store.upgrade()
        create_rollout(store, config, "chaos")
        start(config, http_port=self.port)
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/healthz").status_code == 200:
                        break
                time.sleep(0.2)  # polling for readiness, not timing a fault
        return Deployment(name, work, path, config, store, database_url)

    def remove(self, deployment: Deployment) -> None:
        from ray import serve

        serve.delete(deployment.name)
        deployment.store.close()

    def close(self) -> None:
        from controller.serving.app import stop

        if self.owns_ray:
            stop()


def replica_pids(app: str, deployment: str) -> list[int]:
    """Processes of a Serve deployment's replicas, by the title Ray gives its actors."""
    marker = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker in handle.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


# -- the accounts -----------------------------------------------------------------------------


def records(
    deployment: Deployment,
    sent: list[Sent],
    bucket: Callable[[], set[str]] | None = None,
    killed_at: float | None = None,
) -> dict[str, Any]:
    """What SQL holds for the requests sent: lost, duplicated, and refused ones recorded.

    A router replica killed while a mirror call is in flight takes that call with it: the
    answered request's mirror never produced an output, so there is none to lose. Those
    (requests sent before `killed_at`) are counted as `mirrors cut short`; the controller
    loop gives each a `lost` outcome once it can no longer arrive (docs/sre-guide.md)."""
    from controller.storage.tables import Output, Request

    answered = [s.request_id for s in sent if 200 <= s.status < 300]
    refused = [s.request_id for s in sent if 400 <= s.status < 500 and s.request_id]
    rows: dict[str, bool] = {}
    outputs: list[Any] = []
    with deployment.store.reader() as session:
        for chunk in _chunks(answered):
            found = select(Request.id, Request.mirrored).where(Request.id.in_(chunk))
            rows |= {row.id: row.mirrored for row in session.execute(found)}
            outputs += session.execute(
                select(
                    Output.request_id, Output.role, Output.image_index, Output.is_primary,
                    Output.status, Output.artifact_sha256,
                ).where(Output.request_id.in_(chunk))
            ).all()  # fmt: skip
        refused_rows = sum(
            len(session.scalars(select(Request.id).where(Request.id.in_(chunk))).all())
            for chunk in _chunks(refused)
        )
    by_request: dict[str, list[Any]] = {}
    for output in outputs:
        by_request.setdefault(output.request_id, []).append(output)
    started = {s.request_id: s.at for s in sent}
    missing, cut_short = [], 0
    for request_id in answered:
        got = [o for o in by_request.get(request_id, []) if o.status != "lost"]
        if request_id not in rows:
            missing.append((request_id, "request row"))
        if not any(o.is_primary and o.status == "ok" for o in got):
            missing.append((request_id, "answer's output"))
        if rows.get(request_id) and not any(not o.is_primary for o in got):
            if killed_at is not None and started[request_id] <= killed_at:
                cut_short += 1
            else:
                missing.append((request_id, "mirror's output"))
    lost = len(missing)
    keys = [(o.request_id, o.role, o.image_index) for o in outputs]
    result = {
        "records": len(rows) + len(outputs),
        "lost": lost,
        "duplicated": len(keys) - len(set(keys)),
        "refused recorded": refused_rows,
        "mirrors cut short": cut_short,
    }
    if missing:
        result["missing"] = missing[:5]
    if bucket is not None:
        images = {o.artifact_sha256 for o in outputs if o.artifact_sha256}
        result["lost"] += len(images - bucket())
    return result


def transitions(deployment: Deployment) -> dict[str, int]:
    """The rollout's audit trail: moves taken, and any taken twice or skipping a stage."""
    from controller.storage.tables import Rollout, RolloutEvent

    stages = [s.name for s in deployment.config.rollout.stage_list]
    with deployment.store.reader() as session:
        events = session.scalars(
            select(RolloutEvent)
            .join(Rollout, Rollout.id == RolloutEvent.rollout_id)
            .where(Rollout.name == deployment.name)
            .order_by(RolloutEvent.version)
        ).all()
        moves = [(e.verb, e.from_state, e.from_stage, e.to_state, e.to_stage) for e in events]
    twice = sum(a == b for a, b in zip(moves, moves[1:], strict=False))
    skipped = sum(
        verb == "advance" and stages.index(to) != stages.index(frm) + 1
        for verb, _, frm, _, to in moves
        if frm in stages and to in stages
    )
    return {"transitions": len(moves) - 1, "transitions duplicated": twice + skipped}


def whole(run: Run, before: float | None = None) -> bool:
    """Every request sent before `before` (default: all) has all its records in SQL."""
    sent = [s for s in list(run.traffic.sent) if before is None or s.at < before]
    try:
        return records(run.deployment, sent, None, run.killed_at)["lost"] == 0
    except Exception:  # the database is still coming back
        return False


def _chunks(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


# -- the faults -------------------------------------------------------------------------------


@dataclass
class Run:
    """What a fault gets to work with, and where it says when it ended."""

    rig: Rig
    deployment: Deployment
    traffic: Traffic
    loop: LoopProcess
    rng: random.Random
    seconds: float | None  # the outage's length; None: until `answers` more answers
    answers: int
    ended: float = 0.0
    proxy: Any = None  # the object store's stallable proxy (object_store only)
    killed_at: float | None = None  # when a router replica was killed
    recovered: Callable[[], bool] = lambda: True  # a fault's own "back to normal"
    notes: dict[str, Any] = field(default_factory=dict)

    def hold(self, until: Callable[[], bool]) -> None:
        """The outage's length: --seconds, or (in tests) until the fault has bitten (`until`:
        rows spilled, images held) and `answers` more requests are answered meanwhile."""
        if self.seconds is not None:
            time.sleep(self.seconds)
            return
        poll(until, 120)
        self.traffic.wait_answers(self.answers)

    def recorder(self) -> dict[str, int]:
        """The router's recorder counters (`GET /v1/stats`; one replica's)."""
        try:
            return httpx.get(f"{self.rig.base_url}/v1/stats", timeout=10).json()["recorder"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}

    def spilled(self) -> bool:
        return self.recorder().get("spilled", 0) > 0


def router_kill(run: Run) -> None:
    run.traffic.wait_answers(run.rng.randint(1, run.answers))
    victim = run.rng.choice(replica_pids(run.deployment.name, "router"))
    os.kill(victim, signal.SIGKILL)
    run.ended = run.killed_at = time.monotonic()


def model_kill(run: Run) -> None:
    run.traffic.wait_answers(run.rng.randint(1, run.answers))
    victim = run.rng.choice(replica_pids(run.deployment.name, "candidate"))
    os.kill(victim, signal.SIGKILL)
    run.ended = time.monotonic()


def loop_kill(run: Run, kills: int = 3) -> None:
    """Kill the leading loop after a random number of answers (ticks come every 0.5 s, so
    anywhere in a tick or a transition) and start a new one; recovered when it leads."""
    waits = []
    for _ in range(kills):
        poll(lambda: run.loop.leads(run.deployment), 120)
        run.traffic.wait_answers(run.rng.randint(1, run.answers))
        run.loop.kill()
        run.ended = time.monotonic()
        run.loop.start()
        poll(lambda: run.loop.leads(run.deployment), 120)
        waits.append(round(time.monotonic() - run.ended, 1))
    run.notes["seconds to lead again"] = waits


def poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Until a state the system reaches by itself (checked every 0.25 s), or `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def db_outage_pg(run: Run) -> None:
    run.traffic.wait_answers(run.answers)
    allow_connections(PG_ADMIN, run.deployment.database_url, False)
    try:
        run.hold(run.spilled)
    finally:
        allow_connections(PG_ADMIN, run.deployment.database_url, True)
    run.ended = time.monotonic()


def _sqlite_locked(run: Run, until: Callable[[], bool]) -> None:
    """Another process's write transaction holds SQLite's lock for the outage."""
    path = make_url(run.deployment.database_url).database
    holder = sqlite3.connect(path, timeout=30, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers still read
    try:
        run.hold(until)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    run.ended = time.monotonic()


def db_outage_sqlite(run: Run) -> None:
    run.traffic.wait_answers(run.answers)
    _sqlite_locked(run, run.spilled)


def object_store(run: Run) -> None:
    proxy = run.proxy
    pending = run.deployment.config.artifact_path / ".pending"
    run.recovered = lambda: not any(pending.iterdir())
    run.traffic.wait_answers(run.answers)
    proxy.stall()
    try:
        run.hold(lambda: any(pending.iterdir()))
    finally:
        proxy.resume()
    run.ended = time.monotonic()


def spill_disk_full(run: Run) -> None:
    spill = run.deployment.config.spill_path
    with contextlib.suppress(OSError), open(spill / "filler", "wb") as filler:
        while True:  # fill the disk: every byte of the tmpfs taken
            filler.write(b"\0" * 4096)
            filler.flush()
    run.traffic.wait_answers(run.answers)
    # Bitten once a batch failed to reach SQL: its spill write failed too (the disk is full).
    _sqlite_locked(run, lambda: run.recorder().get("db_failures", 0) > 0)


@dataclass
class Fault:
    run: Callable[[Run], None]
    database: str  # "sqlite" or "postgresql"
    sections: dict[str, Any] = field(default_factory=dict)


FAULTS: dict[str, Fault] = {
    "router_kill": Fault(router_kill, "sqlite", {"server": {"replicas": 2}}),
    "model_kill": Fault(
        model_kill, "sqlite", {"rollout": {"stages": [30, 100], "auto_advance": False}}
    ),
    "loop_kill": Fault(loop_kill, "sqlite"),
    "db_outage_pg": Fault(db_outage_pg, "postgresql"),
    "db_outage_sqlite": Fault(db_outage_sqlite, "sqlite"),
    "object_store": Fault(object_store, "sqlite"),
    "spill_disk_full": Fault(spill_disk_full, "sqlite"),
}


# -- running one ------------------------------------------------------------------------------


@contextlib.contextmanager
def database(rig: Rig, name: str, kind: str) -> Iterator[str]:
    """A fresh database for one fault."""
    if kind == "sqlite":
        yield f"sqlite:///{rig.work / name / 'cutover.db'}"
        return
    with fresh_postgres(PG_ADMIN) as url:
        yield url


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` at `path` (needs root): a disk that can be filled."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def s3_endpoint() -> Iterator[tuple[dict[str, Any], Any, Callable[[], set[str]]]]:
    """moto's S3 server behind a proxy that can stall: (settings, proxy, images in the bucket)."""
    import boto3

    from controller.serving.app import free_port
    from tests.stall_proxy import StallProxy

    for key, value in S3_TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + 60
    while True:
        try:
            direct.create_bucket(Bucket=bucket)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # moto_server starting
    proxy = StallProxy(("127.0.0.1", port))
    settings = {
        "bucket": bucket,
        "endpoint_url": f"http://127.0.0.1:{proxy.port}",
        "region": "us-east-1",
        "retry_interval": 0.5,
        "timeout": 1,
    }

    def images() -> set[str]:
        pages = direct.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {Path(o["Key"]).stem for page in pages for o in page.get("Contents", [])}

    try:
        yield settings, proxy, images
    finally:
        proxy.close()
        server.terminate()
        server.wait(10)


def run_fault(
    rig: Rig, name: str, *, seconds: float | None, answers: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Deploy, warm up, inject the fault, wait for recovery, and count."""
    fault = FAULTS[name]
    sections = json.loads(json.dumps(fault.sections))
    with contextlib.ExitStack() as stack:
        (rig.work / name).mkdir(parents=True, exist_ok=True)
        url = stack.enter_context(database(rig, name, fault.database))
        bucket, proxy = None, None
        if name == "object_store":
            settings, proxy, bucket = stack.enter_context(s3_endpoint())
            sections["object_store"] = settings
        if name == "spill_disk_full":
            stack.enter_context(tiny_disk(rig.work / name / "spill"))
        deployment = rig.deploy(name, url, **sections)
        stack.callback(rig.remove, deployment)
        loop = LoopProcess(deployment.config_path)
        loop.start()
        stack.callback(loop.stop)
        traffic = Traffic(rig.base_url).start()
        stack.callback(traffic.stop)
        run = Run(
            rig, deployment, traffic, loop, random.Random(seed), seconds, answers, proxy=proxy
        )
        traffic.wait_answers(answers)
        started = time.monotonic()
        fault.run(run)
        recover_s = _recovery(run)
        traffic.wait_answers(answers)  # traffic after recovery, counted too
        traffic.stop()
        loop.stop()
        _settle(run)
        counters = run.recorder()
        result = {
            "fault": name,
            "seconds": round(run.ended - started, 1),
            **_statuses(traffic.sent),
            **records(deployment, traffic.sent, bucket, run.killed_at),
            **transitions(deployment),
            "recover s": recover_s,
            "spilled": counters.get("spilled"),
            "journal replayed": counters.get("journal_replayed"),
            "journal failures": counters.get("journal_failures"),
            "dropped": counters.get("dropped"),
            **run.notes,
        }
    return result


def _recovery(run: Run) -> float | None:
    """Seconds from the fault's end until every request sent before it is whole in SQL,
    the fault's own backlog is cleared (held images sent) and a new request is answered
    (None: not within 180 s)."""
    if "seconds to lead again" in run.notes:
        return max(run.notes["seconds to lead again"])

    def back() -> bool:
        sent = list(run.traffic.sent)
        after = any(200 <= s.status < 300 and s.at >= run.ended for s in sent)
        return after and run.recovered() and whole(run, before=run.ended)

    return round(time.monotonic() - run.ended, 1) if poll(back, 180) else None


def _settle(run: Run) -> None:
    """After the last answer: until (bounded) SQL holds every answered request."""
    poll(lambda: run.recovered() and whole(run), 120)


def _statuses(sent: list[Sent]) -> dict[str, int]:
    return {
        "sent": len(sent),
        "2xx": sum(200 <= s.status < 300 for s in sent),
        "4xx": sum(400 <= s.status < 500 for s in sent),
        "5xx": sum(500 <= s.status < 600 for s in sent),
        "no answer": sum(s.status == 0 for s in sent),
    }


# (result key, column header): the table is wide, so headers are short (the docstring says each).
COLUMNS = [
    ("fault", "fault"), ("seconds", "fault s"), ("sent", "sent"), ("2xx", "2xx"),
    ("4xx", "4xx"), ("5xx", "5xx"), ("no answer", "no ans"), ("records", "records"),
    ("lost", "lost"), ("duplicated", "dup"), ("refused recorded", "4xx rec"),
    ("mirrors cut short", "cut short"), ("transitions", "moves"),
    ("transitions duplicated", "moves dup"), ("recover s", "recover s"), ("spilled", "spilled"),
    ("journal replayed", "journal in"), ("journal failures", "journal err"),
]  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[str(r.get(k, "-")) for k, _ in COLUMNS] for r in results]
    widths = [max(len(row[c]) for row in cells) for c in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fault", action="append", choices=list(FAULTS))
    parser.add_argument("--seconds", type=float, default=20.0, help="outage length")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    if os.geteuid() != 0 and "spill_disk_full" in (args.fault or FAULTS):
        sys.exit("spill_disk_full mounts a tmpfs: run as root, or leave it out with --fault")
    rig = Rig()
    results = []
    try:
        for k, name in enumerate(args.fault or list(FAULTS)):
            result = run_fault(rig, name, seconds=args.seconds, seed=args.seed + k)
            results.append(result)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        rig.close()
    sys.stdout.write(f"\nseed {args.seed}, outages of {args.seconds:g} s\n{table(results)}\n")


if __name__ == "__main__":
    main()
