"""The incremental judge and the scorer pool: judge state, fold progress, claims, sampling

The (rollout, stage, time) index on requests becomes (rollout, time, id): every
bounded read (shadow-log pages, a stage's recent requests, the lost-output window)
walks a rollout's requests by time.

Every mirrored request of a rollout starts `pending` (the judge folds it once, on
its first tick after the upgrade, which is the one full pass over history); every
other request is `done`. Existing scores were all sampled. No row is rewritten
beyond those defaults, and none is lost.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(
            sa.Column("judge_progress", sa.SmallInteger(), nullable=False, server_default="0")
        )
        batch.create_index(
            "ix_requests_judge_pending", ["rollout_id", "judge_progress", "created_at"]
        )
        batch.drop_index("ix_requests_rollout_stage_time")
        batch.create_index("ix_requests_rollout_time", ["rollout_id", "created_at", "id"])
    op.execute("UPDATE requests SET judge_progress = 2 WHERE NOT mirrored OR rollout_id IS NULL")
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("claim_expires", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("scores") as batch:
        batch.add_column(
            sa.Column("sampled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    op.create_table(
        "judge_states",
        sa.Column(
            "rollout_id",
            sa.Integer(),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("attempt_started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reconciled_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stage_count", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("judge_states")
    with op.batch_alter_table("scores") as batch:
        batch.drop_column("sampled")
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("claim_expires")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("requests") as batch:
        batch.drop_index("ix_requests_judge_pending")
        batch.drop_index("ix_requests_rollout_time")
        batch.create_index("ix_requests_rollout_stage_time", ["rollout_id", "stage", "created_at"])
        batch.drop_column("judge_progress")
