"""The server's only door to the database: Deferreds over a thread pool.

Every blocking ``Database`` call runs in a dedicated
``twisted.python.threadpool.ThreadPool``, never on the reactor thread. A
failing database (an outage, a lost connection) gives failed Deferreds
carrying ``StoreError`` subclasses; callers log them and carry on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from kerjostunt.store.database import (
    AttemptRecord,
    Database,
    StoreError,
    UserRecord,
)

_T = TypeVar("_T")

SQLITE_THREADS = 1  # SQLite serializes writes anyway; one worker avoids lock waits
OTHER_THREADS = 4


class StoreStopped(StoreError):
    """A call arrived after ``AsyncStore.stop``."""


class AsyncStore:
    """Every ``Database`` method, returning a Deferred.

    Calls are queued to the pool in order. ``stop`` waits for everything
    already queued, so outcome writes are not lost on a clean shutdown.
    """

    log = Logger()

    def __init__(
        self,
        database: Database,
        reactor: Any,
        threadpool: ThreadPool | None = None,
    ) -> None:
        self.database = database
        self._reactor = reactor
        if threadpool is None:
            size = SQLITE_THREADS if database.is_sqlite else OTHER_THREADS
            threadpool = ThreadPool(minthreads=1, maxthreads=size, name="kerjostunt-store")
        self._pool = threadpool
        self._pending = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._stopping = False
        self._closed = False
        self._stop_waiters: list[Deferred[None]] = []

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> Deferred[None]:
        """Refuse new calls, finish queued ones, stop the pool, close the DB."""
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if not self._stopping:
            self._stopping = True
            self._when_idle().addCallback(lambda _: self._shutdown())
        return d

    def run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """Run ``function(database, *args, **kwargs)`` in the pool.

        For work that needs several ``Database`` calls together, and for
        tests.
        """
        if self._stopping:
            return fail(StoreStopped("the store is stopping"))
        self._pending += 1
        d = deferToThreadPool(
            self._reactor, self._pool, function, self.database, *args, **kwargs
        )
        d.addBoth(self._finished)
        return d

    # -- Database methods ---------------------------------------------

    def upgrade(self) -> Deferred[None]:
        return self.run(Database.upgrade)

    def add_user(
        self,
        user_id: str,
        realm: str,
        password: str | None = None,
        ha1_md5: str | None = None,
        ha1_sha256: str | None = None,
    ) -> Deferred[None]:
        return self.run(Database.add_user, user_id, realm, password, ha1_md5, ha1_sha256)

    def set_password(self, user_id: str, realm: str, password: str) -> Deferred[None]:
        return self.run(Database.set_password, user_id, realm, password)

    def delete_user(self, user_id: str) -> Deferred[None]:
        return self.run(Database.delete_user, user_id)

    def get_user(self, user_id: str) -> Deferred[UserRecord]:
        return self.run(Database.get_user, user_id)

    def list_users(self) -> Deferred[list[UserRecord]]:
        return self.run(Database.list_users)

    def get_ha1(self, user_id: str, algorithm: str) -> Deferred[str | None]:
        return self.run(Database.get_ha1, user_id, algorithm)

    def import_users(
        self, rows: Iterable[Mapping[str, str | None]], realm: str
    ) -> Deferred[int]:
        return self.run(Database.import_users, list(rows), realm)

    def add_group(self, name: str) -> Deferred[None]:
        return self.run(Database.add_group, name)

    def delete_group(self, name: str) -> Deferred[None]:
        return self.run(Database.delete_group, name)

    def join_group(self, name: str, user_ids: Sequence[str]) -> Deferred[None]:
        return self.run(Database.join_group, name, list(user_ids))

    def leave_group(self, name: str, user_ids: Sequence[str]) -> Deferred[None]:
        return self.run(Database.leave_group, name, list(user_ids))

    def list_groups(self) -> Deferred[dict[str, list[str]]]:
        return self.run(Database.list_groups)

    def groups_of(self, user_id: str) -> Deferred[list[str]]:
        return self.run(Database.groups_of, user_id)

    def share_group(self, a: str, b: str) -> Deferred[bool]:
        return self.run(Database.share_group, a, b)

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        return self.run(Database.call_check, caller, callee)

    def is_member(self, group: str, user_id: str) -> Deferred[bool]:
        return self.run(Database.is_member, group, user_id)

    def group_members(self, group: str) -> Deferred[list[UserRecord]]:
        return self.run(Database.group_members, group)

    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> Deferred[None]:
        return self.run(Database.record_seen, user_id, ip, port, when)

    def record_nat(
        self, user_id: str, nat: Mapping[str, Any], when: float
    ) -> Deferred[None]:
        return self.run(Database.record_nat, user_id, dict(nat), when)

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
    ) -> Deferred[dict[str, str]]:
        return self.run(
            Database.record_attempt,
            call_id,
            caller,
            callee,
            technique,
            outcome,
            predicted,
            actual,
            duration_ms,
            when,
        )

    def set_stunt_state(self, user_id: str, state: str) -> Deferred[None]:
        return self.run(Database.set_stunt_state, user_id, state)

    def recent_attempts(self, user_id: str, limit: int = 20) -> Deferred[list[AttemptRecord]]:
        return self.run(Database.recent_attempts, user_id, limit)

    # -- internals -----------------------------------------------------

    def _finished(self, result: _T) -> _T:
        self._pending -= 1
        if self._pending == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def _when_idle(self) -> Deferred[None]:
        if self._pending == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _shutdown(self) -> None:
        # The pool is idle now, so joining its threads does not block for long.
        try:
            if self._pool.started:
                self._pool.stop()
            self.database.close()
        except Exception:
            self.log.failure("closing the store")
        self._closed = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class StoreService(Service):
    """Owns an ``AsyncStore`` for ``twistd``.

    ``startService`` runs the Alembic upgrade synchronously: twistd calls it
    before the reactor runs, so no request is ever served against an old
    schema, and a failing upgrade stops the start with a clear error instead
    of a half-working server. ``stopService`` waits for queued writes.
    """

    def __init__(self, store: AsyncStore, upgrade: bool = True) -> None:
        self.store = store
        self._upgrade = upgrade

    def startService(self) -> None:
        if self._upgrade:
            self.store.database.upgrade()
        self.store.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.store.stop()
