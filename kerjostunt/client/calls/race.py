"""
The connection race of one call: every technique at once, the first verified connection wins.

The peer's host candidates on a shared LAN, its passive candidates, the
punch and (between a random NAT and an easy one) the birthday search all
start at the dial moment the server chose; each connection runs the per-call
handshake, and the first to pass it is the call's connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.appport import CallHandshakeFactory, _PreambleFactory, call_tag
from kerjostunt.client.calls.setup import CallSetup, ConnectFailed, Endpoint, _reason
from kerjostunt.client.nat import birthday
from kerjostunt.client.nat.punch import PunchFailed, PunchPlan, punch
from kerjostunt.client.nat.sockets import connect_from
from kerjostunt.wire.prediction import RANDOM
from kerjostunt.wire.sdp import Candidate

log = Logger()

RETRY_JITTER = 0.2  # seconds added at random to each punch retry (PunchPlan.retry_jitter)


# -- dialing -----------------------------------------------------------------------


@dataclass(frozen=True)
class DialResult:
    protocol: object
    outcome: str
    technique: str
    remote: Endpoint
    elapsed: float


class Dialer:
    """
    All techniques of one call at once; the first verified connection wins.

    States: ``waiting`` (for the dial moment; the peer may already reach our
    app port) -> ``dialing`` -> ``done``.  ``result`` fires with a
    DialResult or fails with ConnectFailed naming every attempt's last error.
    """

    def __init__(
        self,
        reactor: Any,
        setup: CallSetup,
        app_factory: IProtocolFactory,
        *,
        local_ip: str,
        punch_port: int,
        own_public_ip: str | None,
        deadline: float,
        low_ttl: int | None,
        handshake_timeout: float = 5.0,
        direct_timeout: float = 3.0,
    ) -> None:
        self.reactor = reactor
        self.setup = setup
        self.local_ip = local_ip
        self.punch_port = punch_port
        self.lan = setup.peer_public is not None and setup.peer_public == own_public_ip
        self.deadline = deadline
        self.low_ttl = low_ttl
        self.direct_timeout = direct_timeout
        self.handshake_timeout = handshake_timeout
        self.handshakes = CallHandshakeFactory(setup.secret, setup.handshake_id, setup.role, app_factory, reactor, handshake_timeout)
        self.tag = call_tag(setup.secret, setup.handshake_id)
        self.result: defer.Deferred = defer.Deferred()
        self.state = "waiting"
        self.dial_at = reactor.seconds()
        self.pending = 0
        self.errors: list[str] = []
        self._connects: list[defer.Deferred] = []
        self._contenders: list[Protocol] = []
        self._punch: defer.Deferred | None = None
        self._timers: list[Any] = []
        self._starting = False
        self._lan_dialed = False
        # The peer's "use STUNT" flag says its public endpoint is closed: skip it.
        self.stunt_only = False
        self.own_probes: list[Any] = []  # this call's ProbeResults (birthday roles)

    # planning ------------------------------------------------------------------

    def direct_candidates(self) -> list[tuple[Candidate, str]]:
        """Passive candidates to connect to plainly: host ones only on a shared LAN."""
        remote = self.setup.remote
        plan: list[tuple[Candidate, str]] = []
        if self.lan:
            plan += [(c, "lan") for c in remote.of_type("host", "passive")]
        if not self.stunt_only:
            plan += [(c, "public") for c in remote.of_type("srflx", "passive")]
        return plan

    def punch_candidates(self) -> tuple[Endpoint, ...]:
        """The predicted endpoints best first, then the peer's punch port itself."""
        remote = self.setup.remote
        ordered = sorted(remote.of_type("prflx"), key=lambda c: -c.priority)
        so = remote.punch_candidate
        if so is not None:
            ordered.append(so)
        seen: list[Endpoint] = []
        for c in ordered:
            if c.endpoint not in seen and c.port:
                seen.append(c.endpoint)
        return tuple(seen)

    # running -------------------------------------------------------------------

    def start(self, delay: float) -> defer.Deferred:
        """Dial ``delay`` seconds from now; the peer's LAN candidates at once.

        A connect inside our LAN needs no simultaneous open and takes no NAT
        port, so it need not wait for the moment both SYNs leave together.
        """
        self.dial_at = self.reactor.seconds() + delay
        self._later(delay, self.begin)
        for candidate, technique in self.direct_candidates():
            if technique == "lan":
                self._lan_dialed = True
                self._dial_direct(candidate.endpoint, technique)
        return self.result

    def begin(self) -> None:
        if self.state != "waiting":
            return
        self.state = "dialing"
        log.debug("call {call}: dialing as {role}", call=self.setup.call_id, role=self.setup.role)
        # An attempt that fails at once must not end the call before the
        # others have started.
        self._starting = True
        # Host candidates on our own LAN first (cheapest, and they take no
        # NAT port).  Then the punch, before any connect that leaves through
        # the NAT: a sequential NAT gives every new connection the next port,
        # and the predicted window assumes the punch's SYNs are the first
        # after the probes (NAT lab, test_sequential).
        direct = self.direct_candidates()
        for candidate, technique in direct:
            if technique == "lan" and not self._lan_dialed:
                self._dial_direct(candidate.endpoint, technique)
        candidates = self.punch_candidates()
        own_nat = birthday.describe_own(self.own_probes, self.local_ip)
        peer_nat = birthday.parse_nat_header(self.setup.peer_nat)
        hopeless = _both_random(own_nat, peer_nat)
        if hopeless:
            self.errors.append(f"punch: {hopeless}")
        elif candidates:
            plan = PunchPlan(
                local=(self.local_ip, self.punch_port),
                candidates=candidates,
                deadline=self.deadline,
                low_ttl=self.low_ttl,
                # Peers whose first SYNs missed each other (start skew of
                # more than one one-way delay, NATs that answer RST) would
                # otherwise retry in lockstep and miss every time.
                retry_jitter=RETRY_JITTER,
            )
            self.pending += 1
            self._punch = punch(self.reactor, plan, self.handshakes)
            self._punch.addCallbacks(self._punched, self._punch_failed)
        for candidate, technique in direct:
            if technique != "lan":
                self._dial_direct(candidate.endpoint, technique)
        # The birthday technique last: its hard side opens hundreds of
        # sockets in this turn, which would delay the direct connects by
        # tens of ms (NAT lab: random NAT to a public peer).
        if not hopeless:
            self._start_birthday(own_nat, peer_nat)
        self._starting = False
        # A safety net: the punch ends at its deadline, handshakes at theirs.
        self._later(self.deadline + self.handshake_timeout + 1.0, self._give_up)
        self._check_exhausted()

    def _dial_direct(self, endpoint: Endpoint, technique: str) -> None:
        self.pending += 1
        try:
            d = connect_from(
                self.reactor, (self.local_ip, 0), endpoint,
                _PreambleFactory(self.handshakes, self.tag), timeout=self.direct_timeout,
            )
        except OSError as e:
            self._attempt_failed(f"{technique} {endpoint[0]}:{endpoint[1]}: {e}")
            return
        self._connects.append(d)

        def connected(protocol: Any) -> None:
            self._connects.remove(d)
            self.pending -= 1  # the handshake takes over the count
            self.contend(protocol, endpoint, "direct", technique)

        def failed(reason: Failure) -> None:
            if d in self._connects:
                self._connects.remove(d)
            if reason.check(defer.CancelledError):
                return
            self._attempt_failed(f"{technique} {endpoint[0]}:{endpoint[1]}: {_reason(reason)}")

        d.addCallbacks(connected, failed)

    def accepted(self, protocol: Any, remote: Endpoint) -> None:
        """A connection the peer made to our app port, already in handshake."""
        if self.state == "done":
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            return
        self.contend(protocol, remote, "direct", "lan" if self.lan else "public")

    def contend(self, protocol: Any, remote: Endpoint, outcome: str, technique: str) -> None:
        if self.state == "done":
            _abort(protocol)
            return
        self.pending += 1
        self._contenders.append(protocol)

        def ok(app: Any) -> None:
            self._contenders.remove(protocol)
            self.pending -= 1
            self._won(DialResult(app, outcome, technique, remote, self._elapsed()))

        def bad(reason: Failure) -> None:
            if protocol in self._contenders:
                self._contenders.remove(protocol)
            self._attempt_failed(f"{technique} {remote[0]}:{remote[1]}: {_reason(reason)}")

        protocol.handshake_done.addCallbacks(ok, bad)

    def _punched(self, result: Any) -> None:
        self._punch = None
        self.pending -= 1
        self._won(DialResult(result.protocol, "stunt", result.technique, result.remote, self._elapsed()))

    def _start_birthday(self, own_nat: Any, peer_nat: Any) -> None:
        """The birthday technique when one NAT is random and the other's mapping
        endpoint-independent (birthday.py); it runs beside the punch."""
        role, why = birthday.choose_role(own_nat, peer_nat)
        candidates = self.punch_candidates()
        if role is None or not candidates:
            if why:
                self.errors.append(f"birthday: {why}")
            return
        plan = birthday.plan_for_call(
            role, local_ip=self.local_ip, punch_port=self.punch_port, peer_endpoint=candidates[0],
            deadline=self.deadline, low_ttl=self.low_ttl,
        )
        self.pending += 1
        d = birthday.birthday(self.reactor, plan, self.handshakes)
        self._connects.append(d)  # cancelled by _teardown

        def won(result: Any) -> None:
            self._connects.remove(d)
            self.pending -= 1
            self._won(DialResult(result.protocol, "stunt", result.technique, result.remote, self._elapsed()))

        def failed(reason: Failure) -> None:
            if d in self._connects:
                self._connects.remove(d)
            if not reason.check(defer.CancelledError):
                self._attempt_failed(reason.value.reason if reason.check(PunchFailed) else _reason(reason))

        d.addCallbacks(won, failed)

    def _punch_failed(self, reason: Failure) -> None:
        self._punch = None
        if reason.check(defer.CancelledError):
            return
        why = reason.value.reason if reason.check(PunchFailed) else _reason(reason)
        self._attempt_failed(f"punch: {why}")

    def _elapsed(self) -> float:
        return max(0.0, self.reactor.seconds() - self.dial_at)

    # ending --------------------------------------------------------------------

    def _attempt_failed(self, why: str) -> None:
        self.pending -= 1
        self.errors.append(why)
        self._check_exhausted()

    def _check_exhausted(self) -> None:
        if self.state == "dialing" and self.pending <= 0 and not self._starting:
            self._fail(ConnectFailed("all techniques failed: " + "; ".join(self.errors or ["nothing to dial"])))

    def _give_up(self) -> None:
        self._fail(ConnectFailed("no verified connection in time: " + "; ".join(self.errors or ["no answer"])))

    def _won(self, result: DialResult) -> None:
        if self.state == "done":
            return
        self._teardown()
        self.result.callback(result)

    def _fail(self, failure: ConnectFailed) -> None:
        if self.state == "done":
            return
        self._teardown()
        self.result.errback(failure)

    def stop(self, why: str) -> None:
        """Abandon the call (CANCEL/BYE, timeout, agent stopping)."""
        self._fail(ConnectFailed(why))

    def _teardown(self) -> None:
        self.state = "done"
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for d in list(self._connects):
            d.cancel()
        self._connects.clear()
        for protocol in list(self._contenders):
            _abort(protocol)
        self._contenders.clear()
        if self._punch is not None:
            d, self._punch = self._punch, None
            d.cancel()

    def _later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, f, *args))


def _both_random(own: Any, peer: Any) -> str:
    """Why punching cannot work, or "".

    When both NATs draw a random port for every new connection, neither
    side can know where to send its SYN and no SYN can match the other
    NAT's mapping: punching would only wait out its deadline (10 s).
    The direct attempts still run.
    """
    if own is not None and peer is not None and own.allocation == peer.allocation == RANDOM:
        return "not tried: both NATs allocate ports at random"
    return ""


def _abort(protocol: Any) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abortConnection()

