"""Long-running commands: `serve` (Ray Serve plus the loop), `control` (the loop alone), `demo`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.core import (
    EXIT_REFUSED,
    RolloutOpt,
    app,
    cli_config,
    err,
    guarded,
    open_store,
    out,
)
from controller.storage.store import Store
from workers.logs import follow, log_to_file


@app.command(rich_help_panel="Run")
def serve(
    ctx: typer.Context,
    address: Annotated[
        str | None, typer.Option(help="An existing Ray cluster (default: start a local one).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: server.port).")] = None,
) -> None:
    """Deploy every model in use and the router on Ray Serve, run the controller loop; until interrupted."""
    import signal
    import threading

    from controller.serving import app as serving

    def run() -> None:
        config = cli_config(ctx, check_paths=True)
        with open_store(config) as store:
            store.require_schema()
        stopped = threading.Event()
        # Every replica appends its events to one file; show them here, beside our own.
        log_to_file(config.log_path)
        follower = threading.Thread(
            target=follow,
            args=(config.log_path, stopped, _to_stderr),
            kwargs={"skip_pid": os.getpid()},
            name="cutover-log-follower",
            daemon=True,
        )
        follower.start()
        serving.start(config, address, http_port=port)
        from controller.rollout.loop import ControllerLoop
        from controller.rollout.scorer_pool import ScorerPool

        pool = ScorerPool(config)
        pool.start()  # `scorer.actors: 0`: none, and the loop scores itself
        loop = threading.Thread(
            target=ControllerLoop(config, score_inline=not pool.actors).run,
            args=(stopped,),
            name="cutover-controller",
            daemon=True,
        )
        loop.start()
        from controller.operations.background import serve_console, start_notifier

        store = Store.for_config(config)
        notifier = start_notifier(config, store)
        try:
            console = serve_console(config, store, config.console.host, config.console.port)
            out.print(
                f"console, admin API and rollout metrics on {console.url}/ "
                "(sign in with a token from `cutover tokens create`)"
            )
        except RuntimeError as exc:  # the port is taken: serving goes on without a console
            console = None
            err.print(
                f"[yellow]warning:[/yellow] {exc}; set console.port, or run `cutover console`"
            )
        out.print(
            f"serving [bold]{config.name}[/bold] (routes {', '.join(r.value for r in config.route_map)}) "
            f"on http://{config.server.host}:{port or config.server.port}/v1/images/ (Ctrl-C stops); events of "
            f"every replica are shown here and kept in {config.log_path}",
            soft_wrap=True,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        try:
            stopped.wait()
        finally:
            loop.join(timeout=30)
            if console is not None:
                console.stop()
            notifier.stop()
            store.close()
            pool.stop()
            serving.stop()
            follower.join(timeout=5)

    guarded(run)


def _to_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


@app.command(rich_help_panel="Run")
def control(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="One evaluation, then exit.")] = False,
    rollout: RolloutOpt = None,
) -> None:
    """Run the controller loop over every rollout (or --rollout): score, judge, roll back or advance.

    Each rollout has its own lease: one active loop acts on it, any other stands by."""
    import signal
    import threading

    from controller.rollout.loop import ControllerLoop

    def run() -> None:
        config = cli_config(ctx)
        log_to_file(config.log_path)
        with open_store(config) as store:
            store.require_schema()
            names = [config.plan(rollout).name] if rollout else None
            loop = ControllerLoop(config, store, rollouts=names)
            if once:
                try:
                    results = loop.tick()
                finally:
                    loop.release()  # or the serve loop could not act until the lease expired
                for name, result in results.items():
                    if result is None:
                        out.print(
                            f"{name}: the tick failed (see the log event controller_tick_failed)"
                        )
                        continue
                    action = result.action
                    what = (
                        ""
                        if action is None
                        else f"; {getattr(action, 'to_state', None) or action.reason}"
                    )
                    standby = "" if result.leader else " (standby: another loop holds the lease)"
                    out.print(
                        f"{name}: leader={result.leader} scored={result.scored} "
                        f"verdict={result.verdict}{what}{standby}",
                        soft_wrap=True,
                    )
                return
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            out.print(
                f"controller loop for [bold]{', '.join(loop.names)}[/bold] every "
                f"{loop.interval:g}s (Ctrl-C stops)"
            )
            from controller.operations.background import start_notifier

            notifier = start_notifier(config, store)  # the outbox's deliveries
            try:
                loop.run(stop)
            finally:
                notifier.stop()

    guarded(run)


@app.command(rich_help_panel="Run")
def demo(
    scenario: Annotated[
        str,
        typer.Option(help="healthy, regression, edit (two routes), slice, bakeoff, or all."),
    ] = "all",
    workdir: Annotated[
        str, typer.Option(help="Where models, database, artifacts and reports go.")
    ] = ".cutover/demo",
    timeout: Annotated[
        float, typer.Option(help="Seconds a scenario may take before it counts as failed.")
    ] = 600,
) -> None:
    """The playbook end to end on tiny CPU models: each candidate validated first; a healthy one
    reaches 100%, a regressed one rolls back, an img2img candidate's 1% edit canary runs beside
    a generate rollout, a candidate that garbles only long quoted text is caught on that slice,
    and a bake-off ranks four variants against the incumbent."""
    from controller.demo import EXPECTED, render_summary, run_demo

    if scenario not in (*EXPECTED, "all", "both"):
        err.print(
            f"[red]refused:[/red] --scenario {scenario!r}: use healthy, regression, edit, slice, bakeoff or all"
        )
        raise typer.Exit(EXIT_REFUSED)
    scenarios = list(EXPECTED) if scenario in ("all", "both") else [scenario]
    outcomes = guarded(lambda: run_demo(scenarios, Path(workdir), out, timeout))
    out.print(render_summary(outcomes))
    if not all(o.ok for o in outcomes):
        err.print("[red]the demo did not end as expected[/red]")
        raise typer.Exit(1)
