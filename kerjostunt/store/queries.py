"""The SQL side of the store: prebuilt statements and what every operation shares.

The per-REGISTER and per-call statements are built once and run through
SQLAlchemy Core; ``EngineBound`` holds the engine and the ORM helpers the
users, groups and usage operations have in common; ``translated`` turns
driver errors into ``StoreUnavailable``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from kerjostunt.store.models import Attempt, Base, Group, Membership, User
from kerjostunt.store.records import (
    RECENT_ATTEMPTS,
    StoreBusy,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
    UnknownGroup,
    UnknownUser,
    UserRecord,
)

# The Tables themselves (``Model.__table__`` is typed as any FromClause).
USERS = Base.metadata.tables[User.__tablename__]
MEMBERSHIPS = Base.metadata.tables[Membership.__tablename__]
ATTEMPTS = Base.metadata.tables[Attempt.__tablename__]

# The per-REGISTER queries, built once and run through Core: an ORM Session and
# building the statement each time cost several times the query itself
# (docs/performance.rst).
HA1_QUERIES = {
    algorithm: select(column).where(USERS.c.user_id == bindparam("user_id"))
    for algorithm, column in (("MD5", USERS.c.ha1_md5), ("SHA-256", USERS.c.ha1_sha256))
}
HA1_MANY = select(USERS.c.user_id, USERS.c.ha1_md5, USERS.c.ha1_sha256).where(
    USERS.c.user_id.in_(bindparam("user_ids", expanding=True))
)
HA1_MANY_COLUMNS = {"MD5": 1, "SHA-256": 2}  # positions in HA1_MANY's rows
USER_ROW = select(USERS).where(USERS.c.user_id == bindparam("user_id"))
USER_GROUPS = (
    select(MEMBERSHIPS.c.group_name)
    .where(MEMBERSHIPS.c.user_id == bindparam("user_id"))
    .order_by(MEMBERSHIPS.c.group_name)
)
SHARE_GROUP = select(func.count()).where(
    MEMBERSHIPS.c.user_id == bindparam("b"),
    MEMBERSHIPS.c.group_name.in_(
        select(MEMBERSHIPS.c.group_name).where(MEMBERSHIPS.c.user_id == bindparam("a"))
    ),
)
# "Does the callee exist, and does it share a group with the caller?" in one
# statement: the server asks this for every INVITE.
CALL_CHECK = select(
    select(USERS.c.user_id).where(USERS.c.user_id == bindparam("b")).exists().label("known"),
    select(MEMBERSHIPS.c.group_name)
    .where(
        MEMBERSHIPS.c.user_id == bindparam("b"),
        MEMBERSHIPS.c.group_name.in_(
            select(MEMBERSHIPS.c.group_name).where(MEMBERSHIPS.c.user_id == bindparam("a"))
        ),
    )
    .exists()
    .label("shared"),
)
ATTEMPT_INSERT = insert(ATTEMPTS)
LOCK_STATES = (
    select(USERS.c.user_id, USERS.c.stunt_state)
    .where(USERS.c.user_id.in_(bindparam("user_ids", expanding=True)))
    .order_by(USERS.c.user_id)
    .with_for_update()
)
RECENT_OUTCOMES = (
    select(ATTEMPTS.c.outcome, ATTEMPTS.c.caller, ATTEMPTS.c.callee, ATTEMPTS.c.witnesses)
    .where(
        or_(ATTEMPTS.c.caller == bindparam("user_id"), ATTEMPTS.c.callee == bindparam("user_id")),
        ATTEMPTS.c.at >= bindparam("since"),
        ATTEMPTS.c.at <= bindparam("until"),
    )
    .order_by(ATTEMPTS.c.at.desc(), ATTEMPTS.c.id.desc())
    .limit(RECENT_ATTEMPTS)
)
STATE_UPDATE = (
    update(USERS).where(USERS.c.user_id == bindparam("b_user_id")).values(stunt_state=bindparam("b_state"))
)
SEEN_UPDATE = (
    update(USERS)
    .where(USERS.c.user_id == bindparam("b_user_id"))  # a column's own name is reserved in UPDATE
    .values(public_ip=bindparam("b_ip"), public_port=bindparam("b_port"), last_seen=bindparam("b_when"))
)

CHUNK = 500  # IN-list size for bulk look-ups


def chunks(items: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_F = TypeVar("_F", bound=Callable[..., Any])


def translated(method: _F) -> _F:
    """Turn driver errors (an outage, a lost connection) into StoreUnavailable
    (``StoreBusy`` for those worth trying again: locked, busy, disconnected)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StoreError:
            raise
        except DBAPIError as e:
            detail = " ".join(str(e.orig).split())  # one line, for logs and the CLI
            kind = StoreBusy if isinstance(e, (OperationalError, InterfaceError)) else StoreUnavailable
            if kind is StoreBusy and "readonly" in detail:
                kind = StoreReadOnly
            raise kind(f"database error: {detail}") from e

    return wrapper  # type: ignore[return-value]


class EngineBound:
    """The engine, and the session helpers the operations share."""

    engine: Engine

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

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
        for chunk in chunks(wanted):
            found.update(s.scalars(select(User.user_id).where(User.user_id.in_(chunk))))
        missing = [u for u in wanted if u not in found]
        if missing:
            raise UnknownUser("unknown user " + ", ".join(repr(u) for u in missing))
        return wanted


def user_record(user: User, groups: Iterable[str]) -> UserRecord:
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
