"""What `cutover status` and `cutover history` show: one dict for scripts, one table for people.

The JSON keys are a stable interface (documented in docs/runbook.md); the
rich tables are free to change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Config
from controller.rollout.state_machine import RolloutView, State, human_duration
from controller.rollout.transitions import evidence_for, view_of
from controller.serving.traffic import routing_table
from controller.storage.tables import Rollout, RolloutEvent, utcnow
from policies.vocabulary import ARMS, FAIL, PASS, Arm
from workers.jobs import OutputStatus

STATUS_SCHEMA = 2
NOT_STARTED = "not_started"  # a rollout in the config that `cutover init` has not created yet


def deployment_status(
    session: Session, config: Config, now: datetime | None = None
) -> dict[str, Any]:
    """Every route and every rollout at a glance: what serves each route, and where its
    rollout stands (the full status of each rollout under `rollouts`)."""
    now = now or utcnow()
    plans = config.plans()
    rows = {
        row.name: row
        for row in session.scalars(select(Rollout).where(Rollout.name.in_(list(plans))))
    }
    rollouts = {
        name: rollout_status(session, rows[name], config, now)
        if name in rows
        else {"rollout": name, "route": plan.route.value, "state": NOT_STARTED}
        for name, plan in plans.items()
    }
    by_route = {plan.route: name for name, plan in plans.items()}
    routes = []
    for route, settings in config.route_map.items():
        name = by_route.get(route)
        status = rollouts.get(name) if name else None
        routes.append(
            {
                "route": route.value,
                "model": settings.model,
                "fallback": settings.fallback,
                "fallback_after_s": settings.fallback_after,
                "rollout": name,
                "candidate": plans[name].candidate if name else None,
                "state": status["state"] if status else None,
                "stage": status.get("stage") if status else None,
                "weights": status.get("weights") if status else None,
            }
        )
    return {
        "schema": STATUS_SCHEMA,
        "deployment": config.name,
        "routes": routes,
        "rollouts": list(rollouts.values()),
    }


def rollout_status(
    session: Session, row: Rollout, config: Config, now: datetime | None = None
) -> dict[str, Any]:
    now = now or utcnow()
    plan = config.plan(row.name)
    view = view_of(row)
    evidence = evidence_for(session, row, config, now)
    verdict = evidence.verdict_snapshot  # read once, by evidence_for
    table = routing_table(plan, view, row.version)
    stage = view.stage.name
    max_duration = plan.for_stage("max_duration", stage)
    ready = view.state in (State.SHADOWING, State.CANARY) and not evidence.unmet()
    last_event = session.scalars(
        select(RolloutEvent)
        .where(RolloutEvent.rollout_id == row.id)
        .order_by(RolloutEvent.version.desc())
        .limit(1)
    ).one_or_none()
    return {
        "schema": STATUS_SCHEMA,
        "rollout": row.name,
        "route": row.route,
        "models": {Arm.INCUMBENT: plan.incumbent, Arm.CANDIDATE: plan.candidate},
        "state": view.state.value,
        "stage": stage,
        "stage_index": view.stage_index,
        "stages": [s.name for s in view.stages],
        "weights": {Arm.INCUMBENT: table.incumbent_weight, Arm.CANDIDATE: table.candidate_weight},
        "mirror_percent": table.mirror_percent,
        "stage_entered_at": row.stage_entered_at.isoformat(),
        "in_stage_s": round(evidence.elapsed_s, 1),
        "gates": {
            "samples": {
                "have": evidence.samples,
                "need": evidence.min_samples,
                "met": evidence.samples >= evidence.min_samples,
            },
            "min_duration_s": {
                "have": round(evidence.elapsed_s, 1),
                "need": evidence.min_duration_s,
                "met": evidence.elapsed_s >= evidence.min_duration_s,
            },
            "max_duration_s": max_duration,
            "verdict": {
                "have": evidence.verdict,
                "need": PASS,
                "met": evidence.verdict == PASS,
            },
            "scorer_lag_s": {
                "have": None if evidence.scorer_lag_s is None else round(evidence.scorer_lag_s, 1),
                "need": evidence.max_scorer_lag_s,
                "met": evidence.scorer_lag_s is None
                or evidence.scorer_lag_s <= evidence.max_scorer_lag_s,
            },
            # An external approval the stage needs (`approval:`): what it waits for, if anything.
            "approval": {
                "needed": plan.settings.approval_for(stage) is not None,
                "hold": evidence.approval_hold,
                "met": not evidence.approval_hold,
            },
        },
        "ready_to_advance": ready,
        "next": _next_step(view, evidence.unmet(), ready),
        "verdict": None
        if verdict is None
        else {
            "decision": verdict["decision"],
            "evaluated_at": verdict["evaluated_at"],
            "samples": verdict["samples"],
        },
        "checks": [] if verdict is None else [_check_row(c) for c in verdict["checks"]],
        "cost": None
        if verdict is None
        else cost_per_image(verdict["checks"], config.price_per_gpu_hour),
        # Where a check FAILs on a slice of prompts only (policies/slices.py), in words.
        "slices": [] if verdict is None else list(verdict.get("slices") or []),
        "version": row.version,
        "candidate": row.candidate,
        "incumbent": row.incumbent,
        "last_event": None if last_event is None else event_dict(last_event),
        "why": _why(view, last_event),
    }


def _why(view: RolloutView, last_event: RolloutEvent | None) -> dict[str, Any] | None:
    """Why a rollout stopped moving (rolled back, paused, aborted): who did it, when and the
    reason, so an automatic rollback is the first thing `status` says, not a history search."""
    if last_event is None or view.state not in (State.ROLLED_BACK, State.PAUSED, State.ABORTED):
        return None
    return {
        "verb": last_event.verb,
        "actor": last_event.actor,
        "at": last_event.at.isoformat(),
        "automatic": last_event.actor.startswith("controller"),
        "reason": last_event.reason,
    }


def _check_row(check: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "decision", "estimate", "lower", "upper", "alpha", "critical", "reason")
    return {k: check.get(k) for k in keys}


def cost_per_image(
    checks: list[dict[str, Any]], price_per_gpu_hour: float | None
) -> dict[str, Any] | None:
    """Each arm's median GPU-seconds per image from the policy's gpu_seconds quantile check,
    and, with a price, its cost per 1,000 images; None without such a check, or before both
    arms have one."""
    found = next((c for c in checks if (c.get("arms") and c.get("metric") == "gpu_seconds")), None)
    if found is None or None in found["arms"].values():
        return None  # no GPU-seconds on an arm yet
    arms = found["arms"]
    cost = {}
    if price_per_gpu_hour:
        cost = {arm: seconds / 3600 * price_per_gpu_hour * 1000 for arm, seconds in arms.items()}
    return {"gpu_seconds_p50": arms, "usd_per_1k_images": cost or None, "check": found["name"]}


def _next_step(view: RolloutView, holds: list[str], ready: bool) -> str:
    if view.state in (State.FINALIZED, State.ABORTED):
        return f"nothing: the rollout is {view.state.value}"
    if view.state is State.PAUSED:
        return "paused: `cutover resume` to continue, or `cutover rollback --reason ...`"
    if view.state is State.ROLLED_BACK:
        return "rolled back: `cutover retry` starts again from the first stage"
    if view.state is State.PROMOTED:
        return "candidate serves 100%: `cutover finalize` to make it the incumbent"
    if ready:
        return "ready to advance: `cutover advance`"
    return "waiting: " + "; ".join(holds)


def event_dict(event: RolloutEvent) -> dict[str, Any]:
    return {
        "version": event.version,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "verb": event.verb,
        "from_state": event.from_state,
        "from_stage": event.from_stage,
        "to_state": event.to_state,
        "to_stage": event.to_stage,
        "reason": event.reason,
        "forced": event.forced,
        "verdict": event.verdict,
    }


def render_overview(overview: dict[str, Any]) -> Group:
    """Routes first (what serves each, which rollout runs there), then each rollout in full."""
    routes = Table(title=f"routes of {overview['deployment']}", title_justify="left")
    for column in ("route", "model", "fallback", "rollout", "candidate", "state", "traffic"):
        routes.add_column(column)
    for r in overview["routes"]:
        weights = r["weights"]
        traffic = f"{weights['incumbent']}% / {weights['candidate']}%" if weights else "100% / -"
        fallback = r["fallback"] or "-"
        if r["fallback"] and r["fallback_after_s"] is not None:
            fallback += f" after {r['fallback_after_s']:g}s"
        routes.add_row(
            r["route"],
            r["model"],
            fallback,
            r["rollout"] or "-",
            r["candidate"] or "-",
            f"{r['state']}@{r['stage']}" if r["stage"] else (r["state"] or "-"),
            traffic,
        )
    parts: list[Any] = [routes]
    if overview.get("notifications"):
        parts.append(render_deliveries(overview["notifications"]))
    for status in overview["rollouts"]:
        if status["state"] == NOT_STARTED:
            parts.append(
                Text(
                    f"rollout {status['rollout']}: not started (run `cutover init`)", style="yellow"
                )
            )
        else:
            parts.append(render_status(status))
    return Group(*parts)


def render_deliveries(receivers: list[dict[str, Any]]) -> Table:
    """The notification receivers: what is delivered, what waits, and why it waits."""
    table = Table(title="notifications", title_justify="left")
    for column in ("receiver", "delivered", "pending", "oldest pending", "attempts", "last error"):
        table.add_column(column)
    for r in receivers:
        table.add_row(
            r["receiver"],
            str(r["delivered"]),
            Text(str(r["pending"]), style="yellow" if r["pending"] else ""),
            _seconds(r["oldest_pending_s"]),
            str(r["max_attempts"]),
            (r["last_error"] or "")[:80],
        )
    return table


def render_status(status: dict[str, Any]) -> Group:
    """The status as a person reads it: where the rollout is, and what holds it."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    state_style = {"rolled_back": "red", "aborted": "red", "paused": "yellow", "finalized": "green"}
    stages = "  ".join(
        f"[reverse]{name}[/reverse]" if i == status["stage_index"] else name
        for i, name in enumerate(status["stages"])
    )
    gates = status["gates"]
    head.add_row("rollout", f"{status['rollout']} (route {status['route']})")
    head.add_row("state", Text(status["state"], style=state_style.get(status["state"], "cyan")))
    why = status.get("why")
    if why:
        how = "automatically by" if why["automatic"] else "by"
        head.add_row(
            "why",
            Text(
                f"{why['verb']} {how} {why['actor']} at {why['at'][:19]}Z: {why['reason']}",
                style=f"bold {state_style.get(status['state'], 'yellow')}",
            ),
        )
    head.add_row("stage", stages)
    head.add_row(
        "traffic",
        f"incumbent {status['models']['incumbent']} {status['weights']['incumbent']}%  "
        f"candidate {status['models']['candidate']} {status['weights']['candidate']}%  "
        f"mirrored {status['mirror_percent']:g}%",
    )
    head.add_row(
        "samples",
        _gate(gates["samples"]["met"], f"{gates['samples']['have']}/{gates['samples']['need']}"),
    )
    head.add_row(
        "in stage",
        _gate(
            gates["min_duration_s"]["met"],
            f"{_seconds(status['in_stage_s'])} (min {_seconds(gates['min_duration_s']['need'])}, "
            f"max {_seconds(gates['max_duration_s'])})",
        ),
    )
    head.add_row(
        "verdict", _gate(gates["verdict"]["met"], str(gates["verdict"]["have"] or "none yet"))
    )
    lag = gates["scorer_lag_s"]
    head.add_row(
        "scorer lag",
        _gate(
            lag["met"],
            f"{'caught up' if lag['have'] is None else _seconds(lag['have'])} "
            f"(max {_seconds(lag['need'])})",
        ),
    )
    approval = gates.get("approval")
    if approval and approval["needed"]:
        head.add_row("approval", _gate(approval["met"], approval["hold"] or "approved"))
    head.add_row("next", status["next"])
    parts: list[Any] = [head]
    cost = status.get("cost")
    if cost:
        seconds = cost["gpu_seconds_p50"]
        dollars = cost["usd_per_1k_images"] or {}
        head.add_row(
            "cost per image",
            ", ".join(
                f"{arm} {seconds[arm]:.3g} GPU-s"
                + (f" (${dollars[arm]:.3g} per 1k)" if arm in dollars else "")
                for arm in ("candidate", "incumbent")
                if arm in seconds
            ),
        )
    if status["checks"]:
        checks = Table(title="latest verdict per check", title_justify="left")
        for column in ("check", "decision", "estimate", "bounds", "reason"):
            checks.add_column(column)
        colour = {PASS: "green", FAIL: "red"}
        for check in status["checks"]:
            bounds = _bounds_text(check["lower"], check["upper"])
            estimate = "" if check["estimate"] is None else f"{check['estimate']:.4g}"
            checks.add_row(
                str(check["name"]),
                Text(str(check["decision"]), style=colour.get(str(check["decision"]), "yellow")),
                estimate,
                bounds,
                str(check["reason"] or ""),
            )
        parts.append(checks)
    if status.get("slices"):
        slices = Table(title="slices where the candidate is worse", title_justify="left")
        for column in ("check", "slice", "action", "finding"):
            slices.add_column(column)
        for finding in status["slices"]:
            slices.add_row(
                str(finding["check"]),
                str(finding["slice"]),
                Text(str(finding["action"]), style="red"),
                str(finding["sentence"]),
            )
        parts.append(slices)
    return Group(*parts)


def render_history(events: list[dict[str, Any]]) -> Table:
    table = Table(title="rollout history", title_justify="left")
    for column in ("#", "at (UTC)", "actor", "verb", "from", "to"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", ratio=1)
    for e in events:
        forced = " [yellow](forced)[/yellow]" if e["forced"] else ""
        table.add_row(
            str(e["version"]),
            e["at"][5:19].replace("T", " "),
            e["actor"],
            e["verb"],
            f"{e['from_state']}@{e['from_stage']}" if e["from_state"] else "",
            f"{e['to_state']}@{e['to_stage']}",
            e["reason"] + forced,
        )
    return table


def _gate(met: bool, text: str) -> Text:
    return Text(("✓ " if met else "… ") + text, style="green" if met else "yellow")


def _seconds(value: float | None) -> str:
    return "-" if value is None else human_duration(float(value))


def render_shadow_log(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"shadow log ({len(rows)} pairs, newest first)", title_justify="left")
    for column in (
        "at (UTC)",
        "request",
        "stage",
        "served",
        "prompt",
        "incumbent",
        "candidate",
        "scores (cand)",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        sides = []
        for role in ARMS:
            side = row[role]
            latency = "" if side["latency_ms"] is None else f" {side['latency_ms']:.0f}ms"
            sides.append(
                Text(
                    f"{side['status'] or '-'}{latency}",
                    style="green" if side["status"] == OutputStatus.OK else "red",
                )
            )
        scores = ", ".join(
            f"{k} {v:.3g}" for k, v in sorted(row[Arm.CANDIDATE]["scores"].items()) if v is not None
        )
        table.add_row(
            row["created_at"][5:19].replace("T", " "),
            row["request_id"][:8],
            row["stage"],
            row["served_by"],
            row["prompt"],
            *sides,
            scores,
        )
    return table


def _bounds_text(lower: float | None, upper: float | None) -> str:
    """An unbounded end (too few samples for it) is stored as null: shown as an infinity."""
    if lower is None and upper is None:
        return ""
    low = "-inf" if lower is None else f"{lower:.4g}"
    high = "inf" if upper is None else f"{upper:.4g}"
    return f"[{low}, {high}]"
