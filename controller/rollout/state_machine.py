"""The rollout state machine, as pure functions.

`decide(view, command, evidence)` returns the transition a verb makes or the
reason it is refused. Nothing here touches the database or the clock, so every
legal and illegal move is a table-driven test (`tests/test_rollout.py`);
`controller/transitions.py` persists the result with a compare-and-swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from controller.config import Stage
from policies.vocabulary import PASS


class State(StrEnum):
    SHADOWING = "shadowing"
    CANARY = "canary"
    PROMOTED = "promoted"
    FINALIZED = "finalized"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class Verb(StrEnum):
    ADVANCE = "advance"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    RETRY = "retry"
    FINALIZE = "finalize"
    ABORT = "abort"


MOVING = frozenset({State.SHADOWING, State.CANARY, State.PROMOTED})
TERMINAL = frozenset({State.FINALIZED, State.ABORTED})


@dataclass(frozen=True)
class RolloutView:
    """What the state machine needs to know about a rollout."""

    state: State
    stage_index: int
    stages: tuple[Stage, ...]

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    @property
    def candidate_weight(self) -> int:
        """Percent of users the candidate serves: frozen while paused, gone once rolled back."""
        if self.state in (State.ROLLED_BACK, State.ABORTED):
            return 0
        if self.state is State.FINALIZED:
            return 100
        return self.stage.weight

    @property
    def experimenting(self) -> bool:
        """Whether traffic is still mirrored and judged (not after the rollout has ended)."""
        return self.state in MOVING or self.state is State.PAUSED


@dataclass(frozen=True)
class Evidence:
    """Gate facts for the current stage, gathered by the caller from the store."""

    samples: int = 0
    min_samples: int = 0
    elapsed_s: float = 0.0
    min_duration_s: float = 0.0
    verdict: str | None = None
    verdict_detail: str = ""
    verdict_snapshot: dict[str, Any] | None = None
    scorer_lag_s: float | None = None  # the oldest unscored output's age (None: caught up)
    max_scorer_lag_s: float = math.inf
    approval_hold: str = ""  # why the stage's external approval is missing ("" when none)

    def unmet(self) -> list[str]:
        """Each gate still holding the stage, in words."""
        holds = []
        if self.scorer_lag_s is not None and self.scorer_lag_s > self.max_scorer_lag_s:
            holds.append(
                f"scorer lag {human_duration(self.scorer_lag_s)} over max_scorer_lag "
                f"{human_duration(self.max_scorer_lag_s)}: the probes' evidence is behind "
                "(add scorer actors or lower the policy's sample rates)"
            )
        if self.samples < self.min_samples:
            holds.append(f"samples {self.samples}/{self.min_samples}")
        if self.elapsed_s < self.min_duration_s:
            holds.append(
                f"time in stage {human_duration(self.elapsed_s)} of {human_duration(self.min_duration_s)}"
            )
        if self.verdict != PASS:
            shown = self.verdict or "none yet"
            detail = f" ({self.verdict_detail})" if self.verdict_detail else ""
            holds.append(f"latest verdict {shown}{detail}")
        if self.approval_hold:
            holds.append(self.approval_hold)
        return holds


@dataclass(frozen=True)
class Command:
    verb: Verb
    reason: str = ""
    force: bool = False
    to: str | None = None


@dataclass(frozen=True)
class Transition:
    state: State
    stage_index: int
    reason: str
    forced: bool = False
    new_stage: bool = False


@dataclass(frozen=True)
class Refusal:
    """A verb that cannot happen now, with what to do about it."""

    reason: str
    kind: str = "illegal"
    details: dict[str, Any] = field(default_factory=dict)


Decision = Transition | Refusal


def state_for_stage(stages: tuple[Stage, ...], index: int) -> State:
    weight = stages[index].weight
    if weight == 0:
        return State.SHADOWING
    if weight == 100:
        return State.PROMOTED
    return State.CANARY


def decide(view: RolloutView, command: Command, evidence: Evidence | None = None) -> Decision:
    """The transition `command` makes from `view`, or why it cannot."""
    if view.state in TERMINAL:
        return Refusal(
            f"the rollout is {view.state.value}; nothing moves it any more. Start a new rollout under another name."
        )
    handler = _HANDLERS[command.verb]
    return handler(view, command, evidence or Evidence())


def _advance(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is State.PAUSED:
        return Refusal("the rollout is paused; run `cutover resume` before advancing")
    if view.state is State.ROLLED_BACK:
        return Refusal(
            "the rollout was rolled back; `cutover retry` starts it again from the first stage"
        )
    last = len(view.stages) - 1
    if view.stage_index == last:
        return Refusal(
            f"already at the last stage ({view.stage.name}); run `cutover finalize` to make the candidate the incumbent"
        )
    target = view.stage_index + 1
    if command.to is not None:
        names = [s.name for s in view.stages]
        if command.to not in names:
            return Refusal(f"there is no stage {command.to!r}; stages are {', '.join(names)}")
        target = names.index(command.to)
        if target <= view.stage_index:
            return Refusal(
                f"stage {command.to} is not after the current stage {view.stage.name}; "
                "to send traffic back to the incumbent use `cutover rollback --reason ...`"
            )
    if command.force and not command.reason.strip():
        return Refusal(
            "--force needs --reason so the audit trail says why the gates were overridden"
        )
    holds = evidence.unmet()
    if holds and not command.force:
        return Refusal(
            f"stage {view.stage.name} has not met its gates: {'; '.join(holds)}. "
            "Wait for them, or override with --force --reason '...'",
            kind="gates",
            details={"holds": holds},
        )
    reason = command.reason or f"gates met in stage {view.stage.name}"
    return Transition(
        state_for_stage(view.stages, target), target, reason, forced=command.force, new_stage=True
    )


def _pause(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is State.PAUSED:
        return Refusal("the rollout is already paused")
    if view.state not in MOVING:
        return Refusal(f"only a moving rollout can be paused; this one is {view.state.value}")
    return Transition(State.PAUSED, view.stage_index, command.reason or "paused by operator")


def _resume(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is not State.PAUSED:
        return Refusal(f"the rollout is not paused (it is {view.state.value}); nothing to resume")
    return Transition(
        state_for_stage(view.stages, view.stage_index),
        view.stage_index,
        command.reason or "resumed",
    )


def _rollback(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is State.ROLLED_BACK:
        return Refusal("the rollout is already rolled back; all traffic is on the incumbent")
    if not command.reason.strip():
        return Refusal("rollback needs --reason so the audit trail says why")
    return Transition(State.ROLLED_BACK, view.stage_index, command.reason)


def _retry(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is not State.ROLLED_BACK:
        return Refusal(f"retry restarts a rolled-back rollout; this one is {view.state.value}")
    return Transition(
        state_for_stage(view.stages, 0),
        0,
        command.reason or "retry from the first stage",
        forced=command.force,
        new_stage=True,
    )


def _finalize(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    if view.state is not State.PROMOTED:
        return Refusal(
            f"finalize needs the rollout promoted to 100%; it is {view.state.value} at stage {view.stage.name}"
        )
    return Transition(
        State.FINALIZED, view.stage_index, command.reason or "candidate becomes the incumbent"
    )


def _abort(view: RolloutView, command: Command, evidence: Evidence) -> Decision:
    return Transition(State.ABORTED, view.stage_index, command.reason or "aborted by operator")


_HANDLERS = {
    Verb.ADVANCE: _advance,
    Verb.PAUSE: _pause,
    Verb.RESUME: _resume,
    Verb.ROLLBACK: _rollback,
    Verb.RETRY: _retry,
    Verb.FINALIZE: _finalize,
    Verb.ABORT: _abort,
}


def human_duration(seconds: float) -> str:
    """Seconds as a person reads them in refusals and status: 45s, 12m, 3h05m."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
