"""`cutover report`: one self-contained HTML file for the review after (or during) a rollout.

Everything is inside the file (images as data URIs, charts as inline SVG, no
scripts), so it can be attached to a ticket or opened offline. The template is
rendered with autoescaping: a prompt is shown as text, whatever it contains.
"""

from __future__ import annotations

import base64
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from controller.config import Config
from controller.review.failures import cluster, failing_rows, report_clusters
from controller.review.shadow_log import Filters, shadow_log, worst_first
from controller.review.status import event_dict, rollout_status
from controller.storage.artifact_store import ensure_local
from controller.storage.tables import Output, Request, Rollout, RolloutEvent, Verdict
from policies.policy import Policy
from policies.vocabulary import ARMS, Arm
from workers.jobs import OutputStatus

GALLERY_PER_CHECK = 6
FAILURES_SHOWN = 10
FAILURE_SEARCH = 20_000  # requests, newest first
CHART_POINTS = 400  # verdicts per check chart
LATENCY_SAMPLE = 20_000  # newest requests in the latency chart
CHART_W, CHART_H = 520, 140


def build_report(session: Session, rollout: Rollout, config: Config, policy: Policy) -> str:
    env = Environment(
        loader=PackageLoader("controller.review", "templates"),
        autoescape=select_autoescape(default=True),
    )
    events = session.scalars(
        select(RolloutEvent)
        .where(RolloutEvent.rollout_id == rollout.id)
        .order_by(RolloutEvent.version)
    ).all()
    verdicts = verdicts_evenly(session, rollout)
    pairs = shadow_log(session, rollout, policy, Filters(limit=2000), config.artifact_path)
    return env.get_template("report.html.j2").render(
        status=rollout_status(session, rollout, config),
        events=[event_dict(e) for e in events],
        charts=[check_chart(check.name, verdicts) for check in policy.checks],
        latency=_latency_chart(session, rollout),
        galleries=[_gallery(check, pairs) for check in _one_check_per_score(policy)],
        failures=_failures(session, rollout),
        clusters=report_clusters(cluster(failing_rows(pairs, policy))),
    )


def check_chart(name: str, verdicts: list[Verdict]) -> dict[str, Any]:
    """The check's estimate and bounds over evaluations, as SVG polylines."""
    points = [(v.evaluated_at, c) for v in verdicts for c in v.checks if c.get("name") == name]
    series = {key: [c.get(key) for _, c in points] for key in ("lower", "estimate", "upper")}
    values = [x for xs in series.values() for x in xs if x is not None]
    if not values:
        return {"name": name, "empty": True, "latest": None}
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def polyline(xs: list[float | None]) -> str:
        n = max(len(xs) - 1, 1)
        return " ".join(
            f"{i / n * CHART_W:.1f},{CHART_H - (x - low) / span * CHART_H:.1f}"
            for i, x in enumerate(xs)
            if x is not None
        )

    return {
        "name": name,
        "empty": False,
        "w": CHART_W,
        "h": CHART_H,
        "low": low,
        "high": high,
        "lines": {key: polyline(xs) for key, xs in series.items()},
        "latest": points[-1][1],
        "decisions": [c.get("decision") for _, c in points],
    }


def verdicts_evenly(session: Session, rollout: Rollout) -> list[Verdict]:
    """At most CHART_POINTS verdicts, evenly spread over the rollout (a tick stores one every
    interval: 26,000 in 72 hours at 10 s, more than a chart can show or a report should load)."""
    total = session.scalar(
        select(func.count()).select_from(Verdict).where(Verdict.rollout_id == rollout.id)
    )
    stride = max(1, -(-(total or 0) // CHART_POINTS))
    numbered = select(
        Verdict.id,
        func.row_number().over(order_by=(Verdict.evaluated_at, Verdict.id)).label("n"),
    ).where(Verdict.rollout_id == rollout.id)
    picked = numbered.subquery()
    keep = select(picked.c.id).where(
        (picked.c.n - 1) % stride == 0 if stride > 1 else picked.c.n > 0
    )
    last = select(func.max(Verdict.id)).where(Verdict.rollout_id == rollout.id)
    return list(
        session.scalars(
            select(Verdict)
            .where(Verdict.id.in_(keep.union(last)))
            .order_by(Verdict.evaluated_at, Verdict.id)
        )
    )


def _latency_chart(session: Session, rollout: Rollout) -> dict[str, Any]:
    """The latencies of the newest LATENCY_SAMPLE requests' ok outputs (the chart says so)."""
    recent = (
        select(Request.id)
        .where(Request.rollout_id == rollout.id)
        .order_by(Request.created_at.desc(), Request.id.desc())
        .limit(LATENCY_SAMPLE)
        .subquery()
    )
    rows = session.execute(
        select(Output.role, Output.latency_ms).where(
            Output.request_id.in_(select(recent.c.id)),
            Output.role.in_([arm.value for arm in ARMS]),
            Output.status == OutputStatus.OK,
            Output.latency_ms.is_not(None),
        )
    ).all()
    values: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for role, latency in rows:
        values[role].append(latency)
    everything = values[Arm.INCUMBENT] + values[Arm.CANDIDATE]
    if not everything:
        return {"empty": True}
    top = sorted(everything)[int(0.99 * (len(everything) - 1))] or 1.0
    bins = 30
    counts = {role: [0] * bins for role in values}
    for role, xs in values.items():
        for x in xs:
            counts[role][min(int(x / top * bins), bins - 1)] += 1
    peak = max(max(c) for c in counts.values()) or 1
    width = CHART_W / bins
    bars = {
        role: [
            (i * width, CHART_H - c / peak * CHART_H, width / 2, c / peak * CHART_H)
            for i, c in enumerate(cs)
        ]
        for role, cs in counts.items()
    }
    quantiles = {role: _quantiles(xs) for role, xs in values.items()}
    return {
        "empty": False,
        "w": CHART_W,
        "h": CHART_H,
        "bars": bars,
        "top": top,
        "quantiles": quantiles,
        "sample": LATENCY_SAMPLE,
    }


def _quantiles(xs: list[float]) -> dict[str, float | None]:
    ordered = sorted(xs)
    return {
        f"p{q}": (ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)] if ordered else None)
        for q in (50, 95, 99)
    }


def _one_check_per_score(policy: Any) -> list[Any]:
    """A gallery per score metric: a mean check and a tail check of one metric rank alike."""
    seen: dict[str, Any] = {}
    for check in policy.checks:
        if check.on_scores:
            seen.setdefault(check.metric, check)
    return list(seen.values())


def _gallery(check: Any, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs with the check's metric, worst first, images inlined."""
    return {
        "name": check.name,
        "metric": check.metric,
        "pairs": [
            {
                "value": v,
                "prompt": row["prompt"],
                "request_id": row["request_id"],
                "stage": row["stage"],
                "incumbent": data_uri(row[Arm.INCUMBENT]["artifact"]),
                "candidate": data_uri(row[Arm.CANDIDATE]["artifact"]),
                "scores": row[Arm.CANDIDATE]["scores"],
            }
            for v, row in worst_first(check, pairs)[:GALLERY_PER_CHECK]
        ],
    }


def _failures(session: Session, rollout: Rollout) -> list[dict[str, Any]]:
    """The newest failures, looked for a page of requests at a time (newest first) and no
    further back than FAILURE_SEARCH requests: a healthy rollout's report stays cheap."""
    rows: list[Any] = []
    after = None
    for _ in range(FAILURE_SEARCH // 1000):
        page = (
            select(Request.id, Request.created_at)
            .where(Request.rollout_id == rollout.id)
            .order_by(Request.created_at.desc(), Request.id.desc())
            .limit(1000)
        )
        if after is not None:
            page = page.where(tuple_(Request.created_at, Request.id) < after)
        requests = session.execute(page).all()
        if not requests:
            break
        after = (requests[-1].created_at, requests[-1].id)
        rows += session.execute(
            select(Output, Request.prompt, Request.stage)
            .join(Request, Output.request_id == Request.id)
            .where(
                Output.request_id.in_([r.id for r in requests]),
                Output.status != OutputStatus.OK,
            )
            .order_by(Request.created_at.desc(), Output.created_at.desc())
        ).all()
        if len(rows) >= FAILURES_SHOWN:
            break
    rows = rows[:FAILURES_SHOWN]
    return [
        {
            "role": o.role,
            "status": o.status,
            "error": o.error,
            "prompt": prompt,
            "stage": stage,
            "request_id": o.request_id,
            "at": o.created_at.isoformat(),
        }
        for o, prompt, stage in rows
    ]


def data_uri(path: str | None) -> str | None:
    """An image file inlined (reports are single files that open offline)."""
    found = ensure_local(path)
    if found is None:
        return None
    return "data:image/png;base64," + base64.b64encode(found.read_bytes()).decode()
