"""Prompt slices: each request's tags, and each verdict's slice findings

`requests.tags` holds the tags `policies/prompt_tags.py` derived from the request
(the slices it belongs to); a request recorded before this revision has none, and the
judge derives them from its prompt and parameters when it folds it. `verdicts.slices`
holds the slices where a check FAILed at that verdict. Both are added empty: no row is
rewritten, and none is lost.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=True))
    with op.batch_alter_table("verdicts") as batch:
        batch.add_column(sa.Column("slices", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_column("slices")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("tags")
