"""outputs.scored_at: when the scorer ran its probes on an output (null: not yet)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("scored_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_outputs_scored_at", ["scored_at"])


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_index("ix_outputs_scored_at")
        batch.drop_column("scored_at")
