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


@app.command(rich_help_panel="Review")
def failures(
    ctx: typer.Context,
    bakeoff: Annotated[
        int | None,
        typer.Option(help="A bake-off's (or validation's) run id, instead of a rollout."),
    ] = None,
    clusters: Annotated[
        int | None, typer.Option(help="Group into this many clusters (default: by size).")
    ] = None,
    to_suite: Annotated[
        str | None,
        typer.Option(help="Write one cluster's prompts to this file as a stress suite."),
    ] = None,
    cluster_number: Annotated[
        int, typer.Option("--cluster", help="The cluster --to-suite writes (1: the largest).")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="The clusters as JSON.")] = False,
    rollout: RolloutOpt = None,
) -> None:
    """Failing pairs grouped by what they share: size, tags in common, prompts, examples."""
    from controller.lab.representative import suite_yaml
    from controller.review.failures import (
        bakeoff_failures,
        cluster,
        needs_inputs,
        render_clusters,
        rollout_failures,
    )
    from controller.review.failures import (
        to_suite as suite_of,
    )
    from policies.policy import load_policy
    from policies.probes.clip_score import ClipScorer

    def run() -> None:
        config = cli_config(ctx)
        if bakeoff is not None and rollout is not None:
            raise Refused("give --rollout or --bakeoff, not both")
        plan = None if bakeoff is not None else config.plan(rollout)
        policy = load_policy(plan.policy_path if plan else config.policy_path())
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                try:
                    if plan is None:
                        found = bakeoff_failures(session, bakeoff, policy, config.artifact_path)
                        source = f"bake-off run {bakeoff}"
                    else:
                        row = get_rollout(session, plan.name)
                        found = rollout_failures(session, row, policy, config.artifact_path)
                        source = f"rollout {plan.name}"
                except ValueError as exc:
                    raise Refused(str(exc)) from None
        clip = ClipScorer(policy.clip_model) if policy.clip_model else None
        groups = cluster(found, clusters, clip)
        if to_suite is not None:
            chosen = next((g for g in groups if g.number == cluster_number), None)
            if chosen is None:
                raise Refused(
                    f"--cluster {cluster_number}: {source} has {len(groups)} failure clusters"
                    + ("" if groups else " (no failing pairs)")
                )
            name = Path(to_suite).stem.lower().replace("_", "-")
            try:
                suite = suite_of(chosen, name, source)
            except ValueError as exc:
                raise Refused(str(exc)) from None
            Path(to_suite).write_text(suite_yaml(suite), encoding="utf-8")
            left_out = needs_inputs(chosen)
            if left_out:
                err.print(
                    f"left out {len(left_out)} edits or upscales: the router does not keep "
                    "their input images, so a suite cannot replay them"
                )
            err.print(
                f"wrote {len(suite.items)} prompts of cluster {cluster_number} to {to_suite}; "
                f"check it with `cutover suite check {to_suite}`, then validate with it "
                "(routes.<route>.suites) or `cutover bakeoff --suite` it"
            )
        if as_json:
            sys.stdout.write(
                json.dumps(
                    {
                        "source": source,
                        "failing_pairs": len(found),
                        "clusters": [g.as_dict() for g in groups],
                    },
                    indent=2,
                )
                + "\n"
            )
        else:
            out.print(render_clusters(source, len(found), groups))

    guarded(run)
