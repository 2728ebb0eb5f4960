"""How ``AsyncStore`` survives a locked or slow database: lanes, retries, health.

Two lanes of calls go to the store's thread pool. The write lane carries
every call in order, as before; the read lane carries only the look-ups a
REGISTER or an INVITE waits for (``get_ha1``, ``call_check``), on a thread
and connection of its own: under SQLite's WAL a reader never waits for a
writer, so another process holding the write lock (a backup, an import)
does not hold registrations up. (An in-memory SQLite database shares one
connection between threads, so there reads stay in the write lane.)

A write that fails with ``StoreBusy`` (locked, busy, disconnected) is not
failed back to its caller: the batch stops there, the gate closes for a
back-off (0.1 s doubling to 1 s) and the calls not done go back to the
front of the queue, in order. While the gate is closed no write holds the
thread, so one stuck database costs one busy timeout per back-off, not one
per call. While it is closed, the other reads move to the read lane too
(the web's peers list, the admin-type look-ups): they see what is stored
rather than wait for writes that cannot be made. Ordinary writes give up
after ``RETRY_TOTAL``; usage records
(``pending.USAGE_OPS``: outcomes, last seen, NAT) never do: they wait in
memory, up to ``MAX_KEPT`` rows, beyond that in the pending file, and a
stop saves what is left there (``store/pending.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kerjostunt.store.pending import USAGE_OPS, Keeper, Record
from kerjostunt.store.records import StoreBusy, StoreUnavailable

READ, WRITE, USAGE = "read", "write", "usage"

RETRY_FIRST = 0.1  # seconds before the first retry of a busy write
RETRY_MAX = 1.0  # the longest pause between two tries: a released lock is noticed within a second
RETRY_TOTAL = 30.0  # an ordinary write fails after trying this long; usage records never
MAX_KEPT = 100_000  # usage rows waiting in memory; beyond, new ones go to the pending file

_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


@dataclass
class Job:
    """One call waiting for the pool, and who waits for its result."""

    call: _Call
    waiter: Deferred[Any]
    kind: str  # READ, WRITE or USAGE
    started: float  # when it was first submitted (clock seconds)
    rows: int = 1  # usage rows it holds (record_seen_many batches many)


class Lane:
    """A queue of jobs and the pool threads it may use at once."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.in_flight = 0
        self.queue: list[Job] = []


def run_batch(database: Any, calls: list[_Call], stop_when_busy: bool) -> list[tuple[bool | None, Any]]:
    """In a pool thread: each call on its own, ``(True, result)`` or ``(False, Failure)``.

    With ``stop_when_busy`` the first ``StoreBusy`` ends the batch: the
    calls after it are ``(None, None)``, not run, so a locked database costs
    one busy timeout per batch, not one per call.
    """
    results: list[tuple[bool | None, Any]] = []
    for function, args, kwargs in calls:
        if results and stop_when_busy and results[-1][0] is False and results[-1][1].check(StoreBusy):
            results.append((None, None))
            continue
        try:
            results.append((True, function(database, *args, **kwargs)))
        except BaseException:
            results.append((False, Failure()))
    return results


def save(keeper: Keeper, jobs: list[Job], failure: Failure) -> None:
    """Stopping while the database fails: usage records to the pending file
    (their callers get ``USAGE_OPS``' results), the other calls fail."""
    usage = [job for job in jobs if job.kind == USAGE]
    for job in jobs:
        if job.kind != USAGE:
            job.waiter.errback(failure)
    if not usage:
        return
    if keeper.keep([Record(job.call[0].__name__, job.call[1], job.call[2]) for job in usage], "at stop"):
        for job in usage:
            job.waiter.callback(USAGE_OPS[job.call[0].__name__])
    else:
        for job in usage:
            job.waiter.errback(failure)


def spill(keeper: Keeper, call: _Call, then: Callable[[Any], Any] | None) -> Deferred[Any]:
    """More usage rows wait than ``MAX_KEPT``: this one goes to the pending file now."""
    function, args, kwargs = call
    if keeper.keep([Record(function.__name__, args, kwargs)], "over the in-memory bound"):
        d: Deferred[Any] = succeed(USAGE_OPS[function.__name__])
    else:
        d = fail(StoreUnavailable("the database is failing and the pending file cannot be written"))
    if then is not None:
        d.addBoth(then)
    return d


@dataclass(frozen=True)
class StoreHealth:
    """What ``/health`` says of the store without asking the database."""

    writing: bool  # False while writes fail
    reason: str | None  # the last write failure, while writes fail
    failing_for: float  # seconds since writes started failing (0 when writing)
    waiting: int  # usage rows not yet written (in memory)


class Gate:
    """Closed while writes fail: the back-off between tries, and since when."""

    def __init__(self, clock: IReactorTime, reopen: Callable[[], None]) -> None:
        self._clock, self._reopen = clock, reopen
        self._timer: IDelayedCall | None = None
        self._delay = RETRY_FIRST
        self.failing_since: float | None = None
        self.reason: str | None = None

    @property
    def closed(self) -> bool:
        return self._timer is not None

    def failed(self, reason: str) -> None:
        """A write failed busy: close until the next try."""
        if self.failing_since is None:
            self.failing_since = self._clock.seconds()
        self.reason = reason
        if self._timer is None:
            self._timer = self._clock.callLater(self._delay, self._open)
            self._delay = min(RETRY_MAX, self._delay * 2)

    def succeeded(self) -> None:
        self.failing_since, self.reason, self._delay = None, None, RETRY_FIRST

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _open(self) -> None:
        self._timer = None
        self._reopen()

    def health(self, waiting: int) -> StoreHealth:
        if self.failing_since is None:
            return StoreHealth(True, None, 0.0, waiting)
        return StoreHealth(False, self.reason, self._clock.seconds() - self.failing_since, waiting)


class Gathered:
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
