"""Every verb from every state, as a table over the pure state machine."""

from __future__ import annotations

import pytest

from controller.config import parse_stages
from controller.rollout.state_machine import (
    Command,
    Evidence,
    Refusal,
    RolloutView,
    State,
    Transition,
    Verb,
    decide,
)

STAGES = tuple(parse_stages(["shadow", 10, 30, 60, 100]))
GATES_MET = Evidence(samples=500, min_samples=100, elapsed_s=600, min_duration_s=60, verdict="PASS")
NO_VERDICT = Evidence(samples=500, min_samples=100, elapsed_s=600, min_duration_s=60, verdict=None)
FEW_SAMPLES = Evidence(
    samples=10, min_samples=100, elapsed_s=600, min_duration_s=60, verdict="PASS"
)
TOO_SOON = Evidence(samples=500, min_samples=100, elapsed_s=5, min_duration_s=60, verdict="PASS")
FAILING = Evidence(
    samples=500,
    min_samples=100,
    elapsed_s=600,
    min_duration_s=60,
    verdict="FAIL",
    verdict_detail="held by error_rate",
)

S, C, P, F = State.SHADOWING, State.CANARY, State.PROMOTED, State.FINALIZED
PA, RB, AB = State.PAUSED, State.ROLLED_BACK, State.ABORTED

# (state, stage index, command, evidence) -> (new state, new stage index)
LEGAL = [
    (S, 0, Command(Verb.ADVANCE), GATES_MET, C, 1),
    (C, 1, Command(Verb.ADVANCE), GATES_MET, C, 2),
    (C, 3, Command(Verb.ADVANCE), GATES_MET, P, 4),
    (S, 0, Command(Verb.ADVANCE, to="60"), GATES_MET, C, 3),
    (S, 0, Command(Verb.ADVANCE, to="100"), GATES_MET, P, 4),
    (S, 0, Command(Verb.ADVANCE, force=True, reason="hotfix"), NO_VERDICT, C, 1),
    (C, 2, Command(Verb.ADVANCE, force=True, reason="ok'd by SRE"), FAILING, C, 3),
    (S, 0, Command(Verb.PAUSE), None, PA, 0),
    (C, 2, Command(Verb.PAUSE, reason="holiday"), None, PA, 2),
    (P, 4, Command(Verb.PAUSE), None, PA, 4),
    (PA, 0, Command(Verb.RESUME), None, S, 0),
    (PA, 2, Command(Verb.RESUME), None, C, 2),
    (PA, 4, Command(Verb.RESUME), None, P, 4),
    (S, 0, Command(Verb.ROLLBACK, reason="bad text"), None, RB, 0),
    (C, 3, Command(Verb.ROLLBACK, reason="p99 up"), None, RB, 3),
    (P, 4, Command(Verb.ROLLBACK, reason="complaints"), None, RB, 4),
    (PA, 2, Command(Verb.ROLLBACK, reason="stop"), None, RB, 2),
    (RB, 3, Command(Verb.RETRY), None, S, 0),
    (P, 4, Command(Verb.FINALIZE), None, F, 4),
    (S, 0, Command(Verb.ABORT), None, AB, 0),
    (C, 1, Command(Verb.ABORT), None, AB, 1),
    (PA, 1, Command(Verb.ABORT), None, AB, 1),
    (RB, 1, Command(Verb.ABORT), None, AB, 1),
    (P, 4, Command(Verb.ABORT), None, AB, 4),
]

# (state, stage index, command, evidence) -> words the refusal must contain
ILLEGAL = [
    (RB, 2, Command(Verb.ADVANCE), GATES_MET, "retry"),
    (P, 4, Command(Verb.ADVANCE), GATES_MET, "last stage"),
    (PA, 1, Command(Verb.ADVANCE), GATES_MET, "resume"),
    (F, 4, Command(Verb.ADVANCE), GATES_MET, "finalized"),
    (AB, 1, Command(Verb.ADVANCE), GATES_MET, "aborted"),
    (S, 0, Command(Verb.ADVANCE), NO_VERDICT, "latest verdict none yet"),
    (S, 0, Command(Verb.ADVANCE), FEW_SAMPLES, "samples 10/100"),
    (C, 1, Command(Verb.ADVANCE), TOO_SOON, "time in stage 5s of 60s"),
    (C, 1, Command(Verb.ADVANCE), FAILING, "held by error_rate"),
    (C, 2, Command(Verb.ADVANCE, to="10"), GATES_MET, "not after the current stage"),
    (C, 2, Command(Verb.ADVANCE, to="30"), GATES_MET, "not after the current stage"),
    (C, 2, Command(Verb.ADVANCE, to="45"), GATES_MET, "there is no stage '45'"),
    (S, 0, Command(Verb.ADVANCE, force=True), NO_VERDICT, "--force needs --reason"),
    (C, 1, Command(Verb.FINALIZE), None, "finalize needs the rollout promoted"),
    (PA, 4, Command(Verb.FINALIZE), None, "finalize needs the rollout promoted"),
    (RB, 4, Command(Verb.FINALIZE), None, "finalize needs the rollout promoted"),
    (PA, 1, Command(Verb.PAUSE), None, "already paused"),
    (RB, 1, Command(Verb.PAUSE), None, "only a moving rollout"),
    (C, 1, Command(Verb.RESUME), None, "not paused"),
    (RB, 1, Command(Verb.RESUME), None, "not paused"),
    (C, 1, Command(Verb.ROLLBACK), None, "needs --reason"),
    (C, 1, Command(Verb.ROLLBACK, reason="   "), None, "needs --reason"),
    (RB, 1, Command(Verb.ROLLBACK, reason="again"), None, "already rolled back"),
    (F, 4, Command(Verb.ROLLBACK, reason="late"), None, "finalized"),
    (C, 1, Command(Verb.RETRY), None, "retry restarts a rolled-back rollout"),
    (AB, 1, Command(Verb.RETRY), None, "aborted"),
    (F, 4, Command(Verb.ABORT), None, "finalized"),
    (PA, 1, Command(Verb.RETRY), None, "retry restarts a rolled-back rollout"),
    (P, 4, Command(Verb.RETRY), None, "retry restarts a rolled-back rollout"),
    (S, 0, Command(Verb.RETRY), None, "retry restarts a rolled-back rollout"),
    (P, 4, Command(Verb.RESUME), None, "not paused"),
    (S, 0, Command(Verb.RESUME), None, "not paused"),
    (S, 0, Command(Verb.FINALIZE), None, "finalize needs the rollout promoted"),
    (AB, 0, Command(Verb.ABORT), None, "aborted"),
]


@pytest.mark.parametrize(("state", "index", "command", "evidence", "to_state", "to_index"), LEGAL)
def test_legal_transitions(state, index, command, evidence, to_state, to_index):
    decision = decide(RolloutView(state, index, STAGES), command, evidence)
    assert isinstance(decision, Transition), decision
    assert (decision.state, decision.stage_index) == (to_state, to_index)
    assert decision.reason


@pytest.mark.parametrize(("state", "index", "command", "evidence", "words"), ILLEGAL)
def test_illegal_transitions_are_refused_with_a_reason(state, index, command, evidence, words):
    decision = decide(RolloutView(state, index, STAGES), command, evidence)
    assert isinstance(decision, Refusal), decision
    assert words in decision.reason


def test_every_verb_is_covered_from_every_state():
    covered = {(row[0], row[2].verb) for row in LEGAL + ILLEGAL}
    missing = {(s, v) for s in State for v in Verb} - covered
    # Terminal states refuse everything the same way; one verb each shows it.
    missing -= {(s, v) for s in (F, AB) for v in Verb}
    assert not missing, sorted(missing)


def test_forced_advance_is_marked_and_keeps_the_reason():
    decision = decide(
        RolloutView(S, 0, STAGES), Command(Verb.ADVANCE, force=True, reason="ceo says"), FAILING
    )
    assert isinstance(decision, Transition)
    assert decision.forced and decision.reason == "ceo says" and decision.new_stage


def test_gate_refusal_lists_every_unmet_gate():
    evidence = Evidence(
        samples=3, min_samples=50, elapsed_s=1, min_duration_s=30, verdict="INCONCLUSIVE"
    )
    decision = decide(RolloutView(C, 1, STAGES), Command(Verb.ADVANCE), evidence)
    assert isinstance(decision, Refusal) and decision.kind == "gates"
    assert decision.details["holds"] == [
        "samples 3/50",
        "time in stage 1s of 30s",
        "latest verdict INCONCLUSIVE",
    ]


@pytest.mark.parametrize(
    ("state", "index", "weight"),
    [(S, 0, 0), (C, 2, 30), (P, 4, 100), (PA, 2, 30), (RB, 3, 0), (AB, 3, 0), (F, 4, 100)],
)
def test_candidate_weight_follows_state(state, index, weight):
    assert RolloutView(state, index, STAGES).candidate_weight == weight
