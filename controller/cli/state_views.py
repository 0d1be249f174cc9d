"""Read-only views of a rollout: `status` (where it is and why) and `history` (the audit trail)."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from sqlalchemy import select

from controller.cli.core import RolloutOpt, app, cli_config, guarded, open_store, out
from controller.config import Config
from controller.operations.dispatcher import delivery_summary
from controller.review.status import (
    deployment_status,
    event_dict,
    render_history,
    render_overview,
    render_status,
    rollout_status,
)
from controller.rollout.transitions import get_rollout
from controller.storage.store import Store
from controller.storage.tables import RolloutEvent


@app.command(rich_help_panel="Rollout")
def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object, stable keys, for scripts.")
    ] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
    rollout: Annotated[
        str | None, typer.Option("--rollout", "-r", help="Only this rollout, in full.")
    ] = None,
) -> None:
    """Every route and rollout at a glance: traffic split, gates, latest verdict per check.

    With --rollout, that rollout alone (its JSON is the `rollouts[]` entry of the whole)."""

    def read(config: Config, store: Store) -> dict[str, Any]:
        with store.reader() as session:
            if rollout is not None:
                name = config.plan(rollout).name
                return rollout_status(session, get_rollout(session, name), config)
            snapshot = deployment_status(session, config)
        # Where each receiver's notifications stand (delivered, waiting, why).
        snapshot["notifications"] = delivery_summary(store, config.notifications)
        return snapshot

    def render(snapshot: dict[str, Any]) -> Any:
        return render_status(snapshot) if rollout is not None else render_overview(snapshot)

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            if not watch:
                snapshot = read(config, store)
                if as_json:
                    sys.stdout.write(json.dumps(snapshot, sort_keys=True) + "\n")
                else:
                    out.print(render(snapshot))
                return
            from rich.live import Live

            with Live(render(read(config, store)), console=out, auto_refresh=False) as live:
                try:
                    while True:
                        time.sleep(interval)
                        live.update(render(read(config, store)), refresh=True)
                except KeyboardInterrupt:
                    pass

    guarded(run)


@app.command(rich_help_panel="Rollout")
def history(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one event each.")] = False,
    limit: Annotated[int, typer.Option(help="Newest N events.")] = 100,
    rollout: RolloutOpt = None,
) -> None:
    """The audit trail: every transition, who made it, why, and the verdict it relied on."""

    def run() -> None:
        config = cli_config(ctx)
        name = config.plan(rollout).name
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                row = get_rollout(session, name)
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

    guarded(run)
