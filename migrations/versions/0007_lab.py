"""The lab phase: bake-off and validation runs, their rendered outputs, and validations

New tables only; nothing existing changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lab_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("suites", sa.JSON(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("baseline", sa.String(64), nullable=False),
        sa.Column("seeds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
    )
    op.create_table(
        "lab_outputs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "run_id",
            sa.Integer(),
            sa.ForeignKey("lab_runs.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(160), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=True),
        sa.Column("artifact_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.UniqueConstraint("run_id", "model", "unit", name="uq_lab_output_run_model_unit"),
    )
    op.create_table(
        "validations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rollout", sa.String(64), nullable=False),
        sa.Column("candidate", sa.Text(), nullable=False),
        sa.Column("incumbent", sa.Text(), nullable=False),
        sa.Column("suites", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "run_id",
            sa.Integer(),
            sa.ForeignKey("lab_runs.id", ondelete="SET NULL"),
            nullable=True,
        ),
    )
    op.create_index("ix_validations_rollout_time", "validations", ["rollout", "at"])


def downgrade() -> None:
    op.drop_index("ix_validations_rollout_time", "validations")
    op.drop_table("validations")
    op.drop_table("lab_outputs")
    op.drop_table("lab_runs")
