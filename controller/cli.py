"""`cutover`: the release engineer's verbs, over the same SQL the router and loop use.

Exit codes: 0 done; 2 refused or invalid input (the message says why and what
to do); 1 the environment failed (database unreachable, and the like).
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from controller.config import Config, ConfigError, find_config_path, load_config
from controller.logs import configure_logging
from controller.rollout import Command, Refusal, Verb
from controller.status import event_dict, render_history, render_status, rollout_status
from controller.store import Store, StoreError
from controller.tables import RolloutEvent
from controller.transitions import RolloutNotFound, apply_command, create_rollout, get_rollout

EXIT_REFUSED = 2
EXIT_ENVIRONMENT = 1

app = typer.Typer(
    help="Shadow traffic and staged cutover for image-generation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
models_app = typer.Typer(help="Model pipelines.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    config_path: str | None
    actor: str


class Refused(Exception):
    """A refusal to show the user and exit 2 with."""


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "-c", "--config", help="Config file (else $CUTOVER_CONFIG, else ./cutover.yaml)."
        ),
    ] = None,
    actor: Annotated[
        str | None, typer.Option(help="Who is acting, for the audit trail (default: OS user).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    configure_logging(level=log_level)
    ctx.obj = Context(config_path=config, actor=actor or _os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _config(ctx: typer.Context) -> Config:
    return load_config(find_config_path(ctx.obj.config_path))


@contextmanager
def _store(config: Config) -> Iterator[Store]:
    store = Store(config.resolved_database_url)
    try:
        yield store
    finally:
        store.close()


def _run(fn: Any) -> Any:
    """Turn the errors a user can fix into a message and an exit code, never a traceback."""
    try:
        return fn()
    except (ConfigError, RolloutNotFound, StoreError, Refused) as exc:
        err.print(
            f"[red]error:[/red] {exc}"
            if not isinstance(exc, Refused)
            else f"[red]refused:[/red] {exc}"
        )
        raise typer.Exit(EXIT_REFUSED) from None
    except OperationalError as exc:
        err.print(f"[red]error:[/red] cannot use the database: {exc.orig or exc}")
        raise typer.Exit(EXIT_ENVIRONMENT) from None


@app.command()
def init(ctx: typer.Context) -> None:
    """Create the database tables (migrations) and the rollout described by the config."""

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.upgrade()
            row, created = create_rollout(store, config, ctx.obj.actor)
            stored = [name for name, _ in row.stages]
            wanted = [s.name for s in config.stages]
            if created:
                out.print(
                    f"created rollout [bold]{row.name}[/bold] at stage {stored[0]} ({store.safe_url})"
                )
            else:
                out.print(
                    f"rollout [bold]{row.name}[/bold] already exists: {row.state} at stage "
                    f"{stored[row.stage_index]} (nothing changed)"
                )
                if stored != wanted:
                    err.print(
                        f"[yellow]warning:[/yellow] the stored stages {stored} differ from the config's "
                        f"{wanted}; the stored ones stay in force. Use a new rollout name to change them."
                    )

    _run(run)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.upgrade(revision)
            out.print(f"database at {store.safe_url} is at revision {store.current_revision()}")

    _run(run)


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target, e.g. base.")]
) -> None:
    """Undo migrations down to REVISION (`base` removes every cutover table and its data)."""

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.downgrade(revision)
            out.print(
                f"database at {store.safe_url} is at revision {store.current_revision() or 'base'}"
            )

    _run(run)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object, stable keys, for scripts.")
    ] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Where the rollout is, its traffic split, its gates and the latest verdict per check."""

    def read(config: Config, store: Store) -> dict[str, Any]:
        with store.reader() as session:
            return rollout_status(session, get_rollout(session, config.name), config)

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.require_schema()
            if not watch:
                snapshot = read(config, store)
                if as_json:
                    sys.stdout.write(json.dumps(snapshot, sort_keys=True) + "\n")
                else:
                    out.print(render_status(snapshot))
                return
            from rich.live import Live

            with Live(render_status(read(config, store)), console=out, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(render_status(read(config, store)), refresh=True)
                except KeyboardInterrupt:
                    pass

    _run(run)


@app.command()
def history(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one event each.")] = False,
    limit: Annotated[int, typer.Option(help="Newest N events.")] = 100,
) -> None:
    """The audit trail: every transition, who made it, why, and the verdict it relied on."""

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.require_schema()
            with store.reader() as session:
                row = get_rollout(session, config.name)
                events = session.scalars(
                    select(RolloutEvent)
                    .where(RolloutEvent.rollout_id == row.id)
                    .order_by(RolloutEvent.version.desc())
                    .limit(limit)
                ).all()
                rows = [event_dict(e) for e in reversed(events)]
        if as_json:
            sys.stdout.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        else:
            out.print(render_history(rows))

    _run(run)


def _act(ctx: typer.Context, command: Command, expected_stage: str | None = None) -> None:
    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.require_schema()
            result = apply_command(
                store, config, command, ctx.obj.actor, expected_stage=expected_stage
            )
        if isinstance(result, Refusal):
            raise Refused(result.reason)
        forced = " [yellow](forced)[/yellow]" if result.forced else ""
        out.print(
            f"{command.verb.value}: {result.from_state}@{result.from_stage} → "
            f"[bold]{result.to_state}@{result.to_stage}[/bold]{forced} (event {result.version}: {result.reason})",
            soft_wrap=True,
        )

    _run(run)


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Override unmet gates (needs --reason; recorded).")
]


@app.command()
def advance(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", help="Jump to this later stage.")] = None,
    force: ForceOpt = False,
    reason: ReasonOpt = "",
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Only if the rollout is still at this stage.")
    ] = None,
) -> None:
    """Move to the next stage (or --to a later one) once the stage's gates are met."""
    _act(ctx, Command(Verb.ADVANCE, reason=reason, force=force, to=to), expected_stage=from_stage)


@app.command()
def promote(
    ctx: typer.Context,
    full: Annotated[
        bool, typer.Option("--full", help="Skip the remaining stages: straight to 100%.")
    ] = False,
    force: ForceOpt = False,
    reason: ReasonOpt = "",
) -> None:
    """Advance one stage, or with --full straight to the last stage (gates still apply)."""

    def run() -> str | None:
        if not full:
            return None
        config = _config(ctx)
        with _store(config) as store, store.reader() as session:
            return [name for name, _ in get_rollout(session, config.name).stages][-1]

    _act(ctx, Command(Verb.ADVANCE, reason=reason, force=force, to=_run(run)))


@app.command()
def pause(ctx: typer.Context, reason: ReasonOpt = "") -> None:
    """Freeze the rollout where it is (traffic split unchanged)."""
    _act(ctx, Command(Verb.PAUSE, reason=reason))


@app.command()
def resume(ctx: typer.Context, reason: ReasonOpt = "") -> None:
    """Continue a paused rollout."""
    _act(ctx, Command(Verb.RESUME, reason=reason))


@app.command()
def rollback(
    ctx: typer.Context, reason: Annotated[str, typer.Option("--reason", help="Why (required).")]
) -> None:
    """Send all traffic back to the incumbent and stop mirroring."""
    _act(ctx, Command(Verb.ROLLBACK, reason=reason))


@app.command()
def retry(ctx: typer.Context, reason: ReasonOpt = "") -> None:
    """Start a rolled-back rollout again from the first stage."""
    _act(ctx, Command(Verb.RETRY, reason=reason))


@app.command()
def finalize(ctx: typer.Context, reason: ReasonOpt = "") -> None:
    """Make the promoted candidate the incumbent; the rollout ends."""
    _act(ctx, Command(Verb.FINALIZE, reason=reason))


@app.command()
def abort(ctx: typer.Context, reason: ReasonOpt = "") -> None:
    """End the rollout for good, all traffic on the incumbent."""
    _act(ctx, Command(Verb.ABORT, reason=reason))


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[str, typer.Argument(help="Where to save the pipeline.")],
    seed: Annotated[
        int | None, typer.Option(help="Weight seed (default: derived from --variant).")
    ] = None,
    variant: Annotated[
        str, typer.Option(help="A name; different names give different weights.")
    ] = "incumbent",
) -> None:
    """Build a tiny random-weight Stable Diffusion pipeline offline (loaded back with from_pretrained)."""
    from workers.tiny import make_tiny_pipeline

    path = make_tiny_pipeline(directory, seed=seed, variant=variant)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    out.print(f"tiny pipeline {variant!r} saved to {path} ({size / 1e6:.1f} MB)")


@app.command()
def serve(
    ctx: typer.Context,
    address: Annotated[
        str | None, typer.Option(help="An existing Ray cluster (default: start a local one).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: server.port).")] = None,
) -> None:
    """Deploy the incumbent, the candidate and the router on Ray Serve; run until interrupted."""
    import signal
    import threading

    from controller import app as serving

    def run() -> None:
        config = load_config(find_config_path(ctx.obj.config_path), check_paths=True)
        with _store(config) as store:
            store.require_schema()
        serving.start(config, address, http_port=port)
        from controller.loop import ControllerLoop

        stopped = threading.Event()
        loop = threading.Thread(
            target=ControllerLoop(config).run,
            args=(stopped,),
            name="cutover-controller",
            daemon=True,
        )
        loop.start()
        out.print(
            f"serving rollout [bold]{config.name}[/bold] on http://{config.server.host}:"
            f"{port or config.server.port}/v1/images/generations (Ctrl-C stops)"
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        try:
            stopped.wait()
        finally:
            loop.join(timeout=30)
            serving.stop()

    _run(run)


@app.command()
def control(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One evaluation, then exit.")] = False,
) -> None:
    """Run the controller loop: score outputs, judge, roll back or advance (one active loop per rollout)."""
    import signal
    import threading

    from controller.loop import ControllerLoop

    def run() -> None:
        config = _config(ctx)
        with _store(config) as store:
            store.require_schema()
            loop = ControllerLoop(config, store)
            if once:
                result = loop.tick()
                action = result.action
                what = (
                    ""
                    if action is None
                    else f"; {getattr(action, 'to_state', None) or action.reason}"
                )
                out.print(
                    f"leader={result.leader} scored={result.scored} verdict={result.verdict}{what}",
                    soft_wrap=True,
                )
                return
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            out.print(
                f"controller loop for [bold]{config.name}[/bold] every "
                f"{config.rollout.evaluation_interval:g}s (Ctrl-C stops)"
            )
            loop.run(stop)

    _run(run)


@app.command()
def calibrate(
    ctx: typer.Context,
    repeats: Annotated[int, typer.Option(help="Rounds over the prompt set.")] = 1,
    prompts: Annotated[str | None, typer.Option(help="A file with one prompt per line.")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
) -> None:
    """A/A: the incumbent against itself (other seeds); prints each metric's noise floor and a tolerance."""
    from rich.table import Table

    from policies.calibrate import calibrate as run_calibration
    from policies.calibrate import default_prompts
    from policies.policy import load_policy

    def run() -> None:
        config = load_config(find_config_path(ctx.obj.config_path), check_paths=True)
        policy = load_policy(config.base_dir / config.policy if config.policy else None)
        texts = (
            [line.strip() for line in open(prompts, encoding="utf-8") if line.strip()]
            if prompts
            else default_prompts()
        )
        floors = run_calibration(config, texts, repeats, policy.ocr_engine, size)
        table = Table(
            title=f"A/A noise floor of {config.models.incumbent.pipeline}", title_justify="left"
        )
        for column in ("metric", "pairs", "mean", "p95", "suggested tolerance", "how"):
            table.add_column(column)
        for f in floors:
            table.add_row(
                f.metric,
                str(f.pairs),
                f"{f.mean:.4g}",
                f"{f.p95:.4g}",
                f"{f.suggested:.4g}",
                f.note,
            )
        out.print(table)

    _run(run)


@app.command("shadow-log")
def shadow_log_command(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="A duration back from now (30m, 2h) or an ISO time.")
    ] = None,
    stage: Annotated[str | None, typer.Option(help="Requests that arrived in this stage.")] = None,
    role: Annotated[
        str | None, typer.Option(help="Requests this role served (incumbent or candidate).")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="Pairs with an output of this status (error, oom, ...).")
    ] = None,
    failing: Annotated[
        str | None, typer.Option(help="Pairs on the wrong side of this check's tolerance.")
    ] = None,
    prompt_contains: Annotated[
        str | None, typer.Option(help="Prompts containing this text.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one pair each.")] = False,
) -> None:
    """Recorded pairs for review: both sides' status, latency, scores and image paths."""
    from datetime import datetime, timedelta

    from controller.config import parse_duration
    from controller.shadow_log import Filters, shadow_log
    from controller.status import render_shadow_log
    from controller.tables import utcnow
    from policies.policy import load_policy

    def when(text: str) -> datetime:
        try:
            return utcnow() - timedelta(seconds=parse_duration(text))
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise Refused(
                f"--since {text!r} is neither a duration (30m, 2h) nor an ISO time"
            ) from None
        return moment if moment.tzinfo else moment.astimezone()

    def run() -> None:
        if role is not None and role not in ("incumbent", "candidate"):
            raise Refused(f"--role {role!r}: use incumbent or candidate")
        config = _config(ctx)
        policy = load_policy(config.base_dir / config.policy if config.policy else None)
        filters = Filters(
            when(since) if since else None, stage, role, status, failing, prompt_contains, limit
        )
        with _store(config) as store:
            store.require_schema()
            with store.reader() as session:
                try:
                    rows = shadow_log(
                        session,
                        get_rollout(session, config.name),
                        policy,
                        filters,
                        config.artifact_path,
                    )
                except ValueError as exc:
                    raise Refused(str(exc)) from None
        if as_json:
            sys.stdout.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        else:
            out.print(render_shadow_log(rows))

    _run(run)


@app.command()
def report(
    ctx: typer.Context,
    out_path: Annotated[
        str, typer.Option("--out", help="Where to write the HTML file.")
    ] = "report.html",
) -> None:
    """One self-contained HTML report: timeline, checks over time, latency, pairs worst first, failures."""
    from controller.report import build_report
    from policies.policy import load_policy

    def run() -> None:
        config = _config(ctx)
        policy = load_policy(config.base_dir / config.policy if config.policy else None)
        with _store(config) as store:
            store.require_schema()
            with store.reader() as session:
                html = build_report(session, get_rollout(session, config.name), config, policy)
        target = Path(out_path)
        target.write_text(html, encoding="utf-8")
        out.print(f"report written to {target.resolve()} ({len(html) / 1e6:.1f} MB)")

    _run(run)


@app.command()
def demo(
    scenario: Annotated[str, typer.Option(help="healthy, regression or both.")] = "both",
    workdir: Annotated[
        str, typer.Option(help="Where models, database, artifacts and reports go.")
    ] = ".cutover/demo",
    timeout: Annotated[
        float, typer.Option(help="Seconds a scenario may take before it counts as failed.")
    ] = 600,
) -> None:
    """The playbook end to end on tiny CPU models: a healthy candidate reaches 100%, a regressed one rolls back."""
    from controller.demo import EXPECTED, render_summary, run_demo

    if scenario not in ("healthy", "regression", "both"):
        err.print(f"[red]refused:[/red] --scenario {scenario!r}: use healthy, regression or both")
        raise typer.Exit(EXIT_REFUSED)
    scenarios = list(EXPECTED) if scenario == "both" else [scenario]
    outcomes = _run(lambda: run_demo(scenarios, Path(workdir), out, timeout))
    out.print(render_summary(outcomes))
    if not all(o.ok for o in outcomes):
        err.print("[red]the demo did not end as expected[/red]")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
