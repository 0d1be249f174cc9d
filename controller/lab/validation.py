"""`cutover validate`, and the gate it opens: a rollout starts only after its candidate passed.

A validation renders the route's suites on the rollout's candidate and on the route's
model, and judges the pairs with the rollout's own policy (tolerances and alphas as in
shadow). On a few hundred pairs, a check whose regressions are rare (error rates at 1%)
cannot PASS yet; that is shadow's work. So a validation PASSes when no check FAILs,
every critical check has its `min_samples` pairs, and every probe works; it FAILs when
any check FAILs. Either outcome is a row of `validations` with the suites' versions and
every check's figures.

`cutover init` and `cutover retry` look for a PASS of the same candidate (name and
pipeline), against the same incumbent, on the same suite versions: a changed suite or a
new candidate build asks for a new validation. `--skip-validation --reason` records a
skip instead, as forced, in the same table and in the rollout's own event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Config, RolloutPlan
from controller.lab.suites import find_suite, load_suite, shipped_suites
from controller.storage.store import Store
from controller.storage.tables import Validation, utcnow
from policies.checks import FAIL, INCONCLUSIVE, PASS
from policies.policy import Policy

log = structlog.get_logger("cutover.lab")
SKIPPED = "SKIPPED"


def route_suites(config: Config, plan: RolloutPlan) -> list[Path]:
    """The suites a rollout's validation renders: the route's `suites:`, else every shipped
    suite with an item on the route."""
    route = config.route_map.get(plan.route)
    if route is not None and route.suites:
        return [_suite_path(config, name) for name in route.suites]
    return [
        path
        for path in shipped_suites().values()
        if any(item.route == plan.route for item in load_suite(path).items)
    ]


def _suite_path(config: Config, name: str) -> Path:
    if name in shipped_suites():
        return shipped_suites()[name]
    return find_suite(str(config.base_dir / name))


def suite_versions(paths: list[Path]) -> dict[str, int]:
    suites = [load_suite(path) for path in paths]
    return {suite.suite: suite.version for suite in suites}


def described(config: Config, model: str) -> str:
    """A model as a validation names it: its pool name, its pipeline and a fingerprint of its
    settings, so a PASS is never reused for the same pipeline served differently."""
    from controller.lab.runs import settings_of

    return f"{model} ({config.models[model].pipeline}, settings {settings_of(config, model)})"


def decide(standing: dict[str, Any], policy: Policy) -> tuple[str, str]:
    """A validation's outcome and why, from the candidate's standing (`compare.Standing`)."""
    checks = standing["checks"]
    failed = [c for c in checks if c["decision"] == FAIL]
    slices = standing.get("slices", [])
    rolling_back = [f for f in slices if f["action"] == "rollback"]
    if failed or rolling_back:
        return FAIL, "; ".join(
            [f"{c['name']} FAIL: {c['reason']}" for c in failed]
            + [f"{f['check']} FAIL on a slice: {f['sentence']}" for f in rolling_back]
        )
    holding = [f for f in slices if f["action"] == "hold"]
    if holding:
        return INCONCLUSIVE, "; ".join(
            f"{f['check']} FAILs on a slice (its policy holds): {f['sentence']}" for f in holding
        )
    probes = [c for c in checks if c["probe_error"]]
    if probes:
        return INCONCLUSIVE, "; ".join(f"{c['name']}: {c['reason']}" for c in probes)
    minimum = {c.name: c.min_samples for c in policy.checks}
    short = [
        c
        for c in checks
        if c["critical"] and c.get("applies", True) and c["samples"] < minimum[c["name"]]
    ]
    if short:
        return INCONCLUSIVE, (
            "too few pairs for "
            + ", ".join(f"{c['name']} ({c['samples']}/{minimum[c['name']]})" for c in short)
            + ": run again with more --seeds, or add suites to the route"
        )
    passed = [c["name"] for c in checks if c["decision"] == PASS]
    open_ = [c["name"] for c in checks if c["decision"] == INCONCLUSIVE]
    reason = (
        f"no check shows a regression on {standing['units']} pairs; "
        f"PASS: {', '.join(passed) or 'none'}"
    )
    if open_:
        reason += f"; left to shadow (not decided on this many pairs): {', '.join(open_)}"
    reported = [f["sentence"] for f in slices if f["action"] == "report"]
    if reported:
        reason += "; reported (its policy does not hold for it): " + "; ".join(reported)
    return PASS, reason


def record(
    store: Store,
    config: Config,
    plan: RolloutPlan,
    suites: dict[str, int],
    decision: str,
    reason: str,
    actor: str,
    figures: dict[str, Any] | None = None,
    run_id: int | None = None,
) -> Validation:
    """A validation's outcome (or a skip: decision SKIPPED, forced) as an event row."""
    row = Validation(
        rollout=plan.name,
        candidate=described(config, plan.candidate),
        incumbent=described(config, plan.incumbent),
        suites=suites,
        decision=decision,
        forced=decision == SKIPPED,
        reason=reason,
        figures=figures,
        actor=actor,
        at=utcnow(),
        run_id=run_id,
    )
    with store.session() as session:
        session.add(row)
        session.flush()
        session.expunge(row)
    log.info(
        "validation_recorded",
        rollout=plan.name,
        decision=decision,
        suites=suites,
        forced=row.forced,
        actor=actor,
    )
    return row


def passing(
    session: Session, config: Config, plan: RolloutPlan, suites: dict[str, int]
) -> Validation | None:
    """The newest PASS of this candidate against this incumbent on these suite versions (the
    route's current ones, `suite_versions(route_suites(…))`)."""
    rows = session.scalars(
        select(Validation)
        .where(
            Validation.rollout == plan.name,
            Validation.decision == PASS,
            Validation.candidate == described(config, plan.candidate),
            Validation.incumbent == described(config, plan.incumbent),
        )
        .order_by(Validation.at.desc(), Validation.id.desc())
    ).all()
    return next((row for row in rows if row.suites == suites), None)


def refusal(
    session: Session, config: Config, plan: RolloutPlan, verb: str, suites: dict[str, int]
) -> str:
    """Why `verb` (init, retry) may not start this rollout: there is no `passing` validation
    on these suite versions. Says what the latest validation was, and what to run."""
    listed = ", ".join(f"{name} v{version}" for name, version in suites.items())
    latest = session.scalars(
        select(Validation)
        .where(Validation.rollout == plan.name, Validation.decision != SKIPPED)
        .order_by(Validation.at.desc(), Validation.id.desc())
        .limit(1)
    ).one_or_none()
    seen = ""
    if latest is not None:
        seen = f" The latest validation ({latest.at:%Y-%m-%d %H:%M} UTC) was {latest.decision}"
        if latest.decision == PASS:
            seen += f" on other suite versions or another build ({latest.candidate})"
        seen += "."
    return (
        f"{plan.name}: candidate {described(config, plan.candidate)} has no passing validation "
        f"on the route's suites ({listed}).{seen} Run `cutover validate --rollout {plan.name}`, "
        f'or `cutover {verb} --skip-validation --reason "…"` to start without one (recorded as forced).'
    )


def validate(
    config: Config, store: Store, plan: RolloutPlan, actor: str, seeds: int = 2
) -> tuple[Validation, dict[str, Any]]:
    """Render the route's suites on the candidate and the route's model, judge them with the
    rollout's policy, and record the outcome."""
    from controller.lab.runs import plan_run, run_on_ray, validation_judging
    from policies.policy import load_policy

    paths = route_suites(config, plan)
    if not paths:
        raise ValueError(
            f"route {plan.route.value} has no suite: list some under routes.{plan.route.value}.suites"
        )
    policy = load_policy(plan.policy_path)
    lab = plan_run(
        config, [str(p) for p in paths], [plan.candidate], plan.incumbent, seeds, "validate"
    )
    result = run_on_ray(config, store, lab, validation_judging(policy))
    standing = result["ranking"][0]
    decision, reason = decide(standing, policy)
    row = record(store, config, plan, lab.suites, decision, reason, actor, standing, result["run"])
    return row, result
