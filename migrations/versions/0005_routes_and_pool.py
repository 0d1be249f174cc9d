"""The playbook shape: routes on rollouts and requests, the model and fallback link on outputs

An existing database's rollout becomes the `generate` route's rollout (the
server default fills every existing row), and every request it holds is a
`generate` request; no row is rewritten or lost.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(
            sa.Column("route", sa.String(32), nullable=False, server_default="generate")
        )
    with op.batch_alter_table("requests") as batch:
        batch.add_column(
            sa.Column("route", sa.String(32), nullable=False, server_default="generate")
        )
        batch.alter_column("rollout_id", existing_type=sa.Integer(), nullable=True)
        batch.create_index("ix_requests_route_time", ["route", "created_at"])
    with op.batch_alter_table("outputs") as batch:
        batch.add_column(sa.Column("model", sa.String(64), nullable=True))
        batch.add_column(sa.Column("fallback_of", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outputs") as batch:
        batch.drop_column("fallback_of")
        batch.drop_column("model")
    op.execute("DELETE FROM requests WHERE rollout_id IS NULL")
    with op.batch_alter_table("requests") as batch:
        batch.drop_index("ix_requests_route_time")
        batch.alter_column("rollout_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("route")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("route")
