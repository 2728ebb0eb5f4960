"""SQLAlchemy models.

The schema itself is owned by the Alembic migrations in ``migrations/``;
these classes must describe the same tables (``tests.test_store`` checks the
two agree). User IDs and group names are the primary keys: they are what
every caller has in hand, and it lets ``import_users`` insert memberships in
bulk without reading generated IDs back.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    realm: Mapped[str] = mapped_column(String(255))
    # Only HA1 = H(user:realm:password) is kept, never the password.
    ha1_md5: Mapped[str | None] = mapped_column(String(32))
    ha1_sha256: Mapped[str | None] = mapped_column(String(64))
    stunt_state: Mapped[str] = mapped_column(String(16), default="unknown")
    public_ip: Mapped[str | None] = mapped_column(String(45))
    public_port: Mapped[int | None] = mapped_column(Integer)
    nat: Mapped[str | None] = mapped_column(Text)  # JSON from prediction.py
    last_seen: Mapped[float | None] = mapped_column(Float)
    # may read /status (migration 0002; ``kerjostunt user operator ID on``)
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Group(Base):
    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)


class Membership(Base):
    __tablename__ = "memberships"

    group_name: Mapped[str] = mapped_column(
        String(64), ForeignKey("groups.name", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("users.user_id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_memberships_user_id", "user_id"),)


class Attempt(Base):
    """One traversal attempt. Caller/callee are plain strings, not foreign
    keys: the history outlives a deleted user."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(255))
    caller: Mapped[str] = mapped_column(String(64))
    callee: Mapped[str] = mapped_column(String(64))
    technique: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    predicted: Mapped[str | None] = mapped_column(String(255))
    actual: Mapped[str | None] = mapped_column(String(255))
    duration_ms: Mapped[float | None] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)
    #: whose own report agrees with ``outcome`` (comma-separated user IDs; NULL: rows from before 0002)
    witnesses: Mapped[str | None] = mapped_column(String(140), nullable=True)
    # JSON: each side's techniques tried and their results, predictions, NATs (migration 0003)
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_attempts_caller_at", "caller", "at"),
        Index("ix_attempts_callee_at", "callee", "at"),
    )


class ClusterInstance(Base):
    """One running server of a cluster and its lease (``store/presence.py``).

    ``lease_until`` is in the database's clock (seconds since the epoch), so
    instances on machines whose clocks disagree still agree on who is alive.
    """

    __tablename__ = "cluster_instances"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    sip_port: Mapped[int] = mapped_column(Integer)
    probe_ports: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Float)
    lease_until: Mapped[float] = mapped_column(Float)


class ClusterBinding(Base):
    """Which instance holds a registered user's signaling connection (one row per user)."""

    __tablename__ = "cluster_bindings"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(64))
    public_ip: Mapped[str] = mapped_column(String(45))
    public_port: Mapped[int] = mapped_column(Integer)
    bound_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_cluster_bindings_instance_id", "instance_id"),)


class Meta(Base):
    """Facts about the database itself, by key: ``realm`` (store/realm.py)."""

    __tablename__ = "kerjostunt_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
