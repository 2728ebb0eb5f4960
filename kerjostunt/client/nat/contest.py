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

A technique's deadline is ``expire``, not ``lose``: it stops the trying at
once but lets a handshake in flight finish.  The handshake's initiator
commits when it *sends* its proof, without hearing back; a responder that
proved itself (``KJ1 R``) and then dropped the connection at its deadline
left the initiator with a "connected" connection that died an RTT later
(the NAT lab's 40-peer group, twice).  So a side whose handshake line is out
(initiator: HELLO sent; responder: R sent) keeps that connection until the
handshake's own verdict, and both sides end with the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kerjostunt.client.nat.sockets import abort_protocol

__all__ = ["Contest", "has_handshake", "in_flight"]

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
        #: no more trying: closed, or expired and waiting only for handshakes in flight
        self.over = False
        #: ``win`` or ``lose`` was called: the outcome is decided (it fires after the cleanups)
        self.settled = False
        self._expired: Exception | None = None  # the failure an expired contest ends with
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
            self._grace_ended()

        def bad(reason: Failure) -> None:
            self._forget(protocol)
            lost(reason)
            self._grace_ended()

        protocol.handshake_done.addCallbacks(ok, bad)

    @property
    def contenders(self) -> int:
        """How many connections are in handshake."""
        return len(self._contenders)

    @property
    def in_flight(self) -> int:
        """How many contenders have a handshake line out that the peer may act on (``in_flight``)."""
        return sum(1 for protocol in self._contenders if in_flight(protocol))

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
        self._stop_trying(keep_in_flight=False)
        cleanups, self._cleanups = self._cleanups, []
        if not cleanups:
            return succeed(None)
        waits = [maybeDeferred(cleanup).addErrback(lambda _: None) for cleanup in cleanups]
        return DeferredList(waits).addCallback(lambda _: None)

    def _stop_trying(self, keep_in_flight: bool) -> None:
        """Timers and attempts cancelled, contenders aborted (but those in flight, when asked)."""
        self.over = True
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.active():
                timer.cancel()
        attempts, self._attempts = self._attempts, []
        for attempt in attempts:
            attempt.cancel()
        kept = [p for p in self._contenders if in_flight(p)] if keep_in_flight else []
        aborted = [p for p in self._contenders if p not in kept]
        self._contenders = kept
        for protocol in aborted:
            abort_protocol(protocol)

    def expire(self, failure: Exception, grace: float) -> None:
        """The technique's deadline: stop trying, but let the handshakes in flight finish.

        Timers and attempts are cancelled at once, and contenders whose
        handshake has not started (a responder that got no HELLO yet: the
        peer committed to nothing) aborted.  A contender in flight (see
        ``in_flight``) keeps its connection until its handshake ends: one
        that passes still wins, and the contest loses with ``failure`` once
        none is left, or ``grace`` seconds from now (a bound the handshake's
        own timeout already keeps).  The cleanups run at the end, as always.
        """
        if self.over:
            return
        self._stop_trying(keep_in_flight=True)
        self._expired = failure
        if not self._contenders:
            self.lose(failure)
            return
        self._timers.append(self.clock.callLater(grace, self._grace_over))

    def _grace_ended(self) -> None:
        """A contender's handshake ended: an expired contest with none left loses now."""
        if self._expired is not None and not self.settled and not self._contenders:
            self.lose(self._expired)

    def _grace_over(self) -> None:
        if self._expired is not None and not self.settled:
            self.lose(self._expired)

    def win(self, result: T) -> None:
        """Close, then fire ``result`` with ``result`` (unless the outcome is already decided)."""
        if self.settled:
            return
        self.settled = True
        self.close().addCallback(self._deliver, result)

    def lose(self, failure: Exception) -> None:
        """Close, then fail ``result`` with ``failure`` (unless the outcome is already decided)."""
        if self.settled:
            return
        self.settled = True
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


def in_flight(protocol: object) -> bool:
    """Whether ``protocol``'s handshake has a line out the peer may act on (``handshake_in_flight``).

    The initiator in ``await_r`` (its HELLO is out) and the responder in
    ``await_i`` (its proof is out: the initiator may already have committed).
    Anything else, and protocols that do not say, may be dropped at a deadline.
    """
    return bool(getattr(protocol, "handshake_in_flight", False))
