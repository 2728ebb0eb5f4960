"""Initial schema: users, groups, memberships, attempts.

Revision ID: 0001
Revises:
Create Date: 2024-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("realm", sa.String(255), nullable=False),
        sa.Column("ha1_md5", sa.String(32), nullable=True),
        sa.Column("ha1_sha256", sa.String(64), nullable=True),
        sa.Column("stunt_state", sa.String(16), nullable=False),
        sa.Column("public_ip", sa.String(45), nullable=True),
        sa.Column("public_port", sa.Integer, nullable=True),
        sa.Column("nat", sa.Text, nullable=True),
        sa.Column("last_seen", sa.Float, nullable=True),
    )
    op.create_table(
        "groups",
        sa.Column("name", sa.String(64), primary_key=True),
    )
    op.create_table(
        "memberships",
        sa.Column(
            "group_name",
            sa.String(64),
            sa.ForeignKey("groups.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "user_id",
            sa.String(64),
            sa.ForeignKey("users.user_id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(255), nullable=False),
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("callee", sa.String(64), nullable=False),
        sa.Column("technique", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("predicted", sa.String(255), nullable=True),
        sa.Column("actual", sa.String(255), nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=True),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_attempts_caller_at", "attempts", ["caller", "at"])
    op.create_index("ix_attempts_callee_at", "attempts", ["callee", "at"])


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("memberships")
    op.drop_table("groups")
    op.drop_table("users")
