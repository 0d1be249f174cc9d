"""The database schema: the single source of truth every part reads and writes.

Changing a table here needs a migration in `migrations/versions/`;
`tests/test_migrations.py` fails when the two disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite drops the zone; this restores it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    route: Mapped[str] = mapped_column(String(32), server_default="generate")
    state: Mapped[str] = mapped_column(String(16))
    stage_index: Mapped[int] = mapped_column(Integer)
    stages: Mapped[list[Any]] = mapped_column(JSON)
    stage_entered_at: Mapped[datetime] = mapped_column(UtcDateTime)
    incumbent: Mapped[str] = mapped_column(Text)
    candidate: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    @property
    def stage_name(self) -> str:
        """The stage the rollout is in now (derived from the stored stage list and index)."""
        return str(self.stages[self.stage_index][0])


class RolloutEvent(Base):
    """Audit trail: one row per transition, written in the transaction that made it."""

    __tablename__ = "rollout_events"
    __table_args__ = (UniqueConstraint("rollout_id", "version", name="uq_event_rollout_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    verb: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    from_stage: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    to_stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


# How far the judge has folded a request into its rollout's `JudgeState`.
JUDGE_PENDING = 0  # a mirrored request: not folded yet
JUDGE_ARMS = 1  # its arms' outcomes are folded; its scores are not yet
JUDGE_DONE = 2  # fully folded, or nothing to fold (not mirrored, no rollout)


def judge_progress_of(row: dict[str, Any]) -> int:
    """Only a mirrored request of a rollout is ever judged; every other starts done, so the
    judge's index on pending requests holds the in-flight few, not the whole history."""
    judged = row.get("mirrored") and row.get("rollout_id") is not None
    return JUDGE_PENDING if judged else JUDGE_DONE


def _judge_progress(context: Any) -> int:
    return judge_progress_of(context.get_current_parameters())


class Request(Base):
    """One client request. `rollout_id` is null on a route no rollout is running on."""

    __tablename__ = "requests"
    __table_args__ = (
        # A rollout's requests by time: pages of the shadow log, a stage's recent requests,
        # the window lost outputs are looked for in.
        Index("ix_requests_rollout_time", "rollout_id", "created_at", "id"),
        Index("ix_requests_route_time", "route", "created_at"),
        Index("ix_requests_judge_pending", "rollout_id", "judge_progress", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    rollout_id: Mapped[int | None] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), nullable=True
    )
    route: Mapped[str] = mapped_column(String(32), server_default="generate")
    stage: Mapped[str] = mapped_column(String(16))
    primary_role: Mapped[str] = mapped_column(String(16))
    sticky_key: Mapped[str] = mapped_column(String(256))
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    mirrored: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The prompt's tags (policies/prompt_tags.py): the slices the judge puts it in. None on
    # requests recorded before 0008; the judge then derives them from prompt and params.
    tags: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    judge_progress: Mapped[int] = mapped_column(
        SmallInteger, default=_judge_progress, server_default="0"
    )


class Output(Base):
    __tablename__ = "outputs"
    __table_args__ = (
        UniqueConstraint("request_id", "role", "image_index", name="uq_output_request_role_image"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    image_index: Mapped[int] = mapped_column(Integer, default=0)
    is_primary: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    queue_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    peak_gpu_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    oom_count: Mapped[int] = mapped_column(Integer, default=0)
    batch_ooms: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    scored_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True, index=True)
    # The time the router gave this call: a pair is judged at its arms' shorter deadline.
    timeout_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Which model of the pool answered (its name in the config).
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # On a fallback's output: the failed attempt it answered for.
    fallback_of: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The scorer that claimed this output, until when: a scorer that dies mid-batch lets
    # its claim expire and another takes the output over.
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claim_expires: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("output_id", "probe", name="uq_score_output_probe"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[str] = mapped_column(ForeignKey("outputs.id", ondelete="CASCADE"), index=True)
    probe: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # False: the probe's random draw left this output out (the policy's sample rate); the row
    # records that it was not scored on purpose, and the judge does not count it.
    sampled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class Verdict(Base):
    """One evaluation of the policy over a stage's window: per-check statistic, bounds, decision."""

    __tablename__ = "verdicts"
    __table_args__ = (
        Index("ix_verdicts_rollout_stage_time", "rollout_id", "stage", "evaluated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16))
    evaluated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    decision: Mapped[str] = mapped_column(String(16))
    samples: Mapped[int] = mapped_column(Integer, default=0)
    checks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # The slices where a check FAILed (policies/slices.py); None before 0008.
    slices: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class StoredJudgeState(Base):
    """A rollout's judge: every check's summary of the attempt so far (`policies.judge`).

    Written in the tick's transaction with the requests it folded, so a loop killed at
    any moment resumes from a state that counts each unit exactly once.
    """

    __tablename__ = "judge_states"

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    attempt_started: Mapped[datetime] = mapped_column(UtcDateTime)
    # The policy and GPU counts the summaries were built under: another means a new state.
    fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # Requests created before this have had their missing outputs reconciled (`lost`).
    reconciled_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The current stage's requests older than a mark, counted once (`rollout/stage_count.py`).
    stage_count: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ControllerLease(Base):
    """Which controller loop may act on a rollout, until when (taken over once expired)."""

    __tablename__ = "controller_leases"

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    holder: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LabRun(Base):
    """One bake-off or validation: what it renders (suites, models, seeds), found again by `key`.

    A rerun with the same suites, models and seeds finds its run by key and renders only
    what has no row in `lab_outputs` yet: that is what makes a bake-off resumable.
    """

    __tablename__ = "lab_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # bakeoff | validate
    suites: Mapped[dict[str, Any]] = mapped_column(JSON)  # {suite: version}
    models: Mapped[dict[str, Any]] = mapped_column(JSON)  # {model: its pipeline}
    baseline: Mapped[str] = mapped_column(String(64))
    seeds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The last comparison: ranking, figures and each model's lines (`controller/lab/compare.py`).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class LabOutput(Base):
    """One image a lab run rendered: a suite item at one seed on one model, and its scores."""

    __tablename__ = "lab_outputs"
    __table_args__ = (
        UniqueConstraint("run_id", "model", "unit", name="uq_lab_output_run_model_unit"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("lab_runs.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    unit: Mapped[str] = mapped_column(String(160))  # suite/item/seed index
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # {probe: value or None}; probe errors under "errors". Null until scored.
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Validation(Base):
    """A rollout's candidate checked on its route's suites (`cutover validate`), or a recorded
    skip of that check: what `init` and `retry` look for before they start a rollout."""

    __tablename__ = "validations"
    __table_args__ = (Index("ix_validations_rollout_time", "rollout", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout: Mapped[str] = mapped_column(String(64))
    candidate: Mapped[str] = mapped_column(Text)  # as the audit trail names it: name (pipeline)
    incumbent: Mapped[str] = mapped_column(Text)
    suites: Mapped[dict[str, Any]] = mapped_column(JSON)  # {suite: version}
    decision: Mapped[str] = mapped_column(String(16))  # PASS, FAIL, INCONCLUSIVE, SKIPPED
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    figures: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("lab_runs.id", ondelete="SET NULL"), nullable=True
    )


class ApiToken(Base):
    """Who may use the console and the admin API, with which role. Only the token's SHA-256 is
    stored: a database dump gives no one a working token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator | admin
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class NotificationEvent(Base):
    """The outbox: one row per thing worth telling a receiver, written in the transaction of
    what it reports, so an event exists exactly when its cause committed."""

    __tablename__ = "notification_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # What makes two writes of one event one row: transition:<rollout>:<version>, …
    key: Mapped[str] = mapped_column(String(200), unique=True)
    rollout: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))  # transition | verdict | slice | ...
    severity: Mapped[str] = mapped_column(String(16))  # info | warning | critical
    summary: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class NotificationDelivery(Base):
    """One event for one receiver: pending until a 2xx, retried with backoff."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "receiver", name="uq_delivery_event_receiver"),
        Index("ix_deliveries_pending", "delivered_at", "receiver", "event_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("notification_events.id", ondelete="CASCADE"))
    receiver: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Approval(Base):
    """An external approval a stage needs before it advances: one per rollout version (the
    stage attempt it was asked for), so a retried stage asks again."""

    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("rollout_id", "version", name="uq_approval_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # pending | approved | denied | timed_out
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime)
    asks: Mapped[int] = mapped_column(Integer, default=0)
    decided_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
