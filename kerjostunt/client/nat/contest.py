"""
The bookkeeping every connection race shares: the punch, the birthday search and a call's Dialer.

Each of them runs many attempts at once and keeps the first connection that
passes the per-call handshake.  Each needs the same skeleton: timers that
must not fire after the end, connects in flight to cancel, contenders
(connected, still in handshake) to abort when another one wins, resources
to release (a listener), and a result fired exactly once.  Written three
times it leaked in three different ways; here it is written once.

A ``Contest`` is open until ``close`` (or ``win``/``lose``, which close it
first); ``over`` then stays true.  It decides nothing about who wins: the
technique calls ``win`` when a connection passed, ``lose`` when it gives up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kerjostunt.client.nat.sockets import abort_protocol

__all__ = ["Contest", "has_handshake"]

T = TypeVar("T")
A = TypeVar("A")


class Contest(Generic[T]):
    """
    Timers, attempts in flight, contenders and the result of one race.

    ``result`` fires once, with what ``win`` got or the exception ``lose``
    got, after every cleanup registered with ``on_close`` has finished (a
    listener really closed, so the caller may reuse its port).  Cancelling
    ``result`` calls ``cancelled`` (default: ``close``).
    """

    def __init__(self, clock: IReactorTime, cancelled: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.over = False
        self._cancelled = cancelled
        self.result: Deferred[T] = Deferred(self._cancel)
        self._timers: list[IDelayedCall] = []
        self._attempts: list[Deferred[Any]] = []
        self._contenders: list[Any] = []
        self._cleanups: list[Callable[[], Deferred[None] | None]] = []

    # -- what a race holds ------------------------------------------------------

    def later(self, delay: float, f: Callable[..., object], *args: object) -> IDelayedCall:
        """``clock.callLater``, cancelled when the contest closes."""
        self._timers = [t for t in self._timers if t.active()]
        timer = self.clock.callLater(delay, f, *args)
        self._timers.append(timer)
        return timer

    def track(self, attempt: Deferred[A]) -> Deferred[A]:
        """An attempt in flight (a connect, a sub-race): cancelled when the contest closes.

        It is forgotten as soon as it fires, before the caller's own
        callbacks (added after this) run.
        """
        self._attempts.append(attempt)

        def forget(passthrough: A | Failure) -> A | Failure:
            if attempt in self._attempts:
                self._attempts.remove(attempt)
            return passthrough

        attempt.addBoth(forget)
        return attempt

    def contend(self, protocol: Any, won: Callable[[Any], None], lost: Callable[[Failure], None]) -> None:
        """``protocol`` is connected and in handshake (it has ``handshake_done``).

        ``won(app)`` or ``lost(reason)`` when its handshake ends; until then it
        is a contender, aborted if the contest closes first.
        """
        self._contenders.append(protocol)

        def ok(app: Any) -> None:
            self._forget(protocol)
            won(app)

        def bad(reason: Failure) -> None:
            self._forget(protocol)
            lost(reason)

        protocol.handshake_done.addCallbacks(ok, bad)

    @property
    def contenders(self) -> int:
        """How many connections are in handshake."""
        return len(self._contenders)

    def _forget(self, protocol: Any) -> None:
        if protocol in self._contenders:
            self._contenders.remove(protocol)

    def on_close(self, cleanup: Callable[[], Deferred[None] | None]) -> None:
        """Run ``cleanup`` when the contest closes; ``result`` waits for its Deferred."""
        self._cleanups.append(cleanup)

    # -- ending -----------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Cancel the timers and the attempts, abort the contenders, run the cleanups.

        Fires once every cleanup has finished, whether or not it succeeded
        (a listener that fails to close is gone anyway).  Closing again does
        nothing more.
        """
        self.over = True
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.active():
                timer.cancel()
        attempts, self._attempts = self._attempts, []
        for attempt in attempts:
            attempt.cancel()
        contenders, self._contenders = self._contenders, []
        for protocol in contenders:
            abort_protocol(protocol)
        cleanups, self._cleanups = self._cleanups, []
        if not cleanups:
            return succeed(None)
        waits = [maybeDeferred(cleanup).addErrback(lambda _: None) for cleanup in cleanups]
        return DeferredList(waits).addCallback(lambda _: None)

    def win(self, result: T) -> None:
        """Close, then fire ``result`` with ``result`` (unless it already fired)."""
        self.close().addCallback(self._deliver, result)

    def lose(self, failure: Exception) -> None:
        """Close, then fail ``result`` with ``failure`` (unless it already fired)."""
        self.close().addCallback(self._deliver, Failure(failure))

    def _deliver(self, _: None, outcome: T | Failure) -> None:
        if self.result.called:
            return
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _cancel(self, _: Deferred[T]) -> None:
        if self._cancelled is not None:
            self._cancelled()
        else:
            self.close()


def has_handshake(protocol: object) -> bool:
    """Whether ``protocol`` counts only after a handshake (it has ``handshake_done``).

    Without touching the attribute: ``handshake_done`` makes a new Deferred
    per access, and one nobody consumes would be reported as an unhandled
    error when it fails.
    """
    return hasattr(type(protocol), "handshake_done") or "handshake_done" in getattr(protocol, "__dict__", {})
