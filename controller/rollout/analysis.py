"""Analysis: the judge over what SQL holds for a rollout attempt, folded in as it arrives.

The attempt is everything since the newest `init` or `retry` event. The judge
itself (`policies/judge.py`) is pure; this module is its only reader of SQL. Each
tick reads only the requests not yet folded (`requests.judge_progress`, indexed), so
its cost follows the traffic since the last tick, never the attempt's history.
A request moves pending -> arms folded -> done, in the same transaction that stores
the state it was folded into: a loop killed at any point folds nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Row, select, tuple_, update
from sqlalchemy.orm import Session

from controller.storage.lost import expected_outputs
from controller.storage.pairs import score_rows
from controller.storage.store import Store
from controller.storage.tables import (
    JUDGE_ARMS,
    JUDGE_DONE,
    JUDGE_PENDING,
    Output,
    Request,
    Rollout,
    RolloutEvent,
    StoredJudgeState,
    Verdict,
    utcnow,
)
from policies.checks import overall
from policies.judge import (
    JudgeState,
    OutputFacts,
    ProbeTally,
    ScoreRow,
    Unit,
    Window,
    evaluate,
    rows_by_output_id,
    score_rows_of,
    slice_findings,
    unit_of,
)
from policies.policy import Policy
from policies.prompt_tags import stored_or_derived
from policies.vocabulary import ARMS
from workers.jobs import OutputStatus

log = structlog.get_logger("cutover.judge")

# Requests read per transaction, and the most a tick folds: a backlog (the first tick after
# an upgrade, or a long pause) is caught up over several ticks, each short.
CHUNK = 2000
MAX_CHUNKS_PER_TICK = 5
# What a unit needs of its request: who served it, whether it was mirrored, and its tags
# (stored, or derived from the prompt, route and parameters of a request recorded before).
UNIT_COLUMNS = (
    Request.id,
    Request.primary_role,
    Request.mirrored,
    Request.params,
    Request.prompt,
    Request.route,
    Request.tags,
)


def attempt_started(session: Session, rollout: Rollout) -> datetime:
    """When the current attempt began: the newest `init` or `retry` event."""
    started = session.scalar(
        select(RolloutEvent.at)
        .where(RolloutEvent.rollout_id == rollout.id, RolloutEvent.verb.in_(("init", "retry")))
        .order_by(RolloutEvent.version.desc())
        .limit(1)
    )
    return started or rollout.created_at


def fingerprint(policy: Policy, gpus: dict[str, float]) -> str:
    """What the summaries depend on besides the data: the checks and the arms' GPU counts."""
    text = json.dumps([policy.model_dump(mode="json"), sorted(gpus.items())], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def judge_row(session: Session, rollout_id: int) -> StoredJudgeState:
    """The rollout's stored judge, created empty (to be reset on first use) if absent."""
    row = session.get(StoredJudgeState, rollout_id)
    if row is None:
        row = StoredJudgeState(
            rollout_id=rollout_id,
            attempt_started=utcnow(),
            fingerprint="",
            state={},
            updated_at=utcnow(),
        )
        session.add(row)
    return row


def fold_new(
    store: Store,
    rollout: Rollout,
    policy: Policy,
    gpus: dict[str, float],
    now: datetime | None = None,
    max_chunks: int = MAX_CHUNKS_PER_TICK,
    chunk: int = CHUNK,
) -> JudgeState:
    """Fold the attempt's requests that are ready and not folded yet; return the state.

    One transaction per chunk, each storing the state with the requests it moved, so a
    long catch-up never holds the database (SQLite's single writer above all) for long.
    """
    after: tuple[int, datetime, str] | None = None
    loaded: tuple[JudgeState, datetime] | None = None
    for _ in range(max_chunks):
        with store.session() as session:
            # Read (or reset) once; later chunks carry the state on, each storing it anew.
            loaded = loaded or _load(session, rollout, policy, gpus)
            state, since = loaded
            query = select(*UNIT_COLUMNS, Request.created_at, Request.judge_progress).where(
                Request.rollout_id == rollout.id,
                Request.judge_progress < JUDGE_DONE,
                Request.created_at >= since,
            )
            # In the pending index's own order, so no planner walks the rollout's history by
            # time instead (SQLite did, once the (rollout, time) index existed).
            order = (Request.judge_progress, Request.created_at, Request.id)
            if after is not None:
                query = query.where(tuple_(*order) > after)
            pending = session.execute(query.order_by(*order).limit(chunk)).all()
            if pending:
                _fold(session, state, pending, gpus)
            _save(session, rollout.id, state, now or utcnow())
        if len(pending) < chunk:
            break
        last = pending[-1]
        after = (last.judge_progress, last.created_at, last.id)
    return state


def recompute(
    session: Session, rollout: Rollout, policy: Policy, gpus: dict[str, float]
) -> JudgeState:
    """The state one pass over every raw row of the attempt gives, ignoring the stored state
    and the progress marks (it writes nothing): what the incremental state must equal."""
    state = JudgeState(policy)
    for unit, rows in attempt_units(session, rollout, gpus):
        state.fold_arms(unit)
        if rows is not None:
            state.fold_scores(unit, rows)
    return state


def load_window(session: Session, rollout: Rollout, gpus: dict[str, float]) -> Window:
    """Every unit of the attempt with its scores, in arrival order: to inspect what the judge
    sees. It holds the whole attempt in memory; the judge itself never does."""
    units, health = [], ProbeTally()
    for unit, rows in attempt_units(session, rollout, gpus):
        units.append(unit)
        health.add_rows(rows or [])
    return Window(units, health.health())


def attempt_units(
    session: Session, rollout: Rollout, gpus: dict[str, float]
) -> Iterator[tuple[Unit, list[ScoreRow] | None]]:
    """Each unit of the attempt from the raw rows, a chunk at a time, with the score rows of
    its outputs once the scorer has settled them (None before)."""
    since = attempt_started(session, rollout)
    query = (
        select(*UNIT_COLUMNS)
        .where(
            Request.rollout_id == rollout.id,
            Request.mirrored.is_(True),
            Request.created_at >= since,
        )
        .order_by(Request.created_at, Request.id)
        .execution_options(yield_per=CHUNK)  # one streamed read, a chunk in memory at a time
    )
    for chunk in session.execute(query).partitions():
        for request in _ready(session, chunk, gpus).values():
            if request.unit is not None:
                yield request.unit, request.score_rows


def judge(
    session: Session,
    rollout: Rollout,
    policy: Policy,
    state: JudgeState,
    now: datetime | None = None,
) -> Verdict:
    """Evaluate every check on the folded state and store the verdict (caller's transaction)."""
    results = evaluate(state)
    findings = slice_findings(state)
    verdict = Verdict(
        rollout_id=rollout.id,
        stage=rollout.stage_name,
        evaluated_at=now or utcnow(),
        decision=overall(results, [f.action for f in findings]),
        samples=max((r.samples for r in results), default=0),
        checks=[_jsonable(r.as_dict()) for r in results],
        slices=[_jsonable(f.as_dict()) for f in findings],
    )
    session.add(verdict)
    return verdict


def _load(
    session: Session, rollout: Rollout, policy: Policy, gpus: dict[str, float]
) -> tuple[JudgeState, datetime]:
    """The stored state, or a fresh one when the attempt, the policy or the GPUs changed.

    A fresh state re-folds the attempt: every request of it goes back to pending.
    """
    since = attempt_started(session, rollout)
    row = judge_row(session, rollout.id)
    expected = fingerprint(policy, gpus)
    if row.fingerprint == expected and row.attempt_started == since and row.state:
        return JudgeState.from_json(policy, row.state), since
    why = (
        "first judgement"
        if not row.fingerprint
        else "new attempt"
        if row.attempt_started != since
        else "policy or GPU counts changed"
    )
    refolded = session.execute(
        update(Request)
        .where(
            Request.rollout_id == rollout.id,
            Request.judge_progress > JUDGE_PENDING,
            Request.created_at >= since,
            Request.mirrored.is_(True),
        )
        .values(judge_progress=JUDGE_PENDING)
    ).rowcount
    log.info("judge_state_reset", rollout=rollout.name, reason=why, refolded=refolded)
    row.attempt_started, row.fingerprint = since, expected
    return JudgeState(policy), since


def _save(session: Session, rollout_id: int, state: JudgeState, now: datetime) -> None:
    row = judge_row(session, rollout_id)
    row.state = state.to_json()
    row.updated_at = now


@dataclass
class _Ready:
    """A request whose every expected output of both arms is recorded."""

    unit: Unit | None  # None: an arm has no outcome but `lost`, so nothing to judge
    # Every score row of its outputs once the scorer has settled both arms; None before.
    score_rows: list[ScoreRow] | None


def _fold(
    session: Session, state: JudgeState, pending: Sequence[Row[Any]], gpus: dict[str, float]
) -> None:
    """Fold what is ready of these pending requests and move each as far as it went."""
    progress = {p.id: p.judge_progress for p in pending}
    armed, done = [], []
    for request_id, request in _ready(session, pending, gpus).items():
        if request.unit is None:
            done.append(request_id)
            continue
        if progress[request_id] == JUDGE_PENDING:
            state.fold_arms(request.unit)
        if request.score_rows is None:
            armed.append(request_id)
        else:
            state.fold_scores(request.unit, request.score_rows)
            done.append(request_id)
    _mark(session, [k for k in armed if progress[k] == JUDGE_PENDING], JUDGE_ARMS)
    _mark(session, done, JUDGE_DONE)


def _mark(session: Session, request_ids: list[str], progress: int) -> None:
    for start in range(0, len(request_ids), 500):
        session.execute(
            update(Request)
            .where(Request.id.in_(request_ids[start : start + 500]))
            .values(judge_progress=progress)
        )


def _ready(
    session: Session, requests: Sequence[Row[Any]], gpus: dict[str, float]
) -> dict[str, _Ready]:
    """Of these requests, those with every expected output of both arms recorded (a `lost`
    placeholder counts as recorded: it is the outcome of an image that never came)."""
    by_request: dict[str, list[Any]] = {}
    for o in session.execute(
        select(
            Output.id,
            Output.request_id,
            Output.role,
            Output.image_index,
            Output.status,
            Output.latency_ms,
            Output.queue_ms,
            Output.batch_size,
            Output.timeout_s,
            Output.scored_at,
        )
        .where(
            Output.request_id.in_([r.id for r in requests]),
            Output.role.in_([arm.value for arm in ARMS]),
        )
        .order_by(Output.image_index)
    ):
        by_request.setdefault(o.request_id, []).append(o)
    complete: dict[str, tuple[dict[str, list[OutputFacts]], bool]] = {}
    tags = {r.id: stored_or_derived(r.tags, r.prompt, r.route, r.params) for r in requests}
    for request in requests:
        outputs = by_request.get(request.id, [])
        if not set(expected_outputs(request)) <= {(o.role, o.image_index) for o in outputs}:
            continue  # an arm is still on its way (or its loss not reconciled yet)
        facts: dict[str, list[OutputFacts]] = {}
        for o in outputs:
            # `lost` is an accounting outcome (the router died), not evidence.
            if o.status != OutputStatus.LOST:
                facts.setdefault(o.role, []).append(output_facts(o))
        settled = all(o.scored_at is not None for o in outputs if o.status == OutputStatus.OK)
        complete[request.id] = (facts, settled)
    ok_ids = [
        o.id
        for facts, settled in complete.values()
        if settled
        for outs in facts.values()
        for o in outs
        if o.status == OutputStatus.OK
    ]
    rows = rows_by_output_id(score_rows(session, ok_ids))
    return {
        request_id: _Ready(
            unit_of(request_id, facts, gpus, rows if settled else None, tags[request_id]),
            score_rows_of(facts, rows) if settled else None,
        )
        for request_id, (facts, settled) in complete.items()
    }


def output_facts(o: Any) -> OutputFacts:
    """The judge's view of an `outputs` row (or a row of its columns)."""
    return OutputFacts(
        o.id,
        o.request_id,
        o.role,
        o.image_index,
        o.status,
        o.latency_ms,
        o.queue_ms,
        o.batch_size,
        o.timeout_s,
    )


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Plain floats for JSON, nested ones too (a quantile check's `arms`); an unbounded side
    (too few samples) is stored as null. PostgreSQL's JSON refuses NaN and Infinity."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if hasattr(value, "item"):
            value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return clean(row)
