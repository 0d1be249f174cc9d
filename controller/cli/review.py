"""The SRE's review: the shadow log of recorded pairs, and the self-contained HTML report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from controller.cli.core import (
    Refused,
    RolloutOpt,
    app,
    cli_config,
    err,
    guarded,
    open_store,
    out,
)
from controller.rollout.transitions import get_rollout
from policies.vocabulary import ARMS


@app.command("shadow-log", rich_help_panel="Review")
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
    before: Annotated[
        str | None,
        typer.Option(help="Only requests older than this request id: the next page."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one pair each.")] = False,
    rollout_name: RolloutOpt = None,
) -> None:
    """Recorded pairs for review: both sides' status, latency, scores and image paths."""
    from datetime import datetime, timedelta

    from controller.review.shadow_log import Filters, shadow_log
    from controller.review.status import render_shadow_log
    from controller.storage.tables import utcnow
    from policies.policy import load_policy
    from workers.config import parse_duration

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
        if role is not None and role not in ARMS:
            raise Refused(f"--role {role!r}: use incumbent or candidate")
        config = cli_config(ctx)
        plan = config.plan(rollout_name)
        policy = load_policy(plan.policy_path)
        # One row more than asked: it tells whether the listing was cut at --limit.
        filters = Filters(
            when(since) if since else None,
            stage,
            role,
            status,
            failing,
            prompt_contains,
            limit + 1,
            before,
        )
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                try:
                    rollout = get_rollout(session, plan.name)
                    rows = shadow_log(
                        session,
                        rollout,
                        policy,
                        filters,
                        config.artifact_path,
                    )
                except ValueError as exc:
                    raise Refused(str(exc)) from None
        cut = len(rows) > limit
        if cut:
            # A page ends between requests, so the next page (--before) misses no image.
            split = rows[limit]["request_id"]
            whole = [r for r in rows[:limit] if r["request_id"] != split]
            rows = whole or rows[:limit]
        if cut:
            err.print(
                f"showing {limit} pairs, newest first; more match. The next page: "
                f"--before {rows[-1]['request_id']}. --since/--stage narrow it"
            )
        if as_json:
            sys.stdout.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        else:
            out.print(render_shadow_log(rows))

    guarded(run)


@app.command(rich_help_panel="Review")
def report(
    ctx: typer.Context,
    out_path: Annotated[
        str, typer.Option("--out", help="Where to write the HTML file.")
    ] = "report.html",
    rollout: RolloutOpt = None,
) -> None:
    """One self-contained HTML report: timeline, checks over time, latency, pairs worst first, failures."""
    from controller.review.report import build_report
    from policies.policy import load_policy

    def run() -> None:
        config = cli_config(ctx)
        plan = config.plan(rollout)
        policy = load_policy(plan.policy_path)
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                html = build_report(session, get_rollout(session, plan.name), config, policy)
        target = Path(out_path)
        target.write_text(html, encoding="utf-8")
        out.print(f"report written to {target.resolve()} ({len(html) / 1e6:.1f} MB)")

    guarded(run)
