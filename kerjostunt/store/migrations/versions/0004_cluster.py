"""Cluster presence: instances with their leases, and who holds each user's binding.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_instances",
        sa.Column("instance_id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("sip_port", sa.Integer, nullable=False),
        sa.Column("probe_ports", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("lease_until", sa.Float, nullable=False),
    )
    op.create_table(
        "cluster_bindings",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("public_ip", sa.String(45), nullable=False),
        sa.Column("public_port", sa.Integer, nullable=False),
        sa.Column("bound_at", sa.Float, nullable=False),
    )
    op.create_index("ix_cluster_bindings_instance_id", "cluster_bindings", ["instance_id"])


def downgrade() -> None:
    op.drop_table("cluster_bindings")
    op.drop_table("cluster_instances")
