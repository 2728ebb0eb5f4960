"""The blocking user database.

Used directly by the admin CLI, and by the server only through
``kerjostunt.store.api.AsyncStore`` (which runs every call in a thread pool).
Every public method is one transaction. SQLAlchemy errors never escape:
they come out as ``StoreError`` subclasses, so callers need to know only
this module's exceptions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from kerjostunt.store.models import Attempt, Base, Group, Membership, User

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
STUNT_STATES = ("unknown", "direct", "stunt", "unreachable")
OUTCOMES = ("direct", "stunt", "failed")
HA1_ALGORITHMS = {"MD5": (hashlib.md5, 32), "SHA-256": (hashlib.sha256, 64)}

# The "unreachable" rule looks at this many of the user's latest attempts,
# no older than this window (seconds) before the attempt being recorded.
RECENT_ATTEMPTS = 3
RECENT_WINDOW = 24 * 3600.0

# The per-REGISTER queries, built once and run through Core: an ORM Session and
# building the statement each time cost several times the query itself
# (docs/performance.rst).
# The Tables themselves (``Model.__table__`` is typed as any FromClause).
_USERS = Base.metadata.tables[User.__tablename__]
_MEMBERSHIPS = Base.metadata.tables[Membership.__tablename__]
_ATTEMPTS = Base.metadata.tables[Attempt.__tablename__]
_HA1_QUERIES = {
    algorithm: select(column).where(_USERS.c.user_id == bindparam("user_id"))
    for algorithm, column in (("MD5", _USERS.c.ha1_md5), ("SHA-256", _USERS.c.ha1_sha256))
}
_HA1_MANY = select(_USERS.c.user_id, _USERS.c.ha1_md5, _USERS.c.ha1_sha256).where(
    _USERS.c.user_id.in_(bindparam("user_ids", expanding=True))
)
_HA1_MANY_COLUMNS = {"MD5": 1, "SHA-256": 2}  # positions in _HA1_MANY's rows
_USER_ROW = select(_USERS).where(_USERS.c.user_id == bindparam("user_id"))
_USER_GROUPS = (
    select(_MEMBERSHIPS.c.group_name)
    .where(_MEMBERSHIPS.c.user_id == bindparam("user_id"))
    .order_by(_MEMBERSHIPS.c.group_name)
)
_SHARE_GROUP = select(func.count()).where(
    _MEMBERSHIPS.c.user_id == bindparam("b"),
    _MEMBERSHIPS.c.group_name.in_(
        select(_MEMBERSHIPS.c.group_name).where(_MEMBERSHIPS.c.user_id == bindparam("a"))
    ),
)
# "Does the callee exist, and does it share a group with the caller?" in one
# statement: the server asks this for every INVITE.
_CALL_CHECK = select(
    select(_USERS.c.user_id).where(_USERS.c.user_id == bindparam("b")).exists().label("known"),
    select(_MEMBERSHIPS.c.group_name)
    .where(
        _MEMBERSHIPS.c.user_id == bindparam("b"),
        _MEMBERSHIPS.c.group_name.in_(
            select(_MEMBERSHIPS.c.group_name).where(_MEMBERSHIPS.c.user_id == bindparam("a"))
        ),
    )
    .exists()
    .label("shared"),
)
_ATTEMPT_INSERT = insert(_ATTEMPTS)
_LOCK_STATES = (
    select(_USERS.c.user_id, _USERS.c.stunt_state)
    .where(_USERS.c.user_id.in_(bindparam("user_ids", expanding=True)))
    .order_by(_USERS.c.user_id)
    .with_for_update()
)
_RECENT_OUTCOMES = (
    select(_ATTEMPTS.c.outcome)
    .where(
        or_(_ATTEMPTS.c.caller == bindparam("user_id"), _ATTEMPTS.c.callee == bindparam("user_id")),
        _ATTEMPTS.c.at >= bindparam("since"),
        _ATTEMPTS.c.at <= bindparam("until"),
    )
    .order_by(_ATTEMPTS.c.at.desc(), _ATTEMPTS.c.id.desc())
    .limit(RECENT_ATTEMPTS)
)
_STATE_UPDATE = (
    update(_USERS).where(_USERS.c.user_id == bindparam("b_user_id")).values(stunt_state=bindparam("b_state"))
)
_SEEN_UPDATE = (
    update(_USERS)
    .where(_USERS.c.user_id == bindparam("b_user_id"))  # a column's own name is reserved in UPDATE
    .values(public_ip=bindparam("b_ip"), public_port=bindparam("b_port"), last_seen=bindparam("b_when"))
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
IMPORT_COLUMNS = frozenset({"user_id", "password", "ha1_md5", "ha1_sha256", "groups"})
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_CHUNK = 500  # IN-list size for bulk look-ups


class StoreError(Exception):
    """Base of every error the store reports."""


class UnknownUser(StoreError):
    pass


class UnknownGroup(StoreError):
    pass


class Duplicate(StoreError):
    pass


class InvalidName(StoreError):
    pass


class InvalidValue(StoreError):
    """A value other than a name is not acceptable (HA1, state, outcome...)."""


class StoreUnavailable(StoreError):
    """The database could not be reached or failed (an outage, a bad URL)."""


class ImportRowError(StoreError):
    def __init__(self, row: int, message: str) -> None:
        super().__init__(f"row {row}: {message}")
        self.row = row
        self.detail = message


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    realm: str
    stunt_state: str
    public_ip: str | None
    public_port: int | None
    nat: dict[str, Any] | None
    last_seen: float | None
    groups: tuple[str, ...]


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    call_id: str
    caller: str
    callee: str
    technique: str | None
    outcome: str
    predicted: str | None
    actual: str | None
    duration_ms: float | None
    when: float


def next_states(
    outcome: str,
    caller_state: str,
    callee_state: str,
    callee_recent: Sequence[str],
) -> tuple[str, str]:
    """The "use STUNT" flag rule: (caller, callee) states after an attempt.

    ``callee_recent`` holds the outcomes of the callee's latest attempts
    (``RECENT_ATTEMPTS`` of them within ``RECENT_WINDOW``, as caller or
    callee), the one being recorded included. Kept in one place so the
    policy is easy to change; docs/admin.rst describes it.
    """
    if outcome == "direct":
        return caller_state, "direct"
    if outcome == "stunt":
        return ("direct" if caller_state == "direct" else "stunt"), "stunt"
    if callee_recent and all(o == "failed" for o in callee_recent):
        return caller_state, "unreachable"
    return caller_state, callee_state


def ha1(algorithm: str, user_id: str, realm: str, password: str) -> str:
    """HA1 = H(user:realm:password) as lowercase hex (RFC 7616)."""
    hasher = HA1_ALGORITHMS[algorithm][0]
    return hasher(f"{user_id}:{realm}:{password}".encode()).hexdigest()


def check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid {what} {name!r}: 1-64 characters of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit"
        )
    return name


def _check_ha1(value: str | None, algorithm: str) -> str | None:
    if value is None or value == "":
        return None
    length = HA1_ALGORITHMS[algorithm][1]
    value = value.strip().lower()
    if len(value) != length or not _HEX_RE.match(value):
        raise InvalidValue(f"{algorithm} HA1 must be {length} hex digits")
    return value


def _credentials(
    user_id: str,
    realm: str,
    password: str | None,
    ha1_md5: str | None,
    ha1_sha256: str | None,
) -> dict[str, str | None]:
    if password is not None and (ha1_md5 or ha1_sha256):
        raise InvalidValue("give either a password or HA1 values, not both")
    if password is not None:
        if password == "":
            raise InvalidValue("empty password")
        return {
            "ha1_md5": ha1("MD5", user_id, realm, password),
            "ha1_sha256": ha1("SHA-256", user_id, realm, password),
        }
    md5 = _check_ha1(ha1_md5, "MD5")
    sha = _check_ha1(ha1_sha256, "SHA-256")
    if md5 is None and sha is None:
        raise InvalidValue("a password or at least one HA1 is needed")
    return {"ha1_md5": md5, "ha1_sha256": sha}


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_F = TypeVar("_F", bound=Callable[..., Any])


def _translated(method: _F) -> _F:
    """Turn driver errors (an outage, a lost connection) into StoreUnavailable."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StoreError:
            raise
        except DBAPIError as e:
            detail = " ".join(str(e.orig).split())  # one line, for logs and the CLI
            raise StoreUnavailable(f"database error: {detail}") from e

    return wrapper  # type: ignore[return-value]


class Database:
    """One SQLAlchemy engine and the operations on users, groups and attempts."""

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

    @_translated
    def upgrade(self) -> None:
        """Bring the schema to the latest Alembic revision (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- users ---------------------------------------------------------

    @_translated
    def add_user(
        self,
        user_id: str,
        realm: str,
        password: str | None = None,
        ha1_md5: str | None = None,
        ha1_sha256: str | None = None,
    ) -> None:
        check_name(user_id, "user ID")
        creds = _credentials(user_id, realm, password, ha1_md5, ha1_sha256)
        with self._session() as s, s.begin():
            if s.get(User, user_id) is not None:
                raise Duplicate(f"user {user_id!r} already exists")
            s.add(User(user_id=user_id, realm=realm, stunt_state="unknown", **creds))
            try:
                s.flush()
            except IntegrityError as e:  # lost a race with another writer
                raise Duplicate(f"user {user_id!r} already exists") from e

    @_translated
    def set_password(self, user_id: str, realm: str, password: str) -> None:
        creds = _credentials(user_id, realm, password, None, None)
        with self._session() as s, s.begin():
            user = self._user(s, user_id)
            user.realm = realm
            user.ha1_md5 = creds["ha1_md5"]
            user.ha1_sha256 = creds["ha1_sha256"]

    @_translated
    def delete_user(self, user_id: str) -> None:
        with self._session() as s, s.begin():
            self._user(s, user_id)
            s.execute(delete(Membership).where(Membership.user_id == user_id))
            s.execute(delete(User).where(User.user_id == user_id))

    @_translated
    def get_user(self, user_id: str) -> UserRecord:
        # Core, not an ORM Session: the server asks this for every INVITE.
        with self.engine.connect() as c:
            user = c.execute(_USER_ROW, {"user_id": user_id}).first()
            if user is None:
                raise UnknownUser(f"unknown user {user_id!r}")
            groups = c.execute(_USER_GROUPS, {"user_id": user_id}).scalars().all()
            return _record(user, groups)  # type: ignore[arg-type]

    @_translated
    def list_users(self) -> list[UserRecord]:
        with self._session() as s:
            groups: dict[str, list[str]] = {}
            for group_name, user_id in s.execute(
                select(Membership.group_name, Membership.user_id).order_by(
                    Membership.group_name
                )
            ):
                groups.setdefault(user_id, []).append(group_name)
            users = s.scalars(select(User).order_by(User.user_id))
            return [_record(u, groups.get(u.user_id, [])) for u in users]

    @_translated
    def get_ha1(self, user_id: str, algorithm: str) -> str | None:
        query = _HA1_QUERIES.get(algorithm.upper())
        if query is None:
            raise InvalidValue(f"unknown digest algorithm {algorithm!r}")
        with self.engine.connect() as c:
            return c.execute(query, {"user_id": user_id}).scalar()

    @_translated
    def get_ha1_many(self, wanted: Sequence[tuple[str, str]]) -> list[str | None]:
        """``get_ha1`` for many ``(user_id, algorithm)`` pairs in one query per
        500 users; the answers in the same order (None: no such user or HA1).

        The server gathers the REGISTERs of a few milliseconds into one call
        (``AsyncStore.get_ha1``)."""
        columns = _HA1_MANY_COLUMNS
        for _user_id, algorithm in wanted:
            if algorithm.upper() not in columns:
                raise InvalidValue(f"unknown digest algorithm {algorithm!r}")
        rows: dict[str, Any] = {}
        with self.engine.connect() as c:
            for chunk in _chunks(list(dict.fromkeys(user_id for user_id, _ in wanted))):
                rows.update((row[0], row) for row in c.execute(_HA1_MANY, {"user_ids": list(chunk)}))
        return [
            rows[user_id][columns[algorithm.upper()]] if user_id in rows else None
            for user_id, algorithm in wanted
        ]

    @_translated
    def import_users(self, rows: Iterable[Mapping[str, str | None]], realm: str) -> int:
        """Create many users in one transaction: all of them or none.

        Rows are ``csv.DictReader`` rows (see docs/admin.rst for the format).
        Validation happens before anything is written, so a bad row costs no
        rollback; the inserts are executemany batches.
        """
        users: list[dict[str, Any]] = []
        memberships: list[dict[str, str]] = []
        wanted_groups: set[str] = set()
        row_of: dict[str, int] = {}
        for number, row in enumerate(rows, start=1):
            user, groups = _import_row(number, row, realm)
            if user["user_id"] in row_of:
                raise ImportRowError(
                    number,
                    f"user_id {user['user_id']!r} repeats row {row_of[user['user_id']]}",
                )
            row_of[user["user_id"]] = number
            users.append(user)
            wanted_groups.update(groups)
            memberships.extend({"group_name": g, "user_id": user["user_id"]} for g in groups)
        if not users:
            return 0
        with self._session() as s, s.begin():
            ids = list(row_of)
            for chunk in _chunks(ids):
                existing = s.scalars(select(User.user_id).where(User.user_id.in_(chunk))).all()
                if existing:
                    first = min(existing, key=row_of.__getitem__)
                    raise ImportRowError(row_of[first], f"user {first!r} already exists")
            names = sorted(wanted_groups)
            have: set[str] = set()
            for chunk in _chunks(names):
                have.update(s.scalars(select(Group.name).where(Group.name.in_(chunk))))
            missing = [{"name": n} for n in names if n not in have]
            if missing:
                s.execute(insert(Group), missing)
            s.execute(insert(User), users)
            if memberships:
                s.execute(insert(Membership), memberships)
        return len(users)

    # -- groups --------------------------------------------------------

    @_translated
    def add_group(self, name: str) -> None:
        check_name(name, "group name")
        with self._session() as s, s.begin():
            if s.get(Group, name) is not None:
                raise Duplicate(f"group {name!r} already exists")
            s.add(Group(name=name))
            try:
                s.flush()
            except IntegrityError as e:
                raise Duplicate(f"group {name!r} already exists") from e

    @_translated
    def delete_group(self, name: str) -> None:
        with self._session() as s, s.begin():
            self._group(s, name)
            s.execute(delete(Membership).where(Membership.group_name == name))
            s.execute(delete(Group).where(Group.name == name))

    @_translated
    def join_group(self, name: str, user_ids: Sequence[str]) -> None:
        """Add users to a group; users already in it are left alone."""
        with self._session() as s, s.begin():
            self._group(s, name)
            wanted = self._existing_users(s, user_ids)
            present = set(
                s.scalars(
                    select(Membership.user_id).where(
                        Membership.group_name == name, Membership.user_id.in_(wanted)
                    )
                )
            )
            new = [{"group_name": name, "user_id": u} for u in wanted if u not in present]
            if new:
                s.execute(insert(Membership), new)

    @_translated
    def leave_group(self, name: str, user_ids: Sequence[str]) -> None:
        """Remove users from a group; users not in it are ignored."""
        with self._session() as s, s.begin():
            self._group(s, name)
            wanted = self._existing_users(s, user_ids)
            s.execute(
                delete(Membership).where(
                    Membership.group_name == name, Membership.user_id.in_(wanted)
                )
            )

    @_translated
    def list_groups(self) -> dict[str, list[str]]:
        with self._session() as s:
            result: dict[str, list[str]] = {
                name: [] for name in s.scalars(select(Group.name).order_by(Group.name))
            }
            for group_name, user_id in s.execute(
                select(Membership.group_name, Membership.user_id).order_by(
                    Membership.group_name, Membership.user_id
                )
            ):
                result[group_name].append(user_id)
            return result

    @_translated
    def groups_of(self, user_id: str) -> list[str]:
        """The user's groups; UnknownUser if there is no such user."""
        with self._session() as s:
            self._user(s, user_id)
            return self._groups_of(s, user_id)

    @_translated
    def share_group(self, a: str, b: str) -> bool:
        """True when some group holds both users (the trust relation)."""
        with self.engine.connect() as c:  # Core: once per INVITE
            return bool(c.execute(_SHARE_GROUP, {"a": a, "b": b}).scalar())

    @_translated
    def call_check(self, caller: str, callee: str) -> str:
        """'unknown' (no such callee), 'no-group' (no group holds both) or 'ok'.

        One query for what an INVITE needs, instead of get_user + share_group.
        """
        with self.engine.connect() as c:
            known, shared = c.execute(_CALL_CHECK, {"a": caller, "b": callee}).one()
        if not known:
            return "unknown"
        return "ok" if shared else "no-group"

    @_translated
    def is_member(self, group: str, user_id: str) -> bool:
        with self._session() as s:
            self._group(s, group)
            return s.get(Membership, (group, user_id)) is not None

    @_translated
    def group_members(self, group: str) -> list[UserRecord]:
        with self._session() as s:
            self._group(s, group)
            users = s.scalars(
                select(User)
                .join(Membership, Membership.user_id == User.user_id)
                .where(Membership.group_name == group)
                .order_by(User.user_id)
            ).all()
            groups: dict[str, list[str]] = {}
            ids = [u.user_id for u in users]
            for chunk in _chunks(ids):
                for group_name, user_id in s.execute(
                    select(Membership.group_name, Membership.user_id)
                    .where(Membership.user_id.in_(chunk))
                    .order_by(Membership.group_name)
                ):
                    groups.setdefault(user_id, []).append(group_name)
            return [_record(u, groups.get(u.user_id, [])) for u in users]

    # -- what the server observes -------------------------------------

    @_translated
    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> None:
        with self.engine.begin() as c:
            result = c.execute(_SEEN_UPDATE, {"b_user_id": user_id, "b_ip": ip, "b_port": int(port), "b_when": when})
            if result.rowcount == 0:
                raise UnknownUser(f"unknown user {user_id!r}")

    @_translated
    def record_seen_many(self, rows: Sequence[tuple[str, str, int, float]]) -> list[str]:
        """``record_seen`` for many ``(user_id, ip, port, when)`` rows in one
        transaction, in order; returns the user IDs that do not exist.

        The server's write-behind (``AsyncStore.record_seen``) gathers a
        REGISTER's worth of these per 100 ms: one commit instead of one each.
        """
        if not rows:
            return []
        params = [
            {"b_user_id": user_id, "b_ip": ip, "b_port": int(port), "b_when": when}
            for user_id, ip, port, when in rows
        ]
        with self.engine.begin() as c:
            result = c.execute(_SEEN_UPDATE, params)
            if self.engine.dialect.supports_sane_multi_rowcount and result.rowcount == len(params):
                return []
            wanted = list(dict.fromkeys(row[0] for row in rows))
            found: set[str] = set()
            for chunk in _chunks(wanted):
                found.update(c.execute(select(_USERS.c.user_id).where(_USERS.c.user_id.in_(chunk))).scalars())
        return [user_id for user_id in wanted if user_id not in found]

    @_translated
    def record_nat(self, user_id: str, nat: Mapping[str, Any], when: float) -> None:
        try:
            text = json.dumps(dict(nat), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise InvalidValue(f"NAT description is not JSON: {e}") from e
        with self.engine.begin() as c:
            result = c.execute(update(_USERS).where(_USERS.c.user_id == user_id).values(nat=text, last_seen=when))
            if result.rowcount == 0:
                raise UnknownUser(f"unknown user {user_id!r}")

    @_translated
    def record_attempt(
        self,
        call_id: str,
        caller: str,
        callee: str,
        technique: str | None,
        outcome: str,
        predicted: str | None,
        actual: str | None,
        duration_ms: float | None,
        when: float,
    ) -> dict[str, str]:
        """Store one attempt and apply the flag rule (``next_states``).

        The attempt is stored even if a user has been deleted meanwhile;
        the returned ``{user_id: state}`` holds the users that still exist.
        """
        if outcome not in OUTCOMES:
            raise InvalidValue(f"outcome must be one of {', '.join(OUTCOMES)}")
        # Core, not an ORM Session: once per call, and the Session cost several
        # times the SQL (docs/performance.rst).
        with self.engine.begin() as c:
            c.execute(
                _ATTEMPT_INSERT,
                {
                    "call_id": call_id,
                    "caller": caller,
                    "callee": callee,
                    "technique": technique,
                    "outcome": outcome,
                    "predicted": predicted,
                    "actual": actual,
                    "duration_ms": duration_ms,
                    "at": when,
                },
            )
            # Lock both rows, in a fixed order, so concurrent outcomes for the
            # same user (PostgreSQL, several workers) apply one after another.
            locked = {
                row.user_id: row.stunt_state
                for row in c.execute(_LOCK_STATES, {"user_ids": sorted({caller, callee})})
            }
            recent = c.execute(
                _RECENT_OUTCOMES, {"user_id": callee, "since": when - RECENT_WINDOW, "until": when}
            ).scalars().all()
            new_caller, new_callee = next_states(
                outcome,
                locked.get(caller, "unknown"),
                locked.get(callee, "unknown"),
                list(recent),
            )
            states: dict[str, str] = {}
            for user_id, state in ((caller, new_caller), (callee, new_callee)):
                if user_id in locked:
                    states[user_id] = state
            for user_id, state in states.items():
                if state != locked[user_id]:
                    c.execute(_STATE_UPDATE, {"b_user_id": user_id, "b_state": state})
            return states

    @_translated
    def set_stunt_state(self, user_id: str, state: str) -> None:
        if state not in STUNT_STATES:
            raise InvalidValue(f"state must be one of {', '.join(STUNT_STATES)}")
        with self._session() as s, s.begin():
            self._user(s, user_id).stunt_state = state

    @_translated
    def recent_attempts(self, user_id: str, limit: int = 20) -> list[AttemptRecord]:
        """The user's latest attempts, as caller or callee, newest first."""
        with self._session() as s:
            rows = s.scalars(
                select(Attempt)
                .where(or_(Attempt.caller == user_id, Attempt.callee == user_id))
                .order_by(Attempt.at.desc(), Attempt.id.desc())
                .limit(limit)
            )
            return [
                AttemptRecord(
                    id=a.id,
                    call_id=a.call_id,
                    caller=a.caller,
                    callee=a.callee,
                    technique=a.technique,
                    outcome=a.outcome,
                    predicted=a.predicted,
                    actual=a.actual,
                    duration_ms=a.duration_ms,
                    when=a.at,
                )
                for a in rows
            ]

    # -- helpers -------------------------------------------------------

    @staticmethod
    def _user(s: Session, user_id: str) -> User:
        user = s.get(User, user_id)
        if user is None:
            raise UnknownUser(f"unknown user {user_id!r}")
        return user

    @staticmethod
    def _group(s: Session, name: str) -> Group:
        group = s.get(Group, name)
        if group is None:
            raise UnknownGroup(f"unknown group {name!r}")
        return group

    @staticmethod
    def _groups_of(s: Session, user_id: str) -> list[str]:
        return list(
            s.scalars(
                select(Membership.group_name)
                .where(Membership.user_id == user_id)
                .order_by(Membership.group_name)
            )
        )

    @staticmethod
    def _existing_users(s: Session, user_ids: Sequence[str]) -> list[str]:
        """The given IDs, deduplicated; UnknownUser names every missing one."""
        wanted = list(dict.fromkeys(user_ids))
        found: set[str] = set()
        for chunk in _chunks(wanted):
            found.update(s.scalars(select(User.user_id).where(User.user_id.in_(chunk))))
        missing = [u for u in wanted if u not in found]
        if missing:
            raise UnknownUser("unknown user " + ", ".join(repr(u) for u in missing))
        return wanted


def _record(user: User, groups: Iterable[str]) -> UserRecord:
    return UserRecord(
        user_id=user.user_id,
        realm=user.realm,
        stunt_state=user.stunt_state,
        public_ip=user.public_ip,
        public_port=user.public_port,
        nat=json.loads(user.nat) if user.nat else None,
        last_seen=user.last_seen,
        groups=tuple(groups),
    )


def _import_row(
    number: int, row: Mapping[str, str | None], realm: str
) -> tuple[dict[str, Any], list[str]]:
    """Validate one CSV row; return the users-table values and its groups."""
    if None in row:
        raise ImportRowError(number, "more fields than the header has columns")
    unknown = sorted(set(row) - IMPORT_COLUMNS)
    if unknown:
        raise ImportRowError(
            number,
            f"unknown column {unknown[0]!r} (expected user_id, password, "
            "ha1_md5, ha1_sha256, groups)",
        )

    def value(column: str) -> str:
        return (row.get(column) or "").strip()

    user_id = value("user_id")
    if not user_id:
        raise ImportRowError(number, "column user_id: empty or missing")
    if not NAME_RE.match(user_id):
        raise ImportRowError(number, f"column user_id: invalid user ID {user_id!r}")
    password = row.get("password") or None  # passwords are taken verbatim
    md5, sha = value("ha1_md5") or None, value("ha1_sha256") or None
    if password is not None and (md5 or sha):
        raise ImportRowError(number, "column password: give a password or HA1s, not both")
    if password is None and md5 is None and sha is None:
        raise ImportRowError(number, "column password: no password, ha1_md5 or ha1_sha256")
    try:
        if password is not None:
            creds = _credentials(user_id, realm, password, None, None)
        else:
            creds = {"ha1_md5": _check_ha1(md5, "MD5")}
            try:
                creds["ha1_sha256"] = _check_ha1(sha, "SHA-256")
            except InvalidValue as e:
                raise ImportRowError(number, f"column ha1_sha256: {e}") from e
    except InvalidValue as e:
        column = "password" if password is not None else "ha1_md5"
        raise ImportRowError(number, f"column {column}: {e}") from e
    groups = list(dict.fromkeys(value("groups").split()))
    for g in groups:
        if not NAME_RE.match(g):
            raise ImportRowError(number, f"column groups: invalid group name {g!r}")
    user = {
        "user_id": user_id,
        "realm": realm,
        "stunt_state": "unknown",
        "public_ip": None,
        "public_port": None,
        "nat": None,
        "last_seen": None,
        **creds,
    }
    return user, groups


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
