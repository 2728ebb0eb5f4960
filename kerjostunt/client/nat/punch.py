"""
TCP hole punching: simultaneous open (P2PNAT) from the probed local port.

Both peers, at a time the server picked so their SYNs cross, listen on the
local port their probes used and dial every candidate endpoint of the other
peer from that same port.  Our outgoing SYN creates the mapping in our NAT;
the peer's SYN then either meets our connecting socket (simultaneous open)
or our listener (accepted).  Whichever TCP connection completes first --
after the per-call handshake, when the factory is a HandshakeFactory -- wins;
everything else is closed.  See docs/punching.rst.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocol, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.client.nat.contest import Contest, has_handshake
from kerjostunt.client.nat.sockets import SocketReactor, connect_from, listen_reusable
from kerjostunt.client.nat.sockets import abort_protocol as _drop

log = Logger()

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class PunchPlan:
    """
    What one side does for one call.

    ``candidates``: the peer's endpoints, best first (for a sequential NAT a
    window of predicted ports).  ``deadline``: seconds after dialing starts.
    ``start_at``: absolute reactor time to start (None: now), so both SYNs
    leave together.  ``low_ttl``: TTL of the first SYN to each candidate
    (just enough to leave our own NAT; None: no priming).
    ``attempt_timeout``: how long one connect may stay unanswered before it
    is replaced by a fresh one (the kernel would only retransmit after 1 s,
    then 3 s).  ``retry_jitter``: up to this many seconds added at random
    to each ``retry_interval``, so two peers do not retry in lockstep.
    ``grace``: at the deadline, how long a connection whose handshake is in
    flight may still take (``Contest.expire``; the handshake's ``proof_wait``).
    """

    local: Endpoint
    candidates: tuple[Endpoint, ...]
    deadline: float
    start_at: float | None = None
    low_ttl: int | None = None
    retry_interval: float = 0.2
    attempt_timeout: float = 1.0
    retry_jitter: float = 0.0
    grace: float = 10.0

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("a punch needs at least one candidate")
        if self.deadline <= 0 or self.retry_interval <= 0 or self.attempt_timeout <= 0:
            raise ValueError("deadline, retry_interval and attempt_timeout must be positive")
        if self.retry_jitter < 0:
            raise ValueError("retry_jitter must not be negative")


@dataclass(frozen=True)
class PunchResult:
    """``technique``: 'simultaneous-open' | 'low-ttl' (dialed) or 'accepted'."""

    protocol: Any
    remote: Endpoint
    technique: str
    attempts: int
    elapsed: float


class PunchFailed(Exception):
    """No connection (that passed the handshake) before the deadline."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def punch(reactor: SocketReactor, plan: PunchPlan, protocol_factory: IProtocolFactory) -> Deferred[PunchResult]:
    """
    Punch a TCP connection according to ``plan``; fires with a PunchResult.

    With a HandshakeFactory (anything whose protocols carry a
    ``handshake_done`` Deferred) a connection counts only once its handshake
    succeeded, and ``PunchResult.protocol`` is the application protocol; a
    connection to the wrong host is dropped and the candidate dialed again.
    When the Deferred fires, every other attempt and the listener are closed.
    Cancelling it stops everything.
    """
    return _Punch(reactor, plan, protocol_factory).start()


def _describe(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason_text(reason: Failure | BaseException) -> str:
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, error.ConnectionRefusedError):
        return "refused"
    if isinstance(exc, error.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


@implementer(IProtocolFactory)
class _AcceptFactory:
    """The listener's factory: every accepted connection is a contender."""

    def __init__(self, owner: _Punch) -> None:
        self.owner = owner

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.owner.accepted(addr)


class _Punch:
    """One side's punch for one call; its life is its Contest (open until won, failed or cancelled)."""

    def __init__(self, reactor: SocketReactor, plan: PunchPlan, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.plan = plan
        self.factory = factory
        self.contest: Contest[PunchResult] = Contest(reactor)
        self.contest.on_close(self.close_listener)
        self.attempts = 0
        self.started = 0.0
        self.port: IListeningPort | None = None
        self.dials: dict[Endpoint, Deferred[Any]] = {}
        self.last_error: dict[Endpoint, str] = {}

    # Starting -----------------------------------------------------------

    def start(self) -> Deferred[PunchResult]:
        now = self.reactor.seconds()
        if self.plan.start_at is not None and self.plan.start_at > now:
            self.contest.later(self.plan.start_at - now, self.begin)
        else:
            self.begin()
        return self.contest.result

    def begin(self) -> None:
        self.started = self.reactor.seconds()
        self.contest.later(self.plan.deadline, self.deadline_passed)
        try:
            self.port = listen_reusable(self.reactor, self.plan.local, _AcceptFactory(self))
        except OSError as e:
            self.contest.lose(PunchFailed(f"cannot listen on {_describe(self.plan.local)}: {e}"))
            return
        log.debug(
            "punching from {local} to {candidates}",
            local=self.plan.local,
            candidates=self.plan.candidates,
        )
        for candidate in self.plan.candidates:
            self.dial(candidate, first=True)

    # Dialing ------------------------------------------------------------

    def remaining(self) -> float:
        return self.started + self.plan.deadline - self.reactor.seconds()

    def dial(self, candidate: Endpoint, first: bool = False) -> None:
        if self.contest.over or candidate in self.dials:
            return
        remaining = self.remaining()
        if remaining <= 0:
            return
        low = first and self.plan.low_ttl is not None
        # A primed SYN dies on the way: give it a moment for the peer's SYN
        # to arrive through the fresh mapping, then dial with the normal TTL.
        timeout = self.plan.retry_interval if low else self.plan.attempt_timeout
        self.attempts += 1
        try:
            d = connect_from(
                self.reactor,
                self.plan.local,
                candidate,
                self.factory,
                timeout=min(timeout, remaining),
                ttl=self.plan.low_ttl if low else None,
            )
        except OSError as e:
            self.dial_failed(Failure(e), candidate, low)
            return
        self.dials[candidate] = self.contest.track(d)
        technique = "low-ttl" if low else "simultaneous-open"
        d.addCallbacks(
            self.dialed,
            self.dial_failed,
            callbackArgs=(candidate, technique),
            errbackArgs=(candidate, low),
        )

    def retry_delay(self) -> float:
        """``retry_interval`` plus up to ``retry_jitter``: two peers that both
        retry on a fixed period keep the offset their first SYNs had, so a
        pair that missed each other once (each SYN meeting the other NAT's
        closed mapping and drawing an RST) would miss every time."""
        jitter = self.plan.retry_jitter
        return self.plan.retry_interval + (random.uniform(0.0, jitter) if jitter else 0.0)

    def dialed(self, protocol: Any, candidate: Endpoint, technique: str) -> None:
        self.dials.pop(candidate, None)
        self.contend(protocol, candidate, technique, redial=True)

    def dial_failed(self, reason: Failure, candidate: Endpoint, low: bool) -> None:
        self.dials.pop(candidate, None)
        if self.contest.over or reason.check(CancelledError):
            return
        self.last_error[candidate] = _reason_text(reason)
        half_open = getattr(reason.value, "osError", None) == errno.EADDRNOTAVAIL
        if half_open:
            self.stop_listening(candidate)
        # A primed SYN ends in EHOSTUNREACH (Linux aborts the connect on the
        # ICMP time exceeded) or in our short timeout; the mapping it made
        # survives.  Dial again at once: the peer's SYN must meet a socket in
        # SYN_SENT, since a listener's SYN-ACK carries an ISN the NAT's
        # conntrack has not seen and is dropped (docs/nat-lab.rst).
        delay = 0.0 if low or half_open else self.retry_delay()
        self.contest.later(delay, self.dial, candidate)

    def stop_listening(self, candidate: Endpoint) -> None:
        """Close the listener for the rest of the punch.

        EADDRNOTAVAIL on a redial means the listener holds a half-open
        connection for that 4-tuple: the peer's SYN came in while none of our
        connects was in SYN_SENT (just after a primed one was aborted, when
        the peers' dial moments are skewed by about the RTT to the priming
        router).  Its SYN-ACK carries an ISN our NAT has not seen and dies
        there, and the kernel keeps it for about a minute, refusing every
        redial to that candidate and answering the peer's next SYNs with RST.
        Closing the listener drops it.  It is not reopened: it would catch
        the peer's next SYN the same way (NAT lab), while our redial in
        SYN_SENT meets it as a simultaneous open.
        """
        if self.port is None:
            return
        log.debug("punch: closing the listener on {local}, it held a half-open connection from {remote}",
                  local=_describe(self.plan.local), remote=_describe(candidate))
        try:
            closing = self.close_listener()
        except Exception as e:
            closing = fail(e)
        if closing is not None:
            closing.addErrback(lambda f: log.warn("punch: closing the listener failed: {why}",
                                                  why=f.getErrorMessage()))

    def close_listener(self) -> Deferred[None] | None:
        """The Contest's cleanup: a listener still open is closed (the result waits for it)."""
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()

    # Accepting ----------------------------------------------------------

    def accepted(self, addr: IAddress) -> IProtocol | None:
        if self.contest.over:
            return None
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            return None
        remote = _endpoint_of(addr)
        if has_handshake(protocol):
            self.contend(protocol, remote, "accepted", redial=False)
        else:
            # The transport is attached only after buildProtocol returns.
            self.contest.later(0, self.contend, protocol, remote, "accepted", False)
        return protocol

    # Choosing the winner --------------------------------------------------

    def contend(self, protocol: Any, remote: Endpoint, technique: str, redial: bool) -> None:
        if self.contest.over:
            _drop(protocol)
            return
        if not has_handshake(protocol):
            self.won(protocol, protocol, remote, technique)
            return

        def ok(app: Any) -> None:
            self.won(protocol, app, remote, technique)

        def bad(reason: Failure) -> None:
            if self.contest.over:
                return
            self.last_error[remote] = f"handshake: {_reason_text(reason)}"
            if redial:
                self.contest.later(self.retry_delay(), self.dial, remote)

        self.contest.contend(protocol, ok, bad)

    def won(self, wrapper: Any, app: Any, remote: Endpoint, technique: str) -> None:
        if self.contest.settled:
            _drop(wrapper)
            return
        if getattr(wrapper, "transport", None) is None:
            return  # refused or gone before it was attached
        result = PunchResult(
            protocol=app,
            remote=remote,
            technique=technique,
            attempts=self.attempts,
            elapsed=self.reactor.seconds() - self.started,
        )
        log.info(
            "punched {remote} via {technique} after {attempts} attempts in {elapsed:.3f} s",
            remote=_describe(remote),
            technique=technique,
            attempts=self.attempts,
            elapsed=result.elapsed,
        )
        # Fires only once the listener is really closed, so the caller can
        # reuse the port and nothing of the punch outlives its result.
        self.contest.win(result)

    def deadline_passed(self) -> None:
        """Stop dialing; a connection whose handshake is in flight may still win (``Contest.expire``)."""
        if self.contest.over:
            return
        errors = "; ".join(
            f"{_describe(c)} {self.last_error.get(c, 'no answer')}" for c in self.plan.candidates
        )
        extra = {k: v for k, v in self.last_error.items() if k not in self.plan.candidates}
        if extra:
            errors += "; " + "; ".join(f"{_describe(k)} {v}" for k, v in extra.items())
        self.contest.expire(
            PunchFailed(
                f"no connection within {self.plan.deadline:g} s after "
                f"{self.attempts} attempts from {_describe(self.plan.local)} ({errors})"
            ),
            self.plan.grace,
        )


def _endpoint_of(addr: IAddress) -> Endpoint:
    """(host, port) of an IPv4Address/IPv6Address."""
    return (addr.host, addr.port)  # type: ignore[attr-defined]
