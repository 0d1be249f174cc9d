"""The controller loop: judge, and act on the verdict, every interval.

Each tick: hold the lease (or do nothing), score pending outputs (only when no
scorer pool does: `scorer_pool.py`), fold what is new into the rollout's judge and
store a verdict over the attempt, then let `plan_action` (a pure function)
choose at most one verb, applied with a compare-and-swap guarded by the stage
the tick saw. A loop killed at any moment and restarted repeats nothing: a
transition either committed (and the next tick sees the new stage) or it did
not (and the next tick decides again from the same stored facts).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from controller.config import Config
from controller.operations import approvals
from controller.operations.tick_events import fallback_storm_event, verdict_events
from controller.rollout import lease
from controller.rollout.analysis import fold_new, judge, judge_row
from controller.rollout.scoring import Scorer
from controller.rollout.stage_count import settle_stage_count
from controller.rollout.state_machine import (
    MOVING,
    Command,
    Evidence,
    Refusal,
    RolloutView,
    State,
    Verb,
)
from controller.rollout.transitions import (
    Applied,
    Seen,
    apply_command,
    evidence_for,
    get_rollout,
    view_of,
)
from controller.storage.artifact_store import artifacts_for
from controller.storage.lost import lost_after, reconcile_lost
from controller.storage.store import Store
from controller.storage.tables import Rollout, utcnow
from policies.checks import FAIL
from policies.policy import Policy, load_policy
from policies.vocabulary import PASS, Arm
from workers.logs import one_line

log = structlog.get_logger("cutover.loop")

ACTOR = "controller"


def actor_of(holder: str) -> str:
    """The audit trail's actor for a loop: which loop acted, not only that a loop did."""
    return f"{ACTOR}@{holder}"


@dataclass(frozen=True)
class Facts:
    """What a tick knows when it decides."""

    view: RolloutView
    evidence: Evidence
    verdict: str
    failing: tuple[str, ...]
    auto_advance: bool
    max_duration_s: float


def plan_action(facts: Facts) -> Command | None:
    """The one verb this tick should apply, or None. Rollback beats everything."""
    view, evidence = facts.view, facts.evidence
    if view.state not in (State.SHADOWING, State.CANARY, State.PROMOTED):
        return None
    if facts.verdict == FAIL:
        return Command(Verb.ROLLBACK, reason="automatic rollback: " + "; ".join(facts.failing))
    if (
        evidence.elapsed_s > facts.max_duration_s
        and facts.verdict != PASS
        and view.state is not State.PROMOTED
    ):
        return Command(
            Verb.PAUSE,
            reason=(
                f"stage {view.stage.name} passed its maximum duration ({facts.max_duration_s:.0f}s) "
                f"without a PASS verdict (latest: {facts.verdict})"
            ),
        )
    if (
        facts.auto_advance
        and view.state in (State.SHADOWING, State.CANARY)
        and not evidence.unmet()
    ):
        return Command(
            Verb.ADVANCE, reason=f"automatic advance: gates met in stage {view.stage.name}"
        )
    return None


@dataclass
class TickResult:
    leader: bool
    scored: int = 0
    lost: int = 0
    verdict: str | None = None
    action: Applied | Refusal | None = None


class RolloutController:
    """One rollout's tick: lease, reconcile, score, judge, act. `ControllerLoop` runs them all."""

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        policy: Policy | None = None,
        holder: str | None = None,
        lease_ttl: float | None = None,
        rollout: str | None = None,
        score_inline: bool = True,
    ) -> None:
        self.config = config
        # False when a scorer pool (`scorer_pool.py`) scores; True runs the probes in the tick.
        self.score_inline = score_inline
        self.plan = config.plan(rollout)
        self.name = self.plan.name
        self.store = store or Store.for_config(config)
        self.policy = policy or load_policy(self.plan.policy_path)
        self.holder = holder or default_holder()
        self.lease_ttl = timedelta(seconds=lease_ttl or self.plan.settings.lease_ttl)
        self.scorer = Scorer(self.policy, artifacts_for(config).root)
        self.standby = False
        self.gpus = {
            Arm.INCUMBENT: config.models[self.plan.incumbent].num_gpus,
            Arm.CANDIDATE: config.models[self.plan.candidate].num_gpus,
        }

    def tick(self, now: datetime | None = None) -> TickResult:
        """One evaluation. Every event logged inside it (scorer and judge included) carries
        the `rollout` key, so an SRE can filter a tick's events by rollout."""
        with structlog.contextvars.bound_contextvars(rollout=self.name):
            return self._tick(now or utcnow())

    def _tick(self, now: datetime) -> TickResult:
        # The one read of the rollout this tick: everything below decides on it, and the
        # action is swapped in only if the row's version is still this one.
        with self.store.reader() as session:
            row = get_rollout(session, self.name)
        if not lease.acquire(self.store, row.id, self.holder, self.lease_ttl, now):
            self._note_role(standby=True, rollout_id=row.id)
            return TickResult(leader=False)
        self._note_role(standby=False, rollout_id=row.id)
        result = TickResult(leader=True, lost=self._reconcile(row, now))
        if self.score_inline:
            result.scored = self.scorer.score_pending(self.store, row.id, now=now)
        view = view_of(row)
        if view.state not in MOVING:
            return result
        state = fold_new(self.store, row, self.policy, self.gpus, now)
        with self.store.session() as session:
            verdict = judge(session, row, self.policy, state, now)
            session.flush()
            verdict_events(session, self.config.notifications, row, verdict, now)
            fallback_storm_event(session, self.config.notifications, row, now)
            evidence = evidence_for(session, row, self.config, now, verdict=verdict)
        evidence = self._ask_approval(row, view, evidence, now)
        result.verdict = verdict.decision
        failing = tuple(
            f"{c['name']}: {c['reason']}"
            for c in verdict.checks
            if c["decision"] == FAIL and c["critical"]
        ) + tuple(
            f"{f['check']} on {f['slice']}: {f['sentence']}"
            for f in verdict.slices or []
            if f["action"] == "rollback"
        )
        facts = Facts(
            view,
            evidence,
            result.verdict,
            failing,
            self.plan.settings.auto_advance,
            self.plan.for_stage("max_duration", view.stage.name),
        )
        command = plan_action(facts)
        if command is not None:
            result.action = apply_command(
                self.store,
                self.config,
                command,
                actor_of(self.holder),
                seen=Seen(row, view, evidence),
                now=now,
            )
            # A rollback or pause changes what users get without anyone typing a verb: an
            # operator must see it at the default log level, with the reason.
            level = log.info if command.verb is Verb.ADVANCE else log.warning
            level(
                "controller_action",
                rollout=self.name,
                stage=view.stage.name,
                verb=command.verb.value,
                outcome=type(result.action).__name__,
                reason=command.reason[:300],
                actor=actor_of(self.holder),
            )
        return result

    def _ask_approval(
        self, row: Rollout, view: RolloutView, evidence: Evidence, now: datetime
    ) -> Evidence:
        """Ask the stage's approval webhook once every other gate is met (asking earlier
        would ask someone to approve a stage that is not ready)."""
        if not evidence.approval_hold or view.state not in (State.SHADOWING, State.CANARY):
            return evidence
        if dataclasses.replace(evidence, approval_hold="").unmet():
            return evidence
        approvals.ask(self.store, self.config, row, now)
        with self.store.reader() as session:
            hold = approvals.approval_hold(session, self.config, row)
        return dataclasses.replace(evidence, approval_hold=hold)

    def _reconcile(self, row: Rollout, now: datetime) -> int:
        """Give requests whose router died an outcome (`lost`), so counts add up. How far
        that has been done is stored with the judge, so a restart does not rescan history."""
        before = now - lost_after(self.config)
        with self.store.session() as session:
            stored = judge_row(session, row.id)
            since = stored.reconciled_until
            lost = reconcile_lost(session, row.id, before=before, since=since, now=now)
            stored.reconciled_until = before if since is None else max(since, before)
            # Requests older than `before` can no longer arrive: the stage's count takes them in.
            settle_stage_count(session, row, before)
        if lost:
            log.warning("outputs_lost", outputs=lost, note="their router replica died")
        return lost

    def _note_role(self, *, standby: bool, rollout_id: int) -> None:
        """Say once when this loop becomes standby (another holds the lease) or leader."""
        if standby == self.standby:
            return
        self.standby = standby
        if standby:
            held = lease.holder_of(self.store, rollout_id)
            log.info("controller_standby", holder=self.holder, leader=held and held[0])
        else:
            log.info("controller_leader", holder=self.holder)

    def release(self) -> None:
        """Hand the lease back so another loop (say `cutover serve`'s) may act at once."""
        try:
            with self.store.reader() as session:
                rollout_id = get_rollout(session, self.name).id
            lease.release(self.store, rollout_id, self.holder)
        except Exception as exc:  # the database is gone: the lease expires after its TTL
            log.warning(
                "lease_release_failed", rollout=self.name, holder=self.holder, error=one_line(exc)
            )


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ControllerLoop:
    """Every rollout of the config, ticked in turn by one thread, each under its own lease.

    A rollout whose tick fails (its row is missing, its policy file is broken) logs one
    line and is tried again next interval; the others tick on.
    """

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        holder: str | None = None,
        rollouts: list[str] | None = None,
        score_inline: bool = True,
    ) -> None:
        self.config = config
        self.score_inline = score_inline
        self.store = store or Store.for_config(config)
        self.holder = holder or default_holder()
        self.names = rollouts if rollouts is not None else list(config.plans())
        self.interval = min(
            (config.plan(name).settings.evaluation_interval for name in self.names), default=30.0
        )
        self._controllers: dict[str, RolloutController] = {}

    def controller(self, name: str) -> RolloutController:
        """Built on first use, so one rollout's broken policy file stops only that rollout."""
        if name not in self._controllers:
            self._controllers[name] = RolloutController(
                self.config,
                self.store,
                holder=self.holder,
                rollout=name,
                score_inline=self.score_inline,
            )
        return self._controllers[name]

    def tick(self, now: datetime | None = None) -> dict[str, TickResult | None]:
        """One tick of every rollout; None for a rollout whose tick failed (logged)."""
        results: dict[str, TickResult | None] = {}
        for name in self.names:
            try:
                results[name] = self.controller(name).tick(now)
            except Exception as exc:
                # One line with the cause: a database outage must not print a traceback a tick.
                log.error("controller_tick_failed", rollout=name, error=one_line(exc))
                results[name] = None
        return results

    def run(self, stop: threading.Event) -> None:
        """Tick every evaluation interval until `stop` is set."""
        log.info("controller_started", rollouts=self.names, holder=self.holder)
        try:
            while not stop.is_set():
                self.tick()
                stop.wait(self.interval)
        finally:
            self.release()
        log.info("controller_stopped", rollouts=self.names, holder=self.holder)

    def release(self) -> None:
        for controller in self._controllers.values():
            controller.release()
