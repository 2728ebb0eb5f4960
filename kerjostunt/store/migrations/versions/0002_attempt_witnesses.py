"""Attempts keep whose own report their outcome is (issue 13: one-sided outcomes).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

``witnesses``: the user IDs, comma-separated, whose own outcome report
agrees with the attempt's outcome; NULL in rows written before (the flag
rule counts them as both sides' reports, as it did).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("witnesses", sa.String(140), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("witnesses")
