"""The realm lives in the database: a small key/value table, ``kerjostunt_meta``.

A database made before this revision takes its users' realm when they all
share one; otherwise the realm stays unset until a server or an admin
command sets it (store/realm.py).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "kerjostunt_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    realms = [row[0] for row in op.get_bind().execute(sa.text("SELECT DISTINCT realm FROM users"))]
    if len(realms) == 1:
        op.bulk_insert(meta, [{"key": "realm", "value": realms[0]}])


def downgrade() -> None:
    op.drop_table("kerjostunt_meta")
