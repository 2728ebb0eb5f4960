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
``record_seen`` and ``record_attempt`` are written behind, many rows per
transaction (docs/decisions.rst, ``store/behind.py``).

Server code depends on the ``typing.Protocol`` classes here, not on
``AsyncStore``: ``Store`` (all of it), ``UsageRecorder`` (what registration
and calls write down: last seen, NAT, attempts) and ``CallPolicy`` (may this
caller ring that callee), so tests hand in fakes and the store can change
below them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kerjostunt.store.behind import AttemptsBehind, Row
from kerjostunt.store.database import (
    HA1_ALGORITHMS,
    OUTCOMES,
    AttemptRecord,
    Database,
    InvalidValue,
    PairOutcome,
    StoreBusy,
    StoreError,
    UnknownUser,
    UserRecord,
)
from kerjostunt.store.lanes import (
    MAX_KEPT,
    READ,
    RETRY_TOTAL,
    USAGE,
    WRITE,
    Gate,
    Gathered,
    Job,
    Lane,
    StoreHealth,
    run_batch,
    save,
    spill,
)
from kerjostunt.store.pending import Keeper

_T = TypeVar("_T")

SQLITE_THREADS = 1  # SQLite serializes writes anyway; one worker avoids lock waits
OTHER_THREADS = 4
READ_THREADS = 1  # the read lane's own thread (lanes.py), when the database allows one
#: seconds a server's statement waits for another process's lock before the
#: write is retried later (lanes.py) instead of holding the store's thread
BUSY_TIMEOUT = 0.25
SEEN_DELAY = 0.1  # seconds a record_seen may wait to share a transaction
SEEN_BATCH = 100  # rows that are written at once without waiting
HA1_WINDOW = 0.002  # seconds a get_ha1 waits for others to share its query
HA1_BATCH = 100  # lookups that go at once without waiting

_MANY = ("record_seen_many", "record_attempts_many")  # usage calls that carry a list of rows


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
        witnesses: Sequence[str] | None = None,
        detail: str | None = None,
    ) -> Deferred[dict[str, str]]:
        """One call's outcome; fires with both peers' new STUNT states (user ID -> state).

        ``witnesses``: whose own report agrees with the outcome (None: both); ``detail``: JSON,
        each side's techniques with their results, predictions, NATs.
        """
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

    def health(self) -> StoreHealth:
        """Are writes going through, and how many records wait (no database call)."""
        ...

    def claim_realm(self, wanted: str | None, default: str) -> Deferred[str]:
        """The database's realm (store/realm.py); it always writes, so /health proves writes work."""
        ...


class StoreStopped(StoreError):
    """A call arrived after ``AsyncStore.stop``."""


class AsyncStore:
    """Every ``Database`` method, returning a Deferred.

    Calls are queued to the pool in order, at most one batch per pool
    thread in flight; ``get_ha1`` and ``call_check`` go in a read lane of
    their own, and busy writes are retried (``store/lanes.py``). ``stop``
    writes what ``record_seen`` holds back and waits for everything already
    queued, so no write is lost on a clean shutdown; usage records the
    database does not take then go to the pending file, read back by
    ``replay_pending`` at the next start. Calls that read or write a user's
    row (all but ``get_ha1``, ``call_check`` and ``record_attempt``) first
    send the held-back ``record_seen`` rows, so they see them; those that
    read attempts or flags wait for the held-back attempts (``behind.py``).
    """

    log = Logger()

    def __init__(
        self,
        database: Database,
        reactor: IStoreReactor,
        threadpool: ThreadPool | None = None,
        clock: IReactorTime | None = None,
        counter: Callable[[str], None] = lambda what: None,
        pending: Path | None = None,
    ) -> None:
        self.database = database
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor  # write-behind and retry timers; a Clock in tests
        self._count = counter
        size = SQLITE_THREADS if database.is_sqlite else OTHER_THREADS
        reads = READ_THREADS if database.concurrent else 0
        if threadpool is None:
            threadpool = ThreadPool(minthreads=1, maxthreads=size + reads, name="kerjostunt-store")
        self._pool = threadpool
        self._write = Lane(max(1, min(size, threadpool.max)))
        self._read = Lane(reads) if reads and threadpool.max > self._write.slots else self._write
        self._gate = Gate(self._clock, lambda: self._pump(self._write))
        self._keeper = Keeper(pending if pending is not None else database.pending_path, counter)
        self._kept = 0  # usage rows queued or in flight
        self._holding = False  # results being delivered: new calls wait to go together
        self._seen = Gathered(self._clock, SEEN_DELAY, SEEN_BATCH, self._write_seen)
        self._ha1 = Gathered(self._clock, HA1_WINDOW, HA1_BATCH, self._look_up_ha1)
        self._attempts = AttemptsBehind(self._clock, self._write_attempts, self._write_attempt)
        self._pending = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._stopping = False
        self._closed = False
        self._stop_waiters: list[Deferred[None]] = []

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> Deferred[None]:
        """Refuse new calls, finish queued ones, stop the pool, close the DB.

        While writes are failing nothing queued is tried again: usage
        records go to the pending file, other writes fail.
        """
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if not self._stopping:
            self._seen.flush()
            self._ha1.flush()
            self._attempts.flush()
            self._stopping = True
            if self._gate.closed:
                self._gate.cancel()
                queued, self._write.queue = self._write.queue, []
                why = StoreStopped(f"the store stopped while writes failed: {self._gate.reason}")
                save(self._keeper, queued, Failure(why))
            self._when_idle().addCallback(lambda _: self._shutdown())
        return d

    def health(self) -> StoreHealth:
        """Are writes going through, and how many usage rows wait (no database call)."""
        return self._gate.health(self._kept + self._attempts.held)

    def replay_pending(self) -> int:
        """Queue the records a previous run left in the pending file (first, in
        their order) and remove the file; how many. ``StoreService`` calls it."""
        records = self._keeper.take()
        for record in records:
            # Not spilled back past the bound: the file's records are in memory already.
            d = self._submit(getattr(Database, record.op), record.args, record.kwargs, flush_seen=False, kind=USAGE,
                             bounded=False)
            d.addErrback(self._not_replayed, record.op)
        return len(records)

    def _not_replayed(self, failure: Failure, op: str) -> None:
        self.log.warn("A pending {op} could not be written: {why}", op=op, why=failure.getErrorMessage())

    def run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
        """Run ``function(database, *args, **kwargs)`` in the pool.

        For work that needs several ``Database`` calls together, and for
        tests. Held-back ``record_seen`` rows are written first. A failure
        is not retried (``_write`` is for writes).
        """
        return self._submit(function, args, kwargs)

    def _write_call(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """A write: retried while the database is busy, for ``RETRY_TOTAL`` at most."""
        return self._submit(function, args, {}, kind=WRITE)

    def _submit(
        self,
        function: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        flush_seen: bool = True,
        then: Callable[[Any], Any] | None = None,
        kind: str = READ,
        lane: Lane | None = None,
        bounded: bool = True,
    ) -> Deferred[_T]:
        if self._stopping:
            refused: Deferred[_T] = fail(StoreStopped("the store is stopping"))
            if then is not None:
                refused.addBoth(then)  # its waiters are answered (behind.py's retry of a batch at the stop)
            return refused
        if flush_seen:
            self._seen.flush()
        rows = len(args[0]) if kind == USAGE and function.__name__ in _MANY else 1
        if kind == USAGE and bounded and self._kept + rows > MAX_KEPT:
            return spill(self._keeper, (function, args, kwargs), then)
        self._pending += 1
        d: Deferred[_T] = Deferred()
        if kind == USAGE:
            self._kept += rows
            d.addBoth(self._released, rows)  # first: health() in the callers' callbacks counts it written
        if then is not None:
            d.addBoth(then)  # before _finished: stop() fires only after it
        d.addBoth(self._finished)
        job = Job((function, args, kwargs), d, kind, self._clock.seconds(), rows)
        target = lane or self._write
        if target is self._write and kind == READ and self._gate.closed:
            target = self._read  # while writes fail, a read is not held behind them (lanes.py)
        target.queue.append(job)
        self._pump(target)
        return d

    def _pump(self, lane: Lane) -> None:
        """Hand everything queued in ``lane`` to a free pool thread, as one batch."""
        if self._holding or not lane.queue or lane.in_flight >= lane.slots:
            return
        if lane is self._write and self._gate.closed:
            return
        batch, lane.queue = lane.queue, []
        lane.in_flight += 1
        calls = [job.call for job in batch]
        done = deferToThreadPool(self._reactor, self._pool, run_batch, self.database, calls, lane is self._write)
        done.addBoth(self._deliver, batch, lane)

    def _deliver(self, results: list[tuple[bool | None, Any]] | Failure, batch: list[Job], lane: Lane) -> None:
        lane.in_flight -= 1
        if isinstance(results, Failure):  # the pool itself failed
            results = [(False, results)] * len(batch)
        again = [job for job, (ok, value) in zip(batch, results, strict=True)
                 if ok is None or (ok is False and job.kind != READ and value.check(StoreBusy))]
        busy = next((value for ok, value in results if ok is False and value.check(StoreBusy)), None)
        self._holding = True  # calls made by the callbacks below go together
        try:
            if again:
                self._again(again, busy or Failure(StoreBusy("database busy")))
            elif lane is self._write and any(ok for ok, _ in results):
                self._gate.succeeded()
            retried = {id(job) for job in again}
            for job, (ok, value) in zip(batch, results, strict=True):
                if id(job) in retried:
                    continue
                if ok:
                    job.waiter.callback(value)
                else:
                    job.waiter.errback(value)
        finally:
            self._holding = False
        self._pump(self._write)
        self._pump(self._read)

    def _again(self, jobs: list[Job], failure: Failure) -> None:
        """Busy: back to the front of the queue after a back-off, or saved when stopping."""
        reason = failure.getErrorMessage()
        if self._gate.failing_since is None:
            self.log.warn("Store writes failing, retrying with back-off: {why}", why=reason)
        self._gate.failed(reason)
        self._attempts.release()  # reads waiting for attempts see what is stored meanwhile
        if self._stopping:
            self._gate.cancel()
            queued, self._write.queue = self._write.queue, []
            save(self._keeper, jobs + queued, failure)
            return
        now = self._clock.seconds()
        late = [job for job in jobs if job.kind == WRITE and now - job.started > RETRY_TOTAL]
        self._write.queue[:0] = [job for job in jobs if job not in late]
        if self._read is not self._write:  # reads need not wait for the lock: they see what is stored
            self._read.queue += [job for job in self._write.queue if job.kind == READ]
            self._write.queue = [job for job in self._write.queue if job.kind != READ]
        for job in late:
            job.waiter.errback(failure)
        self._count("store_write_retries")  # last: whatever it calls sees the queue in order

    def _released(self, result: _T, rows: int) -> _T:
        self._kept -= rows
        return result

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
        return self._write_call(Database.add_user, user_id, realm, password, ha1_md5, ha1_sha256)

    def set_password(self, user_id: str, realm: str, password: str) -> Deferred[None]:
        return self._write_call(Database.set_password, user_id, realm, password)

    def delete_user(self, user_id: str) -> Deferred[None]:
        return self._write_call(Database.delete_user, user_id)

    def get_user(self, user_id: str) -> Deferred[UserRecord]:
        return self._settled(Database.get_user, user_id)

    def claim_realm(self, wanted: str | None, default: str) -> Deferred[str]:
        return self.run(Database.claim_realm, wanted, default)

    def list_users(self) -> Deferred[list[UserRecord]]:
        return self._settled(Database.list_users)

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
        return self._write_call(Database.import_users, list(rows), realm)

    def add_group(self, name: str) -> Deferred[None]:
        return self._write_call(Database.add_group, name)

    def delete_group(self, name: str) -> Deferred[None]:
        return self._write_call(Database.delete_group, name)

    def join_group(self, name: str, user_ids: Sequence[str]) -> Deferred[None]:
        return self._write_call(Database.join_group, name, list(user_ids))

    def leave_group(self, name: str, user_ids: Sequence[str]) -> Deferred[None]:
        return self._write_call(Database.leave_group, name, list(user_ids))

    def list_groups(self) -> Deferred[dict[str, list[str]]]:
        return self.run(Database.list_groups)

    def groups_of(self, user_id: str) -> Deferred[list[str]]:
        return self.run(Database.groups_of, user_id)

    def share_group(self, a: str, b: str) -> Deferred[bool]:
        return self.run(Database.share_group, a, b)

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        return self._submit(Database.call_check, (caller, callee), {}, flush_seen=False, lane=self._read)

    def is_member(self, group: str, user_id: str) -> Deferred[bool]:
        return self.run(Database.is_member, group, user_id)

    def group_members(self, group: str) -> Deferred[list[UserRecord]]:
        return self._settled(Database.group_members, group)

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
        return self._submit(Database.record_nat, (user_id, dict(nat), when), {}, kind=USAGE)

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
        witnesses: Sequence[str] | None = None,
        detail: str | None = None,
    ) -> Deferred[dict[str, str]]:
        """Written behind (``store/behind.py``): with the others of the next
        ``ATTEMPT_DELAY`` seconds in one transaction. Fires with the new
        states once written."""
        if self._stopping:
            return fail(StoreStopped("the store is stopping"))
        if outcome not in OUTCOMES:
            return fail(InvalidValue(f"outcome must be one of {', '.join(OUTCOMES)}"))
        return self._attempts.add(
            (call_id, caller, callee, technique, outcome, predicted, actual, duration_ms, when,
             None if witnesses is None else list(witnesses), detail))

    def set_stunt_state(self, user_id: str, state: str) -> Deferred[None]:
        """After the attempts held back: an operator's flag is not overwritten by an earlier call's rule."""
        d = self._attempts.settled(failing=self._gate.failing_since is not None)  # else queued behind them
        return d.addCallback(lambda _: self._write_call(Database.set_stunt_state, user_id, state))

    def recent_attempts(self, user_id: str, limit: int = 20) -> Deferred[list[AttemptRecord]]:
        return self._settled(Database.recent_attempts, user_id, limit)

    def is_operator(self, user_id: str) -> Deferred[bool]:
        """May this user read /status? (``kerjostunt operator add``)"""
        return self.run(Database.is_operator, user_id)

    def attempts_since(self, since: float, limit: int = 20000) -> Deferred[list[AttemptRecord]]:
        """The attempts the /status page summarises, oldest first."""
        return self._settled(Database.attempts_since, since, limit)

    def pair_outcomes(self, user_id: str, since: float) -> Deferred[dict[str, PairOutcome]]:
        return self._settled(Database.pair_outcomes, user_id, since)

    # -- internals -----------------------------------------------------

    def _look_up_ha1(self, wanted: list[tuple[tuple[str, str], Deferred[str | None]]]) -> None:
        """The gathered ``get_ha1`` lookups, as one query."""

        def fan_out(result: list[str | None] | Failure) -> None:
            for index, (_key, waiter) in enumerate(wanted):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result[index])

        self._submit(Database.get_ha1_many, ([key for key, _ in wanted],), {}, flush_seen=False, then=fan_out,
                     lane=self._read)

    def _settled(self, function: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """A read of attempts or flags: after every attempt held back or in flight is written."""
        settled = self._attempts.settled(failing=self._gate.failing_since is not None)
        return settled.addCallback(lambda _: self.run(function, *args))

    def _write_attempts(self, rows: list[Row], then: Callable[[Any], None]) -> None:
        # flush_seen=False: it reads states and attempts, which record_seen does not write
        self._submit(Database.record_attempts_many, (rows,), {}, flush_seen=False, then=then, kind=USAGE)

    def _write_attempt(self, row: Row, then: Callable[[Any], None]) -> None:
        self._submit(Database.record_attempt, row, {}, flush_seen=False, then=then, kind=USAGE)

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

        self._submit(Database.record_seen_many, ([row for row, _ in rows],), {}, flush_seen=False, then=fan_out,
                     kind=USAGE)

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


def _conforms(store: AsyncStore) -> Store:
    """Never called: mypy checks here that ``AsyncStore`` provides ``Store``."""
    return store
