"""The blocking user database.

Used directly by the admin CLI, and by the server only through
``kerjostunt.store.api.AsyncStore`` (which runs every call in a thread pool).
Every public method is one transaction. SQLAlchemy errors never escape:
they come out as ``StoreError`` subclasses, so callers need to know only
this module's exceptions.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from kerjostunt.store.operators import Operations
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
    StoreBusy,
    StoreError,
    StoreReadOnly,
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
    "StoreBusy",
    "StoreReadOnly",
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
#: the advisory lock key that serializes schema upgrades (any constant; "kerjo" in ASCII)
MIGRATION_LOCK = 0x6B65726A6F

#: seconds a statement waits for another connection's lock (SQLite's busy
#: timeout, PostgreSQL's ``lock_timeout``) unless told otherwise: an
#: operator's command may well wait for a server's write
CLI_BUSY_TIMEOUT = 30.0
#: the files of a SQLite database besides itself
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
PENDING_SUFFIX = ".pending.jsonl"
PRIVATE = 0o600


class Database(UsersAndGroups, UsageLog, Operations, RealmKeeper):
    """One SQLAlchemy engine and the operations on users, groups and attempts.

    The operations live in ``store.users`` (users and groups) and
    ``store.usage`` (what the server records) and ``store.operators``
    (what an operator reads, who is one); this class opens the
    engine and keeps the schema current.
    """

    def __init__(self, url: str, busy_timeout: float = CLI_BUSY_TIMEOUT) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise StoreUnavailable(f"bad database URL {url!r}") from e
        if parsed.drivername in ("postgresql", "postgres"):
            # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg2")
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        #: the SQLite file (absolute), None for ``:memory:`` and other databases
        self.path: Path | None = None
        #: can two threads use the database at once (own connections)? Not an
        #: in-memory SQLite database: its threads share one connection
        self.concurrent = True
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
            if parsed.database in (None, "", ":memory:"):
                # One shared connection, or each thread would see its own empty db.
                kwargs["poolclass"] = StaticPool
                self.concurrent = False
            elif parsed.database.startswith("file:"):  # an SQLite URI (``?mode=ro&uri=true``): SQLite opens it
                self.path = None
            else:
                self.path = Path(parsed.database).absolute()
        elif parsed.get_backend_name() == "postgresql":
            # A row another transaction holds fails the statement instead of
            # holding the store's thread for as long as that transaction lasts.
            kwargs["connect_args"] = {"options": f"-c lock_timeout={max(1, round(busy_timeout * 1000))}"}
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise StoreUnavailable(f"cannot use database URL {url!r}: {e}") from e
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        dialect = self.engine.dialect
        event.listen(self.engine, "connect", _note_idle)  # a new connection is alive
        event.listen(self.engine, "checkin", _note_idle)
        event.listen(self.engine, "checkout", lambda connection, record, _proxy: _ping_if_idle(
            dialect, connection, record))

    # -- lifecycle -----------------------------------------------------

    @translated
    def upgrade(self) -> None:
        """Bring the schema to the latest Alembic revision (idempotent).

        A SQLite file that does not exist yet is created first, mode 0600.
        On PostgreSQL the upgrade holds a transaction-scoped advisory lock:
        several instances starting at once on an empty database would each
        find no ``alembic_version`` and race to create the same tables (one
        fails with a duplicate). With the lock the second waits for the
        first's commit, then finds the schema at head and does nothing.
        """
        self.create_file()
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            if not self.is_sqlite:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- files -----------------------------------------------------------

    def exists(self) -> bool:
        """Is there a database to open? False only for a SQLite file that is not there."""
        return self.path is None or self.path.exists()

    @property
    def pending_path(self) -> Path | None:
        """Where the server keeps usage records it could not write (``store/pending.py``).

        Next to a SQLite file; in the working directory for other
        databases; None for an in-memory one (nowhere to keep them).
        """
        if self.path is not None:
            return self.path.with_name(self.path.name + PENDING_SUFFIX)
        if not self.concurrent:
            return None
        return Path("kerjostunt" + PENDING_SUFFIX).absolute()

    def create_file(self) -> None:
        """Create the empty SQLite file mode 0600 if there is none (SQLite gives
        its -wal and -shm files the database file's mode). Holds every HA1."""
        if self.path is None or self.path.exists():
            return
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE))
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreUnavailable(f"cannot create database file {self.path}: {e.strerror}") from e

    def secure_files(self) -> list[str]:
        """Make the SQLite file, its companions and the pending file 0600;
        one warning per file that was readable by others."""
        if self.path is None:
            return []
        files = [self.path.with_name(self.path.name + suffix) for suffix in SQLITE_COMPANIONS]
        if self.pending_path is not None:
            files.append(self.pending_path)
        warnings = []
        for path in [self.path, *files]:
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
                if mode & 0o077:
                    path.chmod(PRIVATE)
                    warnings.append(f"{path} was mode {mode:04o}, now 0600: it holds password hashes")
            except FileNotFoundError:
                continue
            except OSError as e:
                warnings.append(f"cannot make {path} private: {e.strerror}")
        return warnings


#: a pooled connection idle longer than this (seconds) is pinged before use
PING_AFTER = 1.0


def _note_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any) -> None:
    """SQLAlchemy's ``pool_pre_ping``, but only for connections idle over ``PING_AFTER``.

    The pre-ping was one round trip per checkout: on PostgreSQL a call's
    ``call_check`` cost three (ping, query, rollback). A connection used
    within the last second is taken as alive; if the database went away in
    that second the statement fails (``StoreBusy``: writes are retried, a
    read fails once) and SQLAlchemy drops the connection.
    """
    since = record.info.get("idle_since")
    if since is not None and time.monotonic() - since < PING_AFTER:
        return
    try:
        alive = dialect.do_ping(dbapi_connection)
    except Exception as e:  # the driver's error: the connection is gone
        raise DisconnectionError(str(e)) from e
    if alive is False:
        raise DisconnectionError("the database connection did not answer a ping")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
