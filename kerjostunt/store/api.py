"""The server's only door to the database: Deferreds over a thread pool.

Every blocking ``Database`` call runs in a dedicated
``twisted.python.threadpool.ThreadPool``, never on the reactor thread. A
failing database (an outage, a lost connection) gives failed Deferreds
carrying ``StoreError`` subclasses; callers log them and carry on.

Hand-offs are coalesced: a thread-pool hand-off (queue, wake the worker, wake
the reactor with the result) costs the reactor about as much as a small
query, and each REGISTER made two of them. While the pool's threads are busy,
new calls queue and then go over together, still one transaction each and in
order; ``get_ha1`` lookups of a few milliseconds share one query, and
``record_seen`` is written behind, many rows per transaction
(docs/decisions.rst).

Server code depends on the ``typing.Protocol`` classes here, not on
``AsyncStore``: ``Store`` (all of it), ``UsageRecorder`` (what registration
and calls write down: last seen, NAT, attempts) and ``CallPolicy`` (may this
caller ring that callee), so tests hand in fakes and the store can change
below them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kerjostunt.store.database import (
    HA1_ALGORITHMS,
    AttemptRecord,
    Database,
    InvalidValue,
    PairOutcome,
    StoreError,
    UnknownUser,
    UserRecord,
)

_T = TypeVar("_T")

SQLITE_THREADS = 1  # SQLite serializes writes anyway; one worker avoids lock waits
OTHER_THREADS = 4
SEEN_DELAY = 0.1  # seconds a record_seen may wait to share a transaction
SEEN_BATCH = 100  # rows that are written at once without waiting
HA1_WINDOW = 0.002  # seconds a get_ha1 waits for others to share its query
HA1_BATCH = 100  # lookups that go at once without waiting

_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class IStoreReactor(IReactorFromThreads, IReactorTime):
    """What the store needs of a reactor: results back from the pool, and timers.

    A typing-only combination of Twisted's interfaces (as Twisted's own
    ``_IReactorCommon``); every real reactor provides both.
    """


class UsageRecorder(Protocol):
    """Where the server writes down what peers did: seen, NAT, call attempts.

    The registration and call code depend on this, not on ``AsyncStore``,
    so they can be tested against a list in memory and the store can change
    below them. Each Deferred fires once the row is written, or fails with a
    ``StoreError``; callers log a failure and carry on.
    """

    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> Deferred[None]:
        """The user registered from ``ip:port`` at ``when`` (its last-seen address)."""
        ...

    def record_nat(self, user_id: str, nat: Mapping[str, Any], when: float) -> Deferred[None]:
        """The user's NAT as the probes classified it (``NATDescription.to_dict()``)."""
        ...

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
        """One call's outcome; fires with both peers' new STUNT states (user ID -> state)."""
        ...


class CallPolicy(Protocol):
    """The question a call asks the store before ringing the callee."""

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        """``"ok"``, ``"unknown"`` (no such callee) or ``"no-group"`` (no group holds both)."""
        ...


class Store(UsageRecorder, CallPolicy, Protocol):
    """The server's whole view of the database: ``AsyncStore``'s API.

    Server modules take this (or the smaller ``UsageRecorder`` /
    ``CallPolicy``), never the concrete class.
    """

    def get_ha1(self, user_id: str, algorithm: str) -> Deferred[str | None]: ...

    def get_user(self, user_id: str) -> Deferred[UserRecord]: ...

    def list_users(self) -> Deferred[list[UserRecord]]: ...

    def list_groups(self) -> Deferred[dict[str, list[str]]]: ...

    def groups_of(self, user_id: str) -> Deferred[list[str]]: ...

    def share_group(self, a: str, b: str) -> Deferred[bool]: ...

    def is_member(self, group: str, user_id: str) -> Deferred[bool]: ...

    def group_members(self, group: str) -> Deferred[list[UserRecord]]: ...

    def set_stunt_state(self, user_id: str, state: str) -> Deferred[None]: ...

    def recent_attempts(self, user_id: str, limit: int = 20) -> Deferred[list[AttemptRecord]]: ...

    def pair_outcomes(self, user_id: str, since: float) -> Deferred[dict[str, PairOutcome]]: ...

    def claim_realm(self, wanted: str | None, default: str) -> Deferred[str]:
        """The database's realm (store/realm.py); it always writes, so /health proves writes work."""


def _run_batch(database: Database, calls: list[_Call]) -> list[tuple[bool, Any]]:
    """In the pool thread: each call on its own, its result or its Failure."""
    results: list[tuple[bool, Any]] = []
    for function, args, kwargs in calls:
        try:
            results.append((True, function(database, *args, **kwargs)))
        except BaseException:
            results.append((False, Failure()))
    return results


class _Gathered:
    """Calls held back to share one hand-off: sent ``delay`` seconds after the
    first, or at once when ``size`` have gathered (``send`` gets them all)."""

    def __init__(self, clock: IReactorTime, delay: float, size: int, send: Callable[[list[Any]], None]) -> None:
        self._clock, self._delay, self._size, self._send = clock, delay, size, send
        self._items: list[tuple[Any, Deferred[Any]]] = []
        self._timer: IDelayedCall | None = None

    def add(self, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._items.append((item, d))
        if len(self._items) >= self._size:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._delay, self.flush)
        return d

    def flush(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._items:
            items, self._items = self._items, []
            self._send(items)


class StoreStopped(StoreError):
    """A call arrived after ``AsyncStore.stop``."""


class AsyncStore:
    """Every ``Database`` method, returning a Deferred.

    Calls are queued to the pool in order, at most one batch per pool
    thread in flight. ``stop`` writes what ``record_seen`` holds back and
    waits for everything already queued, so no write is lost on a clean
    shutdown. Calls that read or write a user's row (all but ``get_ha1``,
    ``call_check`` and ``record_attempt``) first send the held-back
    ``record_seen`` rows, so they see them.
    """

    log = Logger()

    def __init__(
        self,
        database: Database,
        reactor: IStoreReactor,
        threadpool: ThreadPool | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.database = database
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor  # the write-behind timer; a Clock in tests
        size = SQLITE_THREADS if database.is_sqlite else OTHER_THREADS
        if threadpool is None:
            threadpool = ThreadPool(minthreads=1, maxthreads=size, name="kerjostunt-store")
        self._pool = threadpool
        self._slots = max(1, min(size, threadpool.max))
        self._in_flight = 0
        self._queue: list[tuple[_Call, Deferred[Any]]] = []
        self._holding = False  # results being delivered: new calls wait to go together
        self._seen = _Gathered(self._clock, SEEN_DELAY, SEEN_BATCH, self._write_seen)
        self._ha1 = _Gathered(self._clock, HA1_WINDOW, HA1_BATCH, self._look_up_ha1)
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
            self._seen.flush()
            self._ha1.flush()
            self._stopping = True
            self._when_idle().addCallback(lambda _: self._shutdown())
        return d

    def run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """Run ``function(database, *args, **kwargs)`` in the pool.

        For work that needs several ``Database`` calls together, and for
        tests. Held-back ``record_seen`` rows are written first.
        """
        return self._submit(function, args, kwargs)

    def _submit(
        self,
        function: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        flush_seen: bool = True,
        then: Callable[[Any], Any] | None = None,
    ) -> Deferred[_T]:
        if self._stopping:
            return fail(StoreStopped("the store is stopping"))
        if flush_seen:
            self._seen.flush()
        self._pending += 1
        d: Deferred[_T] = Deferred()
        if then is not None:
            d.addBoth(then)  # before _finished: stop() fires only after it
        d.addBoth(self._finished)
        self._queue.append(((function, args, kwargs), d))
        self._pump()
        return d

    def _pump(self) -> None:
        """Hand everything queued to a free pool thread, as one batch."""
        if self._holding or not self._queue or self._in_flight >= self._slots:
            return
        batch, self._queue = self._queue, []
        self._in_flight += 1
        done = deferToThreadPool(self._reactor, self._pool, _run_batch, self.database, [c for c, _ in batch])
        done.addBoth(self._deliver, [d for _, d in batch])

    def _deliver(self, results: list[tuple[bool, Any]] | Failure, waiters: list[Deferred[Any]]) -> None:
        self._in_flight -= 1
        self._holding = True  # calls made by the callbacks below go together
        try:
            for index, waiter in enumerate(waiters):
                if isinstance(results, Failure):  # the pool itself failed
                    waiter.errback(results)
                elif results[index][0]:
                    waiter.callback(results[index][1])
                else:
                    waiter.errback(results[index][1])
        finally:
            self._holding = False
        self._pump()

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

    def claim_realm(self, wanted: str | None, default: str) -> Deferred[str]:
        return self.run(Database.claim_realm, wanted, default)

    def list_users(self) -> Deferred[list[UserRecord]]:
        return self.run(Database.list_users)

    def get_ha1(self, user_id: str, algorithm: str) -> Deferred[str | None]:
        """Gathered: the lookups of the next ``HA1_WINDOW`` seconds (or
        ``HA1_BATCH`` of them) share one query and one hand-off."""
        if self._stopping:
            return fail(StoreStopped("the store is stopping"))
        if algorithm.upper() not in HA1_ALGORITHMS:
            return fail(InvalidValue(f"unknown digest algorithm {algorithm!r}"))
        return self._ha1.add((user_id, algorithm))

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
        return self._submit(Database.call_check, (caller, callee), {}, flush_seen=False)

    def is_member(self, group: str, user_id: str) -> Deferred[bool]:
        return self.run(Database.is_member, group, user_id)

    def group_members(self, group: str) -> Deferred[list[UserRecord]]:
        return self.run(Database.group_members, group)

    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> Deferred[None]:
        """Written behind: with the others of the next ``SEEN_DELAY`` seconds
        (or ``SEEN_BATCH`` rows) in one transaction. The Deferred fires when
        the row is written, or fails with ``UnknownUser``."""
        if self._stopping:
            return fail(StoreStopped("the store is stopping"))
        return self._seen.add((user_id, ip, int(port), when))

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
        return self._submit(
            Database.record_attempt,
            (call_id, caller, callee, technique, outcome, predicted, actual, duration_ms, when),
            {},
            flush_seen=False,  # it reads states and attempts, which record_seen does not write
        )

    def set_stunt_state(self, user_id: str, state: str) -> Deferred[None]:
        return self.run(Database.set_stunt_state, user_id, state)

    def recent_attempts(self, user_id: str, limit: int = 20) -> Deferred[list[AttemptRecord]]:
        return self.run(Database.recent_attempts, user_id, limit)

    def pair_outcomes(self, user_id: str, since: float) -> Deferred[dict[str, PairOutcome]]:
        return self.run(Database.pair_outcomes, user_id, since)

    # -- internals -----------------------------------------------------

    def _look_up_ha1(self, wanted: list[tuple[tuple[str, str], Deferred[str | None]]]) -> None:
        """The gathered ``get_ha1`` lookups, as one query."""

        def fan_out(result: list[str | None] | Failure) -> None:
            for index, (_key, waiter) in enumerate(wanted):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result[index])

        self._submit(Database.get_ha1_many, ([key for key, _ in wanted],), {}, flush_seen=False, then=fan_out)

    def _write_seen(self, rows: list[tuple[tuple[str, str, int, float], Deferred[None]]]) -> None:
        """The held-back ``record_seen`` rows, as one transaction."""

        def fan_out(result: list[str] | Failure) -> None:
            unknown = set() if isinstance(result, Failure) else set(result)
            for (user_id, _ip, _port, _when), waiter in rows:
                if isinstance(result, Failure):
                    waiter.errback(result)
                elif user_id in unknown:
                    waiter.errback(UnknownUser(f"unknown user {user_id!r}"))
                else:
                    waiter.callback(None)

        self._submit(Database.record_seen_many, ([row for row, _ in rows],), {}, flush_seen=False, then=fan_out)

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
    of a half-working server. With ``realm`` it then claims the database's
    realm (store/realm.py): another stored realm, or a read-only database,
    stops the start too. ``stopService`` waits for queued writes.
    """

    def __init__(self, store: AsyncStore, upgrade: bool = True, realm: str | None = None) -> None:
        self.store = store
        self._upgrade = upgrade
        self._realm = realm

    def startService(self) -> None:
        if self._upgrade:
            self.store.database.upgrade()
        if self._realm is not None:
            # The database's realm must be the server's (RealmMismatch), and the
            # database writable: claim_realm always writes.
            self.store.database.claim_realm(self._realm, self._realm)
        self.store.start()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.store.stop()


def _conforms(store: AsyncStore) -> Store:
    """Never called: mypy checks here that ``AsyncStore`` provides ``Store``."""
    return store
