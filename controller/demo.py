"""`cutover demo`: the whole playbook on a laptop, with tiny CPU models.

For each scenario it writes a config, deploys the incumbent, the candidate and
the router on a local Ray, runs the controller loop, and drives synthetic
traffic (many users, typography prompts among them) until the rollout ends:
`healthy` (a candidate of the same quality) must reach 100% by auto-advance,
`regression` (the same candidate with a colour tint and extra errors injected)
must be rolled back by the judge. Every process it starts is stopped before it
returns.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from controller.config import Config, load_config
from controller.lab.calibrate import default_prompts
from controller.review.status import render_status, rollout_status
from controller.rollout.transitions import create_rollout, get_rollout
from controller.storage.store import Store
from controller.storage.tables import utcnow
from policies.policy import DEFAULT_POLICY

log = structlog.get_logger("cutover.demo")

DEMO_POLICY = DEFAULT_POLICY.parent / "demo.yaml"
EXPECTED = {"healthy": "promoted", "regression": "rolled_back"}
FAULTS = {"healthy": {}, "regression": {"tint": [70, 10, -50], "error_percent": 20}}


@dataclass
class Outcome:
    scenario: str
    state: str
    stage: str
    seconds: float
    requests: int
    reason: str
    report: Path

    @property
    def ok(self) -> bool:
        return self.state == EXPECTED[self.scenario]


def write_config(workdir: Path, scenario: str, port: int) -> Path:
    from workers.tiny import ensure_tiny_pipeline, variant_seed

    models = workdir / "models"
    ensure_tiny_pipeline(models / "incumbent", variant="incumbent")
    # The candidate is a separately built pipeline with the incumbent's weights: "the same quality".
    if not (models / "candidate" / "model_index.json").exists():
        from workers.tiny import make_tiny_pipeline

        make_tiny_pipeline(
            models / "candidate", seed=variant_seed("incumbent"), variant="candidate"
        )
    model = {"steps": 2, "guidance": 4.0, "batch_size": 4, "num_cpus": 0.5, "batch_wait": 0.05}
    data = {
        "name": f"demo-{scenario}",
        "database_url": "sqlite:///cutover.db",
        "artifact_dir": "artifacts",
        "spill_dir": "spill",
        "log_file": "logs/events.jsonl",
        "policy": str(DEMO_POLICY),
        "models": {
            "incumbent": {"pipeline": str(models / "incumbent"), **model},
            "candidate": {
                "pipeline": str(models / "candidate"),
                **model,
                "faults": FAULTS[scenario],
            },
        },
        "rollout": {
            "stages": ["shadow", 10, 30, 60, 100],
            "mirror_percent": 100,
            "min_samples": 12,
            "min_duration": 0,
            "max_duration": "10m",
            "auto_advance": True,
            "evaluation_interval": 2,
            "lease_ttl": 10,
        },
        "server": {
            "port": port,
            "refresh_interval": 0.5,
            "num_cpus": 0.25,
            "mirror_max_in_flight": 16,
        },
    }
    path = workdir / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Traffic:
    """Synthetic users sending prompts until stopped; counts what it sent."""

    def __init__(self, base_url: str, concurrency: int = 4, seed: int = 0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.prompts = default_prompts()
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._slots = threading.Semaphore(concurrency)
        self._thread = threading.Thread(target=self._run, name="cutover-demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _one(self, body: dict[str, str]) -> None:
        try:
            response = self.client.post("/v1/images/generations", json=body)
            self.failed += response.status_code != 200
        except httpx.HTTPError:
            self.failed += 1
        finally:
            self.sent += 1
            self._slots.release()

    def _run(self) -> None:
        """Keep `concurrency` requests in flight, never more, until stopped."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                body = {
                    "prompt": self.rng.choice(self.prompts),
                    "user": f"user-{self.rng.randrange(500)}",
                }
                pool.submit(self._one, body)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.client.close()


def run_scenario(
    scenario: str, workdir: Path, port: int, console: Console, timeout: float
) -> Outcome:
    from ray import serve

    from controller.review.report import build_report
    from controller.rollout.loop import ControllerLoop
    from controller.serving import app as serving
    from policies.policy import load_policy

    config = load_config(write_config(workdir, scenario, port), check_paths=True)
    store = Store.for_config(config)
    store.upgrade()
    create_rollout(store, config, actor="demo")
    started = time.monotonic()
    serving.start(config, http_port=port)
    _wait_healthy(f"http://127.0.0.1:{port}")
    stop = threading.Event()
    loop = threading.Thread(target=ControllerLoop(config, store).run, args=(stop,), daemon=True)
    loop.start()
    traffic = Traffic(f"http://127.0.0.1:{port}", seed=len(scenario))
    traffic.start()
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while time.monotonic() - started < timeout:
                status = _status(store, config)
                live.update(
                    Group(
                        f"[bold]scenario {scenario}[/bold]  requests sent {traffic.sent}  "
                        f"elapsed {time.monotonic() - started:.0f}s",
                        render_status(status),
                    )
                )
                if status["state"] in ("promoted", "rolled_back", "paused", "aborted"):
                    break
                time.sleep(1)
    finally:
        traffic.stop()
        stop.set()
        loop.join(timeout=30)
        serve.delete(config.name)
    status = _status(store, config)
    with store.reader() as session:
        html = build_report(
            session, get_rollout(session, config.name), config, load_policy(DEMO_POLICY)
        )
    report = workdir / f"report-{scenario}.html"
    report.write_text(html, encoding="utf-8")
    last = status["last_event"] or {}
    store.close()
    return Outcome(
        scenario,
        status["state"],
        status["stage"],
        time.monotonic() - started,
        traffic.sent,
        str(last.get("reason", "")),
        report,
    )


def _status(store: Store, config: Config) -> dict[str, Any]:
    with store.reader() as session:
        return rollout_status(session, get_rollout(session, config.name), config, utcnow())


def _wait_healthy(base_url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the demo's router did not answer on {base_url} within {timeout:.0f}s")


def ray_temp_dir(workdir: Path) -> Path:
    """A short path for the demo's Ray session (Unix socket paths are limited to 107 bytes)."""
    digest = hashlib.sha1(str(workdir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"cutover-demo-{digest}"


def run_demo(
    scenarios: list[str], workdir: Path, console: Console, timeout: float = 600
) -> list[Outcome]:
    import logging

    logging.getLogger("ray").setLevel(
        logging.WARNING
    )  # Serve's INFO lines would break the live display
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    from controller.serving.app import free_port, start_local_ray

    workdir = workdir.resolve()  # the configs it writes name paths that must not depend on the cwd
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    start_local_ray(4, "cutover-demo", logging_level="ERROR", temp_dir=str(ray_temp_dir(workdir)))
    try:
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return [run_scenario(s, workdir, port, console, timeout) for s in scenarios]
    finally:
        from controller.serving import app as serving

        serving.stop()


def render_summary(outcomes: list[Outcome]) -> Group:
    table = Table(title="cutover demo", title_justify="left")
    for column in ("scenario", "ended", "expected", "requests", "seconds", "why"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        table.add_row(
            o.scenario,
            f"{o.state}@{o.stage}",
            EXPECTED[o.scenario],
            str(o.requests),
            f"{o.seconds:.0f}",
            o.reason[:200],
            style=None if o.ok else "red",
        )
    reports = "\n".join(f"report ({o.scenario}): {o.report.resolve()}" for o in outcomes)
    return Group(table, reports)
