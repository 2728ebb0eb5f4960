"""Who may call whom, answered from memory: the INVITE's group check without a store round trip.

Every INVITE asks whether the callee exists and shares a group with the
caller (``Database.call_check``). Asked of the database, that is a hand-off
to the store's thread, a query and a hand-off back: about a fifth of a
call's server CPU (docs/performance.rst, issue 16). The answer changes only
when an operator changes users or groups, which is rare, so the server keeps
each user's groups in memory (``Directory``) and asks the database only for
users it has not seen yet.

Users and groups are written by ``kerjostunt user|group`` (another process)
and, in a cluster, through any instance. Every such write therefore also
stores a fresh random token under ``directory`` in ``kerjostunt_meta``
(``mark_changed``, in the write's own transaction), and each server reads
that token every ``POLL`` seconds: a new token empties its cache. A change
is thus in force for calls within ``POLL`` seconds (docs/admin.rst). When the
token cannot be read for ``STALE_AFTER`` seconds the cache is not trusted
and every check goes to the database again, as before.
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Engine, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.store.models import Membership, Meta, User
from kerjostunt.store.queries import chunks

__all__ = ["DIRECTORY_KEY", "POLL", "Directory", "mark_changed"]

log = Logger(namespace="kerjostunt.store.directory")

DIRECTORY_KEY = "directory"
POLL = 1.0          # seconds between reads of the token: an operator's change is in force within this
STALE_AFTER = 5.0   # seconds without a token read after which the cache is not used
MAX_USERS = 200_000  # users kept; the cache starts over beyond (about 200 bytes each)

_Groups = frozenset[str]


def mark_changed(s: Session) -> None:
    """Record, in the caller's transaction, that users or memberships changed."""
    if not _has_meta(s):
        return  # a database from before revision 0005: no server runs on it before its upgrade
    token = secrets.token_hex(8)
    done = s.execute(update(Meta).where(Meta.key == DIRECTORY_KEY).values(value=token))
    if getattr(done, "rowcount", 1):
        return
    try:
        with s.begin_nested():
            s.execute(insert(Meta).values(key=DIRECTORY_KEY, value=token))
    except IntegrityError:  # another writer inserted it first
        s.execute(update(Meta).where(Meta.key == DIRECTORY_KEY).values(value=token))


_meta_seen: weakref.WeakSet[Engine] = weakref.WeakSet()


def _has_meta(s: Session) -> bool:
    """Does the database have ``kerjostunt_meta``? Asked once per engine once it does."""
    engine = s.get_bind().engine
    if engine not in _meta_seen:
        if not inspect(s.connection()).has_table(Meta.__tablename__):
            return False
        _meta_seen.add(engine)
    return True


def read_token(database: Any) -> str | None:
    """The current token (None before the first change); run in the store's pool."""
    with database.engine.connect() as c:
        value: str | None = c.execute(select(Meta.value).where(Meta.key == DIRECTORY_KEY)).scalar()
        return value


def groups_of_users(database: Any, user_ids: Sequence[str]) -> dict[str, _Groups]:
    """Each existing user's groups; unknown users are absent. Run in the store's pool."""
    found: dict[str, set[str]] = {}
    with database.engine.connect() as c:
        for chunk in chunks(list(user_ids)):
            for (user_id,) in c.execute(select(User.user_id).where(User.user_id.in_(chunk))):
                found[user_id] = set()
            for user_id, group in c.execute(
                select(Membership.user_id, Membership.group_name).where(Membership.user_id.in_(chunk))
            ):
                found.setdefault(user_id, set()).add(group)
    return {user_id: frozenset(groups) for user_id, groups in found.items()}


class PoolStore(Protocol):
    """The async store as the directory uses it: a function of the ``Database`` run in its pool."""

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: object,
                  **kw: object) -> IDelayedCall: ...


def verdict(caller: _Groups | None, callee: _Groups | None) -> str:
    """``Database.call_check``'s answer from two users' groups (None: no such user)."""
    if callee is None:
        return "unknown"
    return "ok" if caller is not None and caller & callee else "no-group"


class Directory(Service):
    """The users' groups held in memory for ``call_check`` (see the module docstring)."""

    def __init__(self, store: PoolStore, clock: Clock, poll: float = POLL) -> None:
        self._store = store
        self._clock = clock
        self._poll = poll
        self._groups: dict[str, _Groups] = {}
        self._token: str | None = None
        self._read_at: float | None = None   # last successful token read; None: cache not in use
        self._generation = 0                # bumped on every flush: a fetch from before does not fill
        self._timer: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._read()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def __len__(self) -> int:
        return len(self._groups)

    def _trusted(self) -> bool:
        return self._read_at is not None and self._clock.seconds() - self._read_at <= STALE_AFTER

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        """'unknown', 'no-group' or 'ok', as ``Database.call_check``; from memory when both are known."""
        trusted = self._trusted()
        if trusted and caller in self._groups and callee in self._groups:
            return succeed(verdict(self._groups[caller], self._groups[callee]))
        wanted = [u for u in dict.fromkeys((caller, callee)) if not trusted or u not in self._groups]
        generation = self._generation

        def fetched(groups: dict[str, _Groups]) -> str:
            if trusted and generation == self._generation and self._trusted():
                if len(self._groups) + len(groups) > MAX_USERS:
                    self._groups.clear()
                self._groups.update(groups)
            def groups_of(user: str) -> _Groups | None:
                return groups.get(user, self._groups.get(user) if trusted else None)

            return verdict(groups_of(caller), groups_of(callee))

        d: Deferred[str] = self._store.run(groups_of_users, wanted).addCallback(fetched)
        return d

    def flush(self) -> None:
        """Forget every user's groups (a change was seen, or the token could not be read)."""
        self._groups.clear()
        self._generation += 1

    def _read(self) -> None:
        self._timer = None
        d = self._store.run(read_token)
        d.addCallbacks(self._token_read, self._token_failed)
        d.addBoth(self._again)

    def _token_read(self, token: str | None) -> None:
        if self._read_at is None or token != self._token:
            self.flush()
        self._token = token
        self._read_at = self._clock.seconds()

    def _token_failed(self, failure: Failure) -> None:
        if self._read_at is not None and not self._trusted():
            log.warn("Directory token unreadable for {s} s: group checks go to the database ({why})",
                     s=STALE_AFTER, why=failure.getErrorMessage())
            self._read_at = None
            self.flush()

    def _again(self, _: object) -> None:
        if self.running:
            self._timer = self._clock.callLater(self._poll, self._read)


class AttemptStore(Protocol):
    def record_attempt(self, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class CallsStore:
    """The store as the calls use it (``server/calls/seams.py``): the group check from
    the ``Directory``, the attempts to the store."""

    def __init__(self, directory: Directory, store: AttemptStore) -> None:
        self._directory, self._store = directory, store

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        return self._directory.call_check(caller, callee)

    def record_attempt(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self._store.record_attempt(*args, **kwargs)
