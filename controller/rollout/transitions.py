"""Persisting the state machine: one compare-and-swap update plus one event row.

Two operators, or an operator and the controller loop, can race; the version
column makes sure exactly one of them moves the rollout, and the loser is told
to re-read instead of silently acting on a stale view.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller.config import Config, Stage
from controller.operations.approvals import approval_hold
from controller.operations.outbox import emit, transition_event
from controller.operations.settings import NotificationsConfig
from controller.rollout.lag import scorer_lag
from controller.rollout.stage_count import stage_samples
from controller.rollout.state_machine import (
    Command,
    Evidence,
    Refusal,
    RolloutView,
    State,
    Transition,
    decide,
    state_for_stage,
)
from controller.storage.store import Store
from controller.storage.tables import Rollout, RolloutEvent, Verdict, utcnow
from policies.vocabulary import PASS

log = structlog.get_logger("cutover.transitions")

CONFLICT = (
    "state changed while this command was deciding (another operator or the controller moved the rollout); "
    "re-read with `cutover status` and try again"
)


class RolloutNotFound(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"no rollout named {name!r} in this database; run `cutover init` first")


@dataclass(frozen=True)
class Applied:
    """A transition that was persisted, as recorded in its event row."""

    event_id: int
    version: int
    from_state: str
    from_stage: str
    to_state: str
    to_stage: str
    reason: str
    forced: bool


def stages_of(row: Rollout) -> tuple[Stage, ...]:
    return tuple(Stage(name, weight) for name, weight in row.stages)


def view_of(row: Rollout) -> RolloutView:
    return RolloutView(State(row.state), row.stage_index, stages_of(row))


def get_rollout(session: Session, name: str) -> Rollout:
    row = session.scalars(select(Rollout).where(Rollout.name == name)).one_or_none()
    if row is None:
        raise RolloutNotFound(name)
    return row


def create_rollout(
    store: Store,
    config: Config,
    actor: str,
    rollout: str | None = None,
    *,
    note: str = "",
    forced: bool = False,
) -> tuple[Rollout, bool]:
    """Create the rollout row and its first event; return (row, created). `note` joins the
    event's reason (the validation it rests on); `forced` marks a start without one."""
    plan = config.plan(rollout)
    with store.session() as session:
        existing = session.scalars(select(Rollout).where(Rollout.name == plan.name)).one_or_none()
        if existing is not None:
            return existing, False
        now = utcnow()
        stages = plan.stages
        row = Rollout(
            name=plan.name,
            route=plan.route.value,
            state=state_for_stage(tuple(stages), 0).value,
            stage_index=0,
            stages=[[s.name, s.weight] for s in stages],
            stage_entered_at=now,
            incumbent=_described(config, plan.incumbent),
            candidate=_described(config, plan.candidate),
            version=1,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        session.add(
            RolloutEvent(
                rollout_id=row.id,
                version=1,
                at=now,
                actor=actor,
                verb="init",
                from_state=None,
                from_stage=None,
                to_state=row.state,
                to_stage=stages[0].name,
                reason=f"route {plan.route.value}: candidate {row.candidate} against incumbent "
                f"{row.incumbent}" + (f"; {note}" if note else ""),
                forced=forced,
            )
        )
        emit(
            session,
            config.notifications,
            transition_event(
                plan.name, 1, "init", actor, None, None, row.state, stages[0].name, note, forced
            ),
            now,
        )
    log.info("rollout_created", rollout=plan.name, stage=stages[0].name, actor=actor)
    return row, True


def _described(config: Config, model: str) -> str:
    """A model as the audit trail names it: its pool name and where its pipeline comes from."""
    return f"{model} ({config.models[model].pipeline})"


def latest_verdict(session: Session, row: Rollout) -> Verdict | None:
    """The newest verdict for the stage the rollout is in now (older stages do not count)."""
    stage = row.stage_name
    return session.scalars(
        select(Verdict)
        .where(
            Verdict.rollout_id == row.id,
            Verdict.stage == stage,
            Verdict.evaluated_at >= row.stage_entered_at,
        )
        .order_by(Verdict.evaluated_at.desc(), Verdict.id.desc())
        .limit(1)
    ).one_or_none()


def verdict_snapshot(verdict: Verdict | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        "id": verdict.id,
        "decision": verdict.decision,
        "evaluated_at": verdict.evaluated_at.isoformat(),
        "samples": verdict.samples,
        "checks": verdict.checks,
        "slices": verdict.slices or [],
    }


def evidence_for(
    session: Session,
    row: Rollout,
    config: Config,
    now: datetime | None = None,
    verdict: Verdict | None = None,
) -> Evidence:
    """Gate facts for the rollout's current stage, with the gates the config sets for it.

    `verdict` is one the caller has just stored (the tick); otherwise the latest is read.
    """
    now = now or utcnow()
    plan = config.plan(row.name)
    stage = row.stage_name
    verdict = verdict or latest_verdict(session, row)
    holding = []
    if verdict is not None:
        holding = [
            f"{c.get('name', '?')} (its probe is failing: see its reason)"
            if c.get("probe_error")
            else c.get("name", "?")
            for c in verdict.checks
            if (c.get("decision") != PASS and c.get("applies", True)) or c.get("probe_error")
        ] + [
            f"{f['check']} on {f['slice']} (a slice FAILs: {f['sentence']})"
            for f in verdict.slices or []
            if f["action"] == "hold"
        ]
    return Evidence(
        samples=stage_samples(session, row),
        min_samples=plan.for_stage("min_samples", stage),
        elapsed_s=(now - row.stage_entered_at).total_seconds(),
        min_duration_s=plan.for_stage("min_duration", stage),
        verdict=verdict.decision if verdict else None,
        verdict_detail=f"held by {', '.join(holding)}" if holding else "",
        verdict_snapshot=verdict_snapshot(verdict),
        scorer_lag_s=scorer_lag(session, row.id, now),
        max_scorer_lag_s=plan.settings.max_scorer_lag,
        approval_hold=approval_hold(session, config, row),
    )


@dataclass(frozen=True)
class Seen:
    """A rollout as one read found it: the row and its gate evidence, read together."""

    row: Rollout
    view: RolloutView
    evidence: Evidence


def read_rollout(session: Session, config: Config, name: str, now: datetime | None = None) -> Seen:
    row = get_rollout(session, name)
    return Seen(row, view_of(row), evidence_for(session, row, config, now))


def apply_command(
    store: Store,
    config: Config,
    command: Command,
    actor: str,
    *,
    rollout: str | None = None,
    expected_stage: str | None = None,
    seen: Seen | None = None,
    now: datetime | None = None,
) -> Applied | Refusal:
    """Decide `command` against the rollout and persist it with a compare-and-swap.

    `seen` is a read the caller already made (the controller tick): the command is then
    decided on exactly those facts, and the swap succeeds only if the row's version is
    still the one read, so nothing that changed in between is overwritten.
    """
    if seen is None:
        with store.reader() as session:
            seen = read_rollout(session, config, config.plan(rollout).name, now)
    row, view = seen.row, seen.view
    if expected_stage is not None and expected_stage != view.stage.name:
        return Refusal(
            f"state changed, re-read: the rollout is at stage {view.stage.name} ({view.state.value}), "
            f"not {expected_stage} as expected",
            kind="conflict",
        )
    decision = decide(view, command, seen.evidence)
    if isinstance(decision, Refusal):
        log.info(
            "transition_refused",
            rollout=row.name,
            stage=view.stage.name,
            verb=command.verb.value,
            actor=actor,
            reason=decision.reason,
        )
        return decision
    return _persist(
        store,
        config.notifications,
        row,
        view,
        command,
        decision,
        seen.evidence,
        actor,
        now or utcnow(),
    )


def _persist(
    store: Store,
    notifications: NotificationsConfig,
    row: Rollout,
    view: RolloutView,
    command: Command,
    transition: Transition,
    evidence: Evidence,
    actor: str,
    now: datetime,
) -> Applied | Refusal:
    to_stage = view.stages[transition.stage_index].name
    values: dict[str, Any] = {
        "state": transition.state.value,
        "stage_index": transition.stage_index,
        "version": row.version + 1,
        "updated_at": now,
    }
    if transition.new_stage:
        values["stage_entered_at"] = now
    with store.session() as session:
        result = session.execute(
            update(Rollout)
            .where(Rollout.id == row.id, Rollout.version == row.version)
            .values(**values)
        )
        if result.rowcount != 1:
            log.info(
                "transition_conflict",
                rollout=row.name,
                stage=view.stage.name,
                verb=command.verb.value,
                actor=actor,
            )
            return Refusal(CONFLICT, kind="conflict")
        event = RolloutEvent(
            rollout_id=row.id,
            version=row.version + 1,
            at=now,
            actor=actor,
            verb=command.verb.value,
            from_state=view.state.value,
            from_stage=view.stage.name,
            to_state=transition.state.value,
            to_stage=to_stage,
            reason=transition.reason,
            forced=transition.forced,
            verdict=evidence.verdict_snapshot,
        )
        session.add(event)
        session.flush()
        event_id = event.id
        emit(
            session,
            notifications,
            transition_event(
                row.name,
                row.version + 1,
                command.verb.value,
                actor,
                view.state.value,
                view.stage.name,
                transition.state.value,
                to_stage,
                transition.reason,
                transition.forced,
            ),
            now,
        )
    log.info(
        "transition",
        rollout=row.name,
        stage=to_stage,
        verb=command.verb.value,
        actor=actor,
        from_state=view.state.value,
        to_state=transition.state.value,
        forced=transition.forced,
        reason=transition.reason,
    )
    return Applied(
        event_id=event_id,
        version=row.version + 1,
        from_state=view.state.value,
        from_stage=view.stage.name,
        to_state=transition.state.value,
        to_stage=to_stage,
        reason=transition.reason,
        forced=transition.forced,
    )
