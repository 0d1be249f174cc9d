"""`cutover demo`: the whole playbook on a laptop, with tiny CPU models.

For each scenario it writes a config, deploys its models and the router on a
local Ray, runs the controller loop, and drives synthetic traffic (many users,
typography prompts among them) until every rollout ends: `healthy` (a
candidate of the same quality) must reach 100% by auto-advance, `regression`
(the same candidate with a colour tint and extra errors injected) must be
rolled back by the judge, and `edit` runs two rollouts side by side: a 1%
canary of an img2img candidate on the `edit` route while a text-to-image
candidate goes through its stages on `generate`; both must reach 100%. Each
rollout is validated on its route's suites first (`cutover validate`), and the summary
says where a defect was caught: in validation, in shadow, or both. `bakeoff` ranks four
variants of the incumbent (a colour tint, 20% errors, slow, and a good one) against it.
Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from controller.review.status import deployment_status, render_overview
from controller.rollout.transitions import create_rollout, get_rollout
from controller.storage.store import Store
from controller.storage.tables import utcnow
from policies.policy import DEFAULT_POLICY

log = structlog.get_logger("cutover.demo")

DEMO_POLICY = DEFAULT_POLICY.parent / "demo.yaml"
# The state each scenario's rollouts must end in.
EXPECTED = {
    "healthy": {"demo-healthy": "promoted"},
    "regression": {"demo-regression": "rolled_back"},
    "edit": {"demo-edit-generate": "promoted", "demo-edit-edit": "promoted"},
    # A candidate that writes short quoted text well and garbles text past 12 characters: the
    # aggregate typography check stays within tolerance, a slice of the judge catches it.
    "slice": {"demo-slice": "rolled_back"},
    # The bake-off's ranking: the good variant first, each defective one worse than the baseline.
    "bakeoff": {"good": "level", "tint": "worse", "errors": "worse", "slow": "worse"},
}
# The four candidates of the bake-off: the incumbent's weights with one defect each (or none).
VARIANTS = {
    "tint": {"tint": [70, 10, -50]},
    "errors": {"error_percent": 20},
    "slow": {"step_delay": 0.3},  # every denoising step 0.3 s slower, as on a throttled device
    "good": {},
}
# The suites each route validates on in the demo, and seeds per item: enough pairs for the
# demo policy's min_samples (20), few enough to validate in seconds.
DEMO_SUITES = {"generate": (["colour", "composition"], 1), "edit": (["edits"], 4)}
FAULTS = {
    "healthy": {},
    "regression": {"tint": [70, 10, -50], "error_percent": 20},
    # A card renders in microseconds: the delay paces traffic like a real model's second,
    # so the scorer's OCR (about half a second a read here) keeps up.
    "slice": {"text_card": True, "garble_text_over": 12, "delay": 0.8},
}
# The slice scenario's signs: three in four quote a few characters, one in four a long line.
# Both models draw the quoted text on a card (`faults.text_card`): the tiny models cannot.
SHORT_SIGNS = (
    "OPEN",
    "SALE",
    "EXIT",
    "TAXI",
    "HOTEL",
    "BAKERY",
    "PHARMACY",
    "Welcome",
    "Fresh Bread",
)
LONG_SIGNS = ("Every Journey Starts Here", "Grand Opening This Weekend", "Fresh Coffee All Day")
SIGN_SIZE = "256x64"  # wide enough for a long line to read back by OCR
ENDED = ("promoted", "rolled_back", "paused", "aborted")
EDIT_SHARE = 0.4  # of the edit scenario's requests


@dataclass
class Outcome:
    scenario: str
    states: dict[str, str]  # rollout: state@stage
    seconds: float
    requests: int
    reason: str
    reports: list[Path]
    validations: dict[str, str] = field(default_factory=dict)  # rollout: decision

    @property
    def ok(self) -> bool:
        ended = {name: state.split("@")[0] for name, state in self.states.items()}
        if self.scenario == "bakeoff":
            return ended == EXPECTED["bakeoff"] and next(iter(self.states)) == "good"
        return ended == EXPECTED[self.scenario]

    @property
    def caught(self) -> str:
        """Where a defect was caught: in validation, in shadow (rolled back), both, or nowhere."""
        places = []
        if any(d == "FAIL" for d in self.validations.values()):
            places.append("validation")
        if any(state.startswith("rolled_back") for state in self.states.values()):
            places.append("shadow")
        return " and ".join(places) or "-"


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
    rollout = {
        "stages": ["shadow", 10, 30, 60, 100],
        "mirror_percent": 100,
        "min_samples": 12,
        "min_duration": 0,
        "max_duration": "10m",
        "auto_advance": True,
        "evaluation_interval": 2,
        "lease_ttl": 10,
    }
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
                "faults": FAULTS.get(scenario, {}),
            },
        },
        "rollout": rollout,
        "server": {
            "port": port,
            "refresh_interval": 0.5,
            "num_cpus": 0.25,
            "mirror_max_in_flight": 16,
        },
    }
    if scenario == "slice":
        _as_sign_shop(data, rollout, workdir)
    if scenario == "edit":
        _as_playbook(data, models, model, rollout)
    elif scenario == "bakeoff":
        data["models"] = {
            "incumbent": data["models"]["incumbent"],
            **{
                name: {**data["models"]["incumbent"], "faults": faults}
                for name, faults in VARIANTS.items()
            },
        }
        data["routes"] = {"generate": {"model": "incumbent"}}
        data.pop("rollout")
    else:
        data["routes"] = {"generate": {"model": "incumbent"}}
        data["rollouts"] = {data["name"]: {"candidate": "candidate", **data.pop("rollout")}}
    for route, settings in data["routes"].items():
        settings["suites"] = DEMO_SUITES[route][0]
    path = workdir / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _as_sign_shop(data: dict[str, Any], rollout: dict[str, Any], workdir: Path) -> None:
    """The slice scenario: both models draw the quoted text (the candidate garbles long
    lines), OCR reads every pair (two scorer actors), and a stage waits for the scorer
    (`max_scorer_lag`) so no stage advances past evidence the probes have not read yet."""
    data["models"]["incumbent"]["faults"] = {"text_card": True, "delay": 0.8}
    data["scorer"] = {"actors": 2}
    # 80 mirrored requests a stage: promotion needs 400, while the long-text slice is found
    # after about 200 (45 long-text pairs); at 30 a stage, a fast run could promote first.
    rollout |= {"min_samples": 80, "max_scorer_lag": "15s"}
    policy = yaml.safe_load(DEMO_POLICY.read_text())
    policy["sample_rates"] = {"typography_cer": 1.0}
    # Tesseract reads a card in about 0.2 s here, rapidocr in about 1.2 s: where Debian's
    # tesseract-ocr is installed (`make system-packages`), the scorer keeps up with it.
    policy["ocr_engine"] = "tesseract" if shutil.which("tesseract") else "rapidocr"
    path = workdir / "slice-policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    data["policy"] = str(path)


def _as_playbook(
    data: dict[str, Any], models: Path, model: dict[str, Any], rollout: dict[str, Any]
) -> None:
    """The edit scenario's pool: generate's two models, and two img2img models of one weight
    (the candidate "of the same quality") whose rollout starts as a 1% canary."""
    from workers.tiny import make_tiny_pipeline, variant_seed

    for name in ("edit-v1", "edit-v2"):
        if not (models / name / "model_index.json").exists():
            make_tiny_pipeline(
                models / name, seed=variant_seed("edit"), variant=name, kind="img2img"
            )
    edit_model = {**model, "kind": "img2img", "steps": 3}
    data["models"] = {
        "sd": data["models"]["incumbent"],
        "sd-next": {**data["models"]["candidate"], "faults": {}},
        "edit-v1": {"pipeline": str(models / "edit-v1"), **edit_model},
        "edit-v2": {"pipeline": str(models / "edit-v2"), **edit_model},
    }
    data["routes"] = {"generate": {"model": "sd"}, "edit": {"model": "edit-v1"}}
    data.pop("rollout")
    data["rollouts"] = {
        "demo-edit-generate": {"route": "generate", "candidate": "sd-next", **rollout},
        "demo-edit-edit": {
            "route": "edit",
            "candidate": "edit-v2",
            **rollout,
            "stages": [1, 100],
        },
    }


class Traffic:
    """Synthetic users sending prompts until stopped; counts what it sent."""

    def __init__(
        self,
        base_url: str,
        concurrency: int = 4,
        seed: int = 0,
        edit_share: float = 0.0,
        prompts: list[str] | None = None,
        size: str | None = None,
    ) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.prompts = prompts or default_prompts()
        self.size = size
        self.rng = random.Random(seed)
        self.edit_share = edit_share
        self.photo = _photo()
        self.concurrency = concurrency
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._slots = threading.Semaphore(concurrency)
        self._thread = threading.Thread(target=self._run, name="cutover-demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _one(self, body: dict[str, str], edit: bool) -> None:
        try:
            if edit:
                files = {"image": ("photo.png", self.photo, "image/png")}
                response = self.client.post("/v1/images/edits", data=body, files=files)
            else:
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
                if self.size:
                    body["size"] = self.size
                pool.submit(self._one, body, self.rng.random() < self.edit_share)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        self.client.close()


def sign_prompts() -> list[str]:
    """Three short signs for every long one (`SHORT_SIGNS`, `LONG_SIGNS`)."""
    # Every prompt is short (at most 8 words): only the quoted text's length tells them apart.
    short = [f'a shop sign that says "{text}"' for text in SHORT_SIGNS]
    long = [f'a banner that reads "{text}"' for text in LONG_SIGNS]
    return short * len(LONG_SIGNS) + long * (len(SHORT_SIGNS) // 3)


def _photo() -> bytes:
    """The image every demo edit starts from: a 64x64 gradient."""
    import numpy as np

    from workers.images import to_png

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return to_png(
        np.stack(
            [
                np.tile(ramp, (64, 1)),
                np.tile(ramp[:, None], (1, 64)),
                np.full((64, 64), 128, np.uint8),
            ],
            axis=-1,
        )
    )


def run_scenario(
    scenario: str,
    workdir: Path,
    port: int,
    console: Console,
    timeout: float,
    watch: Callable[[Store, Config], None] | None = None,
) -> Outcome:
    """One scenario end to end. `watch` is called about every second while traffic runs
    (`bench/scorer_throughput.py` samples the scorer's lag with it)."""
    from ray import serve

    from controller.review.report import build_report
    from controller.rollout.loop import ControllerLoop
    from controller.rollout.scorer_pool import ScorerPool
    from controller.serving import app as serving
    from policies.policy import load_policy

    started = time.monotonic()
    config = load_config(write_config(workdir, scenario, port), check_paths=True)
    store = Store.for_config(config)
    store.upgrade()
    validations = {name: _validate_then_create(store, config, name) for name in config.plans()}
    serving.start(config, http_port=port)
    _wait_healthy(f"http://127.0.0.1:{port}")
    pool = ScorerPool(config)
    pool.start()
    stop = threading.Event()
    loop = ControllerLoop(config, store, score_inline=not pool.actors)
    loop_thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    loop_thread.start()
    share = EDIT_SHARE if scenario == "edit" else 0.0
    signs = scenario == "slice"
    traffic = Traffic(
        f"http://127.0.0.1:{port}",
        concurrency=2 if signs else 4,
        seed=len(scenario),
        edit_share=share,
        prompts=sign_prompts() if signs else None,
        size=SIGN_SIZE if signs else None,
    )
    traffic.start()
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while time.monotonic() - started < timeout:
                overview = _overview(store, config)
                live.update(
                    Group(
                        f"[bold]scenario {scenario}[/bold]  requests sent {traffic.sent}  "
                        f"elapsed {time.monotonic() - started:.0f}s",
                        render_overview(overview),
                    )
                )
                if watch is not None:
                    watch(store, config)
                if all(r["state"] in ENDED for r in overview["rollouts"]):
                    break
                time.sleep(1)
    finally:
        traffic.stop()
        stop.set()
        loop_thread.join(timeout=30)
        pool.stop()
        serve.delete(config.name)
    overview = _overview(store, config)
    reports = []
    for name in config.plans():
        with store.reader() as session:
            html = build_report(
                session, get_rollout(session, name), config, load_policy(DEMO_POLICY)
            )
        report = workdir / (
            f"report-{scenario}.html"
            if len(config.plans()) == 1
            else f"report-{scenario}-{name}.html"
        )
        report.write_text(html, encoding="utf-8")
        reports.append(report)
    store.close()
    return Outcome(
        scenario,
        {r["rollout"]: f"{r['state']}@{r.get('stage')}" for r in overview["rollouts"]},
        time.monotonic() - started,
        traffic.sent,
        "; ".join(
            f"{r['rollout']}: {(r.get('last_event') or {}).get('reason', '')}"
            for r in overview["rollouts"]
        ),
        reports,
        validations,
    )


def _validate_then_create(store: Store, config: Config, name: str) -> str:
    """Validation first, as `cutover init` asks. A candidate that fails it still goes on to
    shadow here (the skip recorded as forced), to show shadow catching the same defect."""
    from controller.lab.validation import SKIPPED, record, validate

    plan = config.plan(name)
    row, _ = validate(config, store, plan, "demo", seeds=DEMO_SUITES[plan.route.value][1])
    note = f"validation {row.id} {row.decision}"
    if row.decision != "PASS":
        record(
            store,
            config,
            plan,
            row.suites,
            SKIPPED,
            f"demo: validation was {row.decision}; shadowing anyway to show shadow catch it too",
            "demo",
        )
    create_rollout(store, config, "demo", name, note=note, forced=row.decision != "PASS")
    log.info("demo_validated", rollout=name, decision=row.decision, reason=row.reason)
    return row.decision


def run_bakeoff(workdir: Path, port: int, console: Console) -> Outcome:
    """The four variants against the incumbent on the demo's suites; writes the report."""
    from controller.cli.lab import print_ranking
    from controller.lab.runs import bakeoff_judging, plan_run, run_on_ray
    from controller.review.bakeoff_report import build_bakeoff_report
    from policies.policy import load_policy

    started = time.monotonic()
    config = load_config(write_config(workdir, "bakeoff", port), check_paths=True)
    store = Store.for_config(config)
    store.upgrade()
    suites, _ = DEMO_SUITES["generate"]
    plan = plan_run(config, suites, list(VARIANTS), "incumbent", seeds=4)
    result = run_on_ray(
        config, store, plan, bakeoff_judging(load_policy(DEMO_POLICY), len(VARIANTS))
    )
    print_ranking(result)
    report = workdir / "report-bakeoff.html"
    with store.reader() as session:
        html = build_bakeoff_report(session, config, result["run"], load_policy(DEMO_POLICY))
        report.write_text(html, encoding="utf-8")
    store.close()
    return Outcome(
        "bakeoff",
        {s["model"]: s["verdict"] for s in result["ranking"]},
        time.monotonic() - started,
        result["rendered_now"],
        "; ".join(f"{s['model']}: {' / '.join(s['lines'])}" for s in result["ranking"]),
        [report],
    )


def _overview(store: Store, config: Config) -> dict[str, Any]:
    with store.reader() as session:
        return deployment_status(session, config, utcnow())


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
        return [
            run_bakeoff(workdir, port, console)
            if s == "bakeoff"
            else run_scenario(s, workdir, port, console, timeout)
            for s in scenarios
        ]
    finally:
        from controller.serving import app as serving

        serving.stop()


def render_summary(outcomes: list[Outcome]) -> Group:
    table = Table(title="cutover demo", title_justify="left")
    for column in ("scenario", "ended", "expected", "caught in", "requests", "seconds", "why"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        table.add_row(
            o.scenario,
            ", ".join(f"{name} {state}" for name, state in o.states.items()),
            ", ".join(EXPECTED[o.scenario].values()),
            o.caught,
            str(o.requests),
            f"{o.seconds:.0f}",
            o.reason[:300],
            style=None if o.ok else "red",
        )
    reports = "\n".join(
        [f"{o.scenario}: defect caught in {o.caught}" for o in outcomes if o.caught != "-"]
        + [f"report ({o.scenario}): {path.resolve()}" for o in outcomes for path in o.reports]
    )
    return Group(table, reports)
