"""
One call, both directions: "connect me to user X" and "user Y wants us".

The flows follow docs/protocol.rst ("Calls"):

- outgoing: bind a fresh reusable punch port, probe from it, INVITE with our
  SDP, wait for the 200 OK, ACK, then dial at ``X-Kerjo-Dial-In``;
- incoming: on the server's INVITE bind a punch port, probe, answer 200 OK
  with our SDP, and dial when the server's ACK says so.

Dialing (``Dialer``) runs every technique at once -- the peer's host
candidates on a shared LAN, its passive candidates, the punch -- and the
first connection that passes the per-call handshake wins.  Each side then
reports the outcome in an INFO.

Connections to the agent's *application port* (the ``passive`` candidate)
are shared by every call, so the dialer of such a connection first sends one
line naming the call (``KJ1 CALL <tag>``, the tag an HMAC of the call ID
under the call's secret, so it reveals nothing to a stranger); the accepting
agent uses it to pick the call's HandshakeFactory.  The punch port belongs to
one call and needs no such line.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.handshake import HandshakeFactory, HandshakeProtocol
from kerjostunt.client.nat import birthday
from kerjostunt.client.nat.probing import ProbeError
from kerjostunt.client.nat.punch import PunchFailed, PunchPlan, punch
from kerjostunt.client.nat.sockets import connect_from, reusable_socket
from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import Outcome, new_tag
from kerjostunt.wire.prediction import RANDOM
from kerjostunt.wire.sdp import Candidate, SDPError, SessionDescription, candidate_priority, parse_sdp
from kerjostunt.wire.sip.headers import parse_name_addr
from kerjostunt.wire.sip.message import Request, Response

log = Logger()

Endpoint = tuple[str, int]

PREAMBLE = b"KJ1 CALL "
PREAMBLE_MAX = 100
ACK_TIMEOUT = 32.0  # RFC 3261 Timer H: how long a callee waits for the server's ACK
RETRY_JITTER = 0.2  # seconds added at random to each punch retry (PunchPlan.retry_jitter)


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerConnection:
    """A verified connection to a peer; ``protocol`` is the application's."""

    peer_id: str
    protocol: object
    technique: str
    outcome: str  # 'direct' | 'stunt'
    remote: tuple[str, int]
    elapsed_ms: float


class ConnectFailed(Exception):
    """The peer could not be reached; ``code`` is the SIP status when there was one."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# -- pure helpers ----------------------------------------------------------------


@dataclass(frozen=True)
class CallSetup:
    """What the server told one side about a call (headers plus the peer's SDP)."""

    call_id: str
    secret: bytes
    role: str
    peer_public: str | None
    remote: SessionDescription
    peer_nat: str | None = None  # X-Kerjo-NAT as sent (birthday.parse_nat_header)

    @property
    def handshake_id(self) -> str:
        """The call ID both peers feed the handshake MAC.

        The server is a back-to-back agent: each leg has its own SIP Call-ID
        and neither peer learns the other's, so the shared per-call secret is
        the only identifier both sides hold.
        """
        return hashlib.sha256(b"kerjostunt-1 call-id\0" + self.secret).hexdigest()[:32]


def read_setup(message: Request | Response) -> CallSetup:
    """The call parameters from the forwarded INVITE or the 200 OK; ValueError if unusable."""
    call_id = message.headers.get("Call-ID")
    if not call_id:
        raise ValueError("no Call-ID")
    headers = kerjo.parse_call_headers(message.headers.get)
    try:
        remote = parse_sdp(message.body)
    except SDPError as e:
        raise ValueError(f"bad SDP: {e}") from None
    if remote.punch_candidate is None and not remote.of_type("prflx"):
        raise ValueError("the peer's SDP has no punch candidate")
    return CallSetup(call_id, headers.secret, headers.role.value, headers.peer_public, remote, headers.nat)


def dial_in_seconds(message: Request | Response) -> float:
    """``X-Kerjo-Dial-In`` (ms after receipt) in seconds, 0 when absent or odd."""
    return kerjo.parse_dial_in(message.headers.get(kerjo.DIAL_IN))


def build_offer(user: str, host_ip: str, punch_port: int, app_port: int | None) -> SessionDescription:
    """Our SDP: the punch port (``so``) and, if we listen, the app port (``passive``)."""
    candidates = [
        Candidate("1", 1, "TCP", candidate_priority("host", "so"), host_ip, punch_port, "host", "so"),
    ]
    if app_port:
        candidates.append(
            Candidate("2", 1, "TCP", candidate_priority("host", "passive"), host_ip, app_port, "host", "passive")
        )
    return SessionDescription(user=user, host_ip=host_ip, candidates=candidates, punch_port=punch_port)


def outcome_body(outcome: str, technique: str, remote: Endpoint | None, elapsed_ms: float) -> bytes:
    """The INFO body of docs/protocol.rst ("Outcome")."""
    return Outcome(outcome, technique, remote, int(round(elapsed_ms))).to_bytes()


def call_tag(secret: bytes, call_id: str) -> bytes:
    """Names a call on the shared app port without revealing its Call-ID."""
    mac = hmac.new(secret, b"kerjostunt-1 call\0" + call_id.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:32].encode("ascii")


def user_of(name_addr: str | None) -> str | None:
    try:
        return parse_name_addr(name_addr or "").uri.user
    except ValueError:
        return None


def tag_of(name_addr: str | None) -> str | None:
    try:
        return parse_name_addr(name_addr or "").tag
    except ValueError:
        return None


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or failure.type.__name__


# -- handshakes ---------------------------------------------------------------------


class _CallHandshakeProtocol(HandshakeProtocol):
    """A HandshakeProtocol whose unobserved failures are not 'unhandled errors'.

    ``punch()`` probes an accepted protocol with ``getattr(p, "handshake_done")``,
    which creates an observer Deferred nobody consumes; a loser's failure on
    it would be logged as an unhandled error.  The failure itself is
    reported (and logged) through the observers that are used.
    """

    def _resolve(self, outcome: Any) -> None:
        if isinstance(outcome, Failure):
            for d in self._observers:
                if not d.callbacks:
                    d.addErrback(lambda _: None)
        super()._resolve(outcome)


class CallHandshakeFactory(HandshakeFactory):
    protocol = _CallHandshakeProtocol  # type: ignore[assignment]

    def buildProtocol(self, addr: Any) -> HandshakeProtocol:
        return _CallHandshakeProtocol(self, addr)


# -- app-port connections ----------------------------------------------------------


class _PreambleProtocol(Protocol):
    """Dialer side of an app-port connection: name the call, then run the handshake."""

    def __init__(self, inner: Protocol, tag: bytes) -> None:
        self.inner = inner
        self.tag = tag

    @property
    def handshake_done(self) -> defer.Deferred:
        return self.inner.handshake_done  # type: ignore[attr-defined, no-any-return]

    def connectionMade(self) -> None:
        self.transport.write(PREAMBLE + self.tag + b"\n")
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.inner.connectionLost(reason)


class _PreambleFactory(Factory):
    def __init__(self, handshakes: HandshakeFactory, tag: bytes) -> None:
        self.handshakes = handshakes
        self.tag = tag

    def buildProtocol(self, addr: Any) -> Protocol:
        return _PreambleProtocol(self.handshakes.buildProtocol(addr), self.tag)


class AppPortProtocol(Protocol):
    """
    Accepting side of the app port: read ``KJ1 CALL <tag>``, hand over to the call.

    ``lookup(tag)`` returns the call's Dialer or None; a stranger, a bad
    line or silence (``timeout``) closes the connection.
    """

    def __init__(self, lookup: Callable[[bytes], Dialer | None], clock: Any, timeout: float = 5.0) -> None:
        self.lookup = lookup
        self.clock = clock
        self.timeout = timeout
        self.inner: Protocol | None = None
        self._buffer = b""
        self._timer: Any = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._give_up, "no call named in time")

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._buffer += data
        line, sep, rest = self._buffer.partition(b"\n")
        if not sep:
            if len(self._buffer) > PREAMBLE_MAX:
                self._give_up("preamble too long")
            return
        dialer = self.lookup(line[len(PREAMBLE):]) if line.startswith(PREAMBLE) else None
        if dialer is None:
            self._give_up("no such call")
            return
        self._cancel_timer()
        peer = self.transport.getPeer()
        inner = dialer.handshakes.buildProtocol(peer)
        self.inner = inner
        inner.makeConnection(self.transport)
        dialer.accepted(inner, (peer.host, peer.port))
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self._cancel_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def _give_up(self, why: str) -> None:
        self._cancel_timer()
        log.info("app port: dropping {peer}: {why}", peer=self.transport.getPeer(), why=why)
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class AppPortFactory(Factory):
    def __init__(self, lookup: Callable[[bytes], Dialer | None], clock: Any) -> None:
        self.lookup = lookup
        self.clock = clock

    def buildProtocol(self, addr: Any) -> Protocol:
        return AppPortProtocol(self.lookup, self.clock)


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


# -- the two call flows --------------------------------------------------------------


class _CallBase:
    """What both directions share: the punch port, probing, dialing, the outcome INFO."""

    def __init__(self, agent: Any, peer_id: str) -> None:
        self.agent = agent
        self.reactor = agent.reactor
        self.peer_id = peer_id
        self.call_id = ""
        self.holder: Any = None
        self.punch_port = 0
        self.dialer: Dialer | None = None
        self.local_ip = "0.0.0.0"
        self.probe_results: list[Any] = []
        self.state = "preparing"
        self._timer: Any = None

    def bind_punch_port(self, sig: SignalingClientProtocol) -> None:
        """A fresh reusable port, held bound until the punch (and the call) ends."""
        self.local_ip = sig.transport.getHost().host
        self.holder = reusable_socket((self.local_ip, 0))
        self.punch_port = self.holder.getsockname()[1]

    @defer.inlineCallbacks
    def take_punch_port(self, sig: SignalingClientProtocol, registration: Any):  # type: ignore[no-untyped-def]
        """The agent's prepared punch port when it fits, else a fresh one probed now."""
        ready_port = getattr(self.agent, "ready_port", None)
        prepared = (yield ready_port.take()) if ready_port is not None else None
        if self.state == "done":  # ended while a preparation was finishing
            if prepared is not None:
                prepared.close()
            return
        local_ip = sig.transport.getHost().host
        public_ip = registration.public_ip if registration is not None else None
        if prepared is not None and (prepared.local_ip, prepared.public_ip) == (local_ip, public_ip):
            self.local_ip, self.holder, self.punch_port = local_ip, prepared.holder, prepared.port
            self.probe_results = prepared.results
            log.debug("call {call}: punch port {port}, probed {age:.0f} ms ago", call=self.call_id,
                      port=self.punch_port, age=(self.reactor.seconds() - prepared.probed_at) * 1000.0)
            return
        if prepared is not None:
            prepared.close()  # probed over another connection or address
        self.bind_punch_port(sig)
        if ready_port is not None and ready_port.failed_recently():
            log.warn("call {call}: no probe server answered lately; calling without probes", call=self.call_id)
            return
        yield self.probe(sig, registration)

    @defer.inlineCallbacks
    def probe(self, sig: SignalingClientProtocol, registration: Any):  # type: ignore[no-untyped-def]
        try:
            self.probe_results = yield self.agent.probe_punch_port(sig, registration, (self.local_ip, self.punch_port))
            log.debug("call {call}: probed from port {port}: {mapped}", call=self.call_id, port=self.punch_port,
                      mapped=", ".join(f"{r.mapped_ip}:{r.mapped_port}" for r in self.probe_results))
        except (ProbeError, OSError) as e:
            # The server then predicts from older observations, or not at all.
            log.warn("call {call}: probing failed: {why}", call=self.call_id, why=str(e))

    def offer(self, sig: SignalingClientProtocol) -> SessionDescription:
        return build_offer(sig.user_id, self.local_ip, self.punch_port, self.agent.app_port)

    def make_dialer(self, setup: CallSetup, app_factory: IProtocolFactory, registration: Any) -> Dialer:
        self.dialer = Dialer(
            self.reactor, setup, app_factory,
            local_ip=self.local_ip, punch_port=self.punch_port,
            own_public_ip=registration.public_ip if registration is not None else None,
            deadline=self.agent.punch_deadline, low_ttl=self.agent.low_ttl,
        )
        self.dialer.stunt_only = getattr(self, "prefer_stunt", False)
        self.dialer.own_probes = self.probe_results
        self.agent.dialer_started(self.dialer)
        return self.dialer

    def _end(self) -> None:
        """Done: stop the call's timer and give back the punch port."""
        if self.state == "done":
            return
        self.state = "done"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.release()

    def release(self) -> None:
        if self.dialer is not None:
            self.agent.dialer_ended(self.dialer)
        if self.holder is not None:
            self.holder.close()
            self.holder = None
        self.agent.call_ended(self)

    def report(self, sig: SignalingClientProtocol | None, body: bytes, from_tag: str | None, to_uri: str, to_tag: str | None) -> None:
        """Send the outcome INFO; a lost signaling connection only costs the record."""
        if sig is None or sig.disconnected.called:
            log.warn("call {call}: outcome not reported, signaling is down", call=self.call_id)
            return
        d = sig.request(
            "INFO", f"sips:{sig.domain}", to=to_uri, call_id=self.call_id,
            from_tag=from_tag, to_tag=to_tag,
            headers=[("Content-Type", kerjo.OUTCOME_CONTENT_TYPE)], body=body,
        )
        d.addCallbacks(
            lambda r: r.code == 200 or log.warn("call {call}: outcome answered {code}", call=self.call_id, code=r.code),
            lambda f: log.warn("call {call}: outcome not acknowledged: {why}", call=self.call_id, why=_reason(f)),
        )


class OutgoingCall(_CallBase):
    """
    "Connect me to user X".

    States: ``preparing`` (registration, punch port, probes) -> ``inviting``
    (INVITE sent) -> ``dialing`` -> ``done``.  ``result`` fires with a
    PeerConnection or fails with ConnectFailed.
    """

    def __init__(
        self, agent: Any, peer_id: str, app_factory: IProtocolFactory, timeout: float, prefer_stunt: bool = False
    ) -> None:
        super().__init__(agent, peer_id)
        self.app_factory = app_factory
        self.timeout = timeout
        self.prefer_stunt = prefer_stunt
        self.invite: Request | None = None
        self.sig: SignalingClientProtocol | None = None
        self.to_tag: str | None = None
        self.result: defer.Deferred = defer.Deferred(lambda d: self.stop("cancelled", notify_result=False))

    def run(self) -> defer.Deferred:
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        d = self._go()
        d.addErrback(self._failed)
        return self.result

    @defer.inlineCallbacks
    def _go(self):  # type: ignore[no-untyped-def]
        sig, registration = yield self.agent.fresh_registration()
        if self.state == "done":
            return
        self.sig = sig
        self.call_id = secrets.token_hex(12) + "@" + sig.user_id
        self.agent.call_started(self)
        yield self.take_punch_port(sig, registration)
        if self.state == "done":
            return
        uri = sig.uri_of(self.peer_id)
        self.invite = sig.build_request(
            "INVITE", uri, call_id=self.call_id,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{sig.local[0]}:{sig.local[1]};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=self.offer(sig).to_bytes(),
        )
        self.state = "inviting"
        response = yield sig.send_request(self.invite, timeout=self.timeout + 1.0)
        if self.state == "done":
            return
        if response.code != 200:
            raise ConnectFailed(f"{response.code} {response.reason}", response.code)
        self.to_tag = tag_of(response.headers.get("To"))
        log.debug("call {call}: answered, dialing in {ms:.0f} ms", call=self.call_id,
                  ms=dial_in_seconds(response) * 1000.0)
        self._ack(sig, response)
        try:
            setup = read_setup(response)
        except ValueError as e:
            raise ConnectFailed(f"unusable answer from the server: {e}") from None
        self.state = "dialing"
        dialer = self.make_dialer(setup, self.app_factory, registration)
        result = yield dialer.start(dial_in_seconds(response))
        self._succeeded(result)

    def _ack(self, sig: SignalingClientProtocol, response: Response) -> None:
        assert self.invite is not None
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        sig.send_request(sig.build_request(
            "ACK", self.invite.uri, call_id=self.call_id, cseq=cseq, to_tag=self.to_tag,
        ))

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self.report(self.sig, outcome_body(result.outcome, result.technique, result.remote, elapsed_ms),
                    None, self.sig.uri_of(self.peer_id) if self.sig else "", self.to_tag)
        self._end()
        if not self.result.called:
            self.result.callback(PeerConnection(
                self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
            ))

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and self.state == "done":
            return
        exc = failure.value
        if not isinstance(exc, ConnectFailed):
            exc = ConnectFailed(_reason(failure))
        if self.state == "dialing" and self.sig is not None:
            elapsed_ms = (self.dialer._elapsed() * 1000.0) if self.dialer else 0.0
            self.report(self.sig, outcome_body("failed", "none", None, elapsed_ms), None,
                        self.sig.uri_of(self.peer_id), self.to_tag)
        self._end()
        if not self.result.called:
            self.result.errback(exc)

    def _timed_out(self) -> None:
        self._timer = None
        self.stop(f"no connection to {self.peer_id} within {self.timeout:g} s", code=408)

    def stop(self, why: str, code: int | None = None, notify_result: bool = True) -> None:
        """Abandon the call: CANCEL a pending INVITE, stop dialing."""
        if self.state == "done":
            return
        if self.state == "inviting" and self.sig is not None and not self.sig.disconnected.called:
            self._cancel_invite(self.sig)
        if notify_result and not self.result.called:
            self.result.errback(ConnectFailed(why, code))
        if self.dialer is not None and self.dialer.state != "done":
            self.dialer.stop(why)  # fails _go, which reports the failure
        self._end()

    def peer_ended(self, request: Request) -> None:
        """The server forwarded a BYE (the callee went away)."""
        self.stop(f"{self.peer_id} ended the call ({request.method})")

    def _cancel_invite(self, sig: SignalingClientProtocol) -> None:
        assert self.invite is not None
        cancel = Request("CANCEL", self.invite.uri)
        for name in ("Via", "Max-Forwards", "From", "To", "Call-ID"):
            for value in self.invite.headers.get_all(name) if name == "Via" else [self.invite.headers.get(name)]:
                if value is not None:
                    cancel.headers.add(name, value)
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        cancel.headers.add("CSeq", f"{cseq} CANCEL")
        sig.transport.write(cancel.to_bytes())


class IncomingCall(_CallBase):
    """
    "User Y wants us": answer the server's INVITE and dial when it ACKs.

    States: ``preparing`` (probing) -> ``answered`` (200 sent, waiting for
    the ACK) -> ``dialing`` -> ``done``.
    """

    def __init__(self, agent: Any, sig: SignalingClientProtocol, invite: Request) -> None:
        super().__init__(agent, user_of(invite.headers.get("From")) or "unknown")
        self.sig = sig
        self.invite = invite
        self.call_id = invite.call_id or ""
        self.to_tag = new_tag()
        self.setup: CallSetup | None = None
        self.registration: Any = None

    def handle(self) -> None:
        if self.agent.accept_factory is None:
            self.sig.respond(self.invite, 603, to_tag=self.to_tag)
            self.state = "done"
            return
        try:
            self.setup = read_setup(self.invite)
        except ValueError as e:
            log.warn("call {call}: refusing an INVITE: {why}", call=self.call_id, why=str(e))
            self.sig.respond(self.invite, 400, to_tag=self.to_tag)
            self.state = "done"
            return
        self.agent.call_started(self)
        log.debug("call {call}: INVITE from {peer}", call=self.call_id, peer=self.peer_id)
        self._timer = self.reactor.callLater(ACK_TIMEOUT, self.stop, "no ACK from the server")
        self._prepare().addErrback(self._prepare_failed)

    @defer.inlineCallbacks
    def _prepare(self):  # type: ignore[no-untyped-def]
        sig, self.registration = yield self.agent.fresh_registration()
        if self.state == "done":
            return
        yield self.take_punch_port(sig, self.registration)
        if self.state == "done":
            return
        # The tag lets the peer reach our app port before our dial moment.
        self.make_dialer(self.setup, self.agent.accept_factory, self.registration)  # type: ignore[arg-type]
        self.sig.respond(
            self.invite, 200, to_tag=self.to_tag,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{sig.local[0]}:{sig.local[1]};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=self.offer(sig).to_bytes(),
        )
        self.state = "answered"

    def _prepare_failed(self, failure: Failure) -> None:
        log.warn("call {call}: could not answer: {why}", call=self.call_id, why=_reason(failure))
        if self.state == "preparing" and not self.sig.disconnected.called:
            self.sig.respond(self.invite, 500, to_tag=self.to_tag)
        self._end()

    def ack(self, request: Request) -> None:
        if self.state != "answered" or self.dialer is None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = "dialing"
        log.debug("call {call}: ACK, dialing in {ms:.0f} ms", call=self.call_id, ms=dial_in_seconds(request) * 1000.0)
        self.dialer.start(dial_in_seconds(request)).addCallbacks(self._succeeded, self._dial_failed)

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self.report(self.sig, outcome_body(result.outcome, result.technique, result.remote, elapsed_ms),
                    self.to_tag, self.sig.uri_of(self.peer_id), tag_of(self.invite.headers.get("From")))
        self._end()
        self.agent.peer_accepted(PeerConnection(
            self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
        ))

    def _dial_failed(self, failure: Failure) -> None:
        log.info("call {call} from {peer} failed: {why}", call=self.call_id, peer=self.peer_id, why=_reason(failure))
        elapsed_ms = (self.dialer._elapsed() * 1000.0) if self.dialer else 0.0
        self.report(self.sig, outcome_body("failed", "none", None, elapsed_ms),
                    self.to_tag, self.sig.uri_of(self.peer_id), tag_of(self.invite.headers.get("From")))
        self._end()

    def cancelled(self, request: Request) -> None:
        """CANCEL from the server: 487 to the INVITE if it was not answered yet."""
        if self.state == "preparing" and not self.sig.disconnected.called:
            self.sig.respond(self.invite, 487, to_tag=self.to_tag)
        self.stop(f"{request.method} from the server")

    def peer_ended(self, request: Request) -> None:
        self.stop(f"{request.method} from the server")

    def stop(self, why: str) -> None:
        if self.state == "done":
            return
        dialer, started = self.dialer, self.state == "dialing"
        self._end()
        if dialer is not None and dialer.state != "done":
            if not started:
                dialer.result.addErrback(lambda _: None)  # nobody waits on it yet
            dialer.stop(why)
