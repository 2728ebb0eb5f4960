"""The blocking user database.

Used directly by the admin CLI, and by the server only through
``kerjostunt.store.api.AsyncStore`` (which runs every call in a thread pool).
Every public method is one transaction. SQLAlchemy errors never escape:
they come out as ``StoreError`` subclasses, so callers need to know only
this module's exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from kerjostunt.store.queries import translated
from kerjostunt.store.realm import RealmKeeper, RealmMismatch
from kerjostunt.store.records import (
    HA1_ALGORITHMS,
    IMPORT_COLUMNS,
    NAME_RE,
    OUTCOMES,
    RECENT_ATTEMPTS,
    RECENT_WINDOW,
    STUNT_STATES,
    AttemptRecord,
    Duplicate,
    ImportRowError,
    InvalidName,
    InvalidValue,
    PairOutcome,
    StoreError,
    StoreUnavailable,
    UnknownGroup,
    UnknownUser,
    UserRecord,
    check_name,
    ha1,
    next_states,
    pair_flag,
)
from kerjostunt.store.usage import UsageLog
from kerjostunt.store.users import UsersAndGroups

__all__ = [
    "HA1_ALGORITHMS",
    "IMPORT_COLUMNS",
    "MIGRATIONS_DIR",
    "NAME_RE",
    "OUTCOMES",
    "RECENT_ATTEMPTS",
    "RECENT_WINDOW",
    "STUNT_STATES",
    "AttemptRecord",
    "Database",
    "PairOutcome",
    "RealmMismatch",
    "pair_flag",
    "Duplicate",
    "ImportRowError",
    "InvalidName",
    "InvalidValue",
    "StoreError",
    "StoreUnavailable",
    "UnknownGroup",
    "UnknownUser",
    "UserRecord",
    "check_name",
    "ha1",
    "next_states",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class Database(UsersAndGroups, UsageLog, RealmKeeper):
    """One SQLAlchemy engine and the operations on users, groups and attempts.

    The operations live in ``store.users`` (users and groups) and
    ``store.usage`` (what the server records); this class opens the
    engine and keeps the schema current.
    """

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise StoreUnavailable(f"bad database URL {url!r}") from e
        if parsed.drivername in ("postgresql", "postgres"):
            # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg2")
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if parsed.database in (None, "", ":memory:"):
                # One shared connection, or each thread would see its own empty db.
                kwargs["poolclass"] = StaticPool
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise StoreUnavailable(f"cannot use database URL {url!r}: {e}") from e
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)

    # -- lifecycle -----------------------------------------------------

    @translated
    def upgrade(self) -> None:
        """Bring the schema to the latest Alembic revision (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
