"""
A peer: its signaling connection, and the peer-to-peer connections it makes and accepts.

``PeerAgent`` keeps one TLS signaling connection to the STUNT server alive
(REGISTER with digest, answering keepalives and sending its own, re-REGISTER
before expiry, reconnect with jittered exponential backoff), listens on an
application port for direct connections from peers, and runs the call flows
of ``calls.py``: ``connect(peer_id, factory)`` for an outgoing connection,
``accept_factory``/``on_peer`` for incoming ones.  See docs/client.rst.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Any, cast, overload

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import Unpack

from kerjostunt import tls
from kerjostunt.client.agentconfig import DEFAULT_PORT, AgentConfig, AgentSettings, ServerConfig
from kerjostunt.client.agentlife import build_life
from kerjostunt.client.agentprobes import prepared_punch_port, probe_other_family, probe_punch_port
from kerjostunt.client.calls import (
    AppPortFactory,
    CallBase,
    ConnectFailed,
    Dialer,
    IncomingCall,
    OutgoingCall,
    PeerConnection,
)
from kerjostunt.client.nat.interfaces import preferred_ipv6
from kerjostunt.client.nat.portmap import PortMapper, mapper_for
from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.client.nat.readyport import PreparedPort, ReadyPort
from kerjostunt.client.nat.sockets import SocketReactor
from kerjostunt.client.signaling import (
    ConnectSignaling,
    Registration,
    RegistrationFailed,
    SignalingClientProtocol,
    SignalingError,
    connect_signaling,
)
from kerjostunt.wire.sip.message import Request

__all__ = ["PeerAgent", "PeerConnection", "ConnectFailed", "DEFAULT_PORT", "AgentConfig"]

log = Logger()

TOKEN_MARGIN = 10.0  # re-REGISTER when the probe token has less left than this
START_PROBE_WAIT = 2.0  # start() waits at most this long for the first punch port


class PeerAgent:
    """A peer: keeps the signaling connection (connect, REGISTER with digest,
    answer keepalives, re-register before expiry, reconnect with jittered
    exponential backoff), and makes/accepts peer-to-peer connections.

    Built from an ``AgentConfig`` (agentconfig.py), or from its flat keyword
    names: ``PeerAgent(reactor, server=(host, port), user_id=..., ...)``.
    Its life (idle, starting, up, reconnecting, stopped) is the machine in
    agentlife.py.
    """

    #: where the agent finds its IPv6 address (tests hand in their own)
    find_ipv6: Callable[[], str | None] = staticmethod(preferred_ipv6)

    @overload
    def __init__(
        self,
        reactor: IReactorTime,
        config: AgentConfig,
        *,
        accept_factory: IProtocolFactory | None = None,
        on_peer: Callable[[PeerConnection], None] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None: ...

    @overload
    def __init__(
        self,
        reactor: IReactorTime,
        *,
        accept_factory: IProtocolFactory | None = None,
        on_peer: Callable[[PeerConnection], None] | None = None,
        jitter: Callable[[], float] = random.random,
        **settings: Unpack[AgentSettings],
    ) -> None: ...

    def __init__(
        self,
        reactor: IReactorTime,
        config: AgentConfig | None = None,
        *,
        accept_factory: IProtocolFactory | None = None,
        on_peer: Callable[[PeerConnection], None] | None = None,
        jitter: Callable[[], float] = random.random,
        **settings: Any,
    ) -> None:
        # Calls and NAT techniques need its sockets and its time (SocketReactor).
        self.reactor = cast(SocketReactor, reactor)
        self.config = config if config is not None else AgentConfig.of(**settings)
        self.accept_factory = accept_factory
        self.on_peer = on_peer
        #: told of steps a user waits for ("punching (simultaneous open)"): the CLI's progress lines
        self.on_progress: Callable[[str], None] | None = None
        self._jitter = jitter
        #: how to open the signaling connection (tests replace it)
        self.connect_signaling: ConnectSignaling = connect_signaling

        self._life, self._life_core = build_life(self)
        self.signaling: SignalingClientProtocol | None = None
        self.registration: Registration | None = None
        self._registered_at = 0.0
        self._refresh_waiters: list[defer.Deferred[Registration]] = []
        self._up_waiters: list[defer.Deferred[None]] = []
        self._attempt = 0
        self._server_index = 0  # which of config.server.addresses the next attempt dials
        self._timers: dict[str, IDelayedCall] = {}
        self._app_port: IListeningPort | None = None
        self._mapper: PortMapper | None = None
        self._calls: dict[str, CallBase] = {}
        self._dialers: dict[bytes, Dialer] = {}
        #: the next call's punch port, probed while idle (readyport.py); max age 0 turns it off
        self.ready_port = ReadyPort(
            reactor, self._prepare_punch_port, max_age=self.config.ports.punch_port_max_age
        )

    # -- what calls read (calls.py) -----------------------------------------------

    @property
    def user_id(self) -> str:
        return self.config.account.user_id

    @property
    def punch_deadline(self) -> float:
        return self.config.timeouts.punch_deadline

    @property
    def low_ttl(self) -> int | None:
        """TTL of the first SYN to each punch candidate: our NAT is hop 1, so 2 leaves it."""
        return self.config.ports.low_ttl

    @property
    def port_mapping(self) -> tuple[str, int] | None:
        """The gateway's external endpoint for our app port, while a mapping is held."""
        mapping = self._mapper.mapping if self._mapper is not None else None
        return mapping.external if mapping is not None else None

    # -- life ---------------------------------------------------------------------

    def start(self) -> defer.Deferred[Registration]:
        """Connect and REGISTER once; fails clearly on a bad password or an untrusted server.

        Fires with the registration once the first punch port is probed too
        (readyport.py), so that the first ``connect`` does not wait for probes.
        """
        started: defer.Deferred[Registration] = defer.Deferred()
        self._life.start(started)
        return started

    def begin_start(self, started: defer.Deferred[Any]) -> None:
        """For the life machine: listen on the app port, connect, REGISTER, wait for the first punch port."""
        listen_port = self.config.ports.listen_port
        if listen_port is not None:
            try:
                self._app_port = IReactorTCP(self.reactor).listenTCP(
                    listen_port,
                    AppPortFactory(self._dialer_for_tag, self.reactor),  # type: ignore[arg-type]  # stub: ServerFactory
                )
            except Exception:
                failure = Failure()
                self._life.start_failed()
                started.errback(failure)
                return
            self._map_app_port()

        def failed(failure: Failure) -> Failure:
            self._life.start_failed()
            return failure

        d = self._start_in_order()
        d.addCallback(self._first_punch_port)
        d.addErrback(failed)
        d.chainDeferred(started)

    @defer.inlineCallbacks
    def _start_in_order(self) -> Generator[defer.Deferred[Any], Any, Registration]:
        """The first registration: each server once, in order, until one takes us (the last one's failure)."""
        count = len(self.config.server.addresses)
        for index in range(count):
            self._server_index = index
            try:
                registration: Registration = yield self._connect_and_register()
            except Exception:
                if index == count - 1 or self._stopped():
                    raise
                log.warn("{host}:{port} failed: {why}; trying the next server", host=self.server.host,
                         port=self.server.port, why=Failure().getErrorMessage())
                continue
            return registration
        raise AssertionError("unreachable: a config has at least one server")

    @property
    def server(self) -> ServerConfig:
        """The server the agent is registered with, or tries next."""
        return self.config.server.at(self._server_index)

    def abandon_start(self) -> None:
        self._stop_listening()

    def _first_punch_port(self, registration: Registration) -> defer.Deferred[Registration]:
        """The registration, once the first punch port is probed or START_PROBE_WAIT has passed.

        Probes take four round trips to the server; when the probe ports do
        not answer, they take their timeouts, and ``start`` does not wait for
        those (a ``connect`` meanwhile waits for the preparation under way).
        """
        waited = self.ready_port.when_ready()
        waited.addTimeout(START_PROBE_WAIT, self.reactor)
        waited.addErrback(lambda f: f.trap(defer.TimeoutError))
        return waited.addCallback(lambda _: registration)

    def stop(self) -> defer.Deferred[None]:
        """Unregister and close signaling; established peer connections stay."""
        stopped: defer.Deferred[None] = defer.Deferred()
        self._life.stop(stopped)
        return stopped

    def shut_down(self, stopped: defer.Deferred[None]) -> None:
        """For the life machine: abandon calls, cancel timers, unregister, close everything but peers."""
        self.ready_port.clear()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for call in list(self._calls.values()):
            call.stop("the agent is stopping")
        self._wake_up_waiters(Failure(ConnectFailed("the agent stopped")))
        stopping: list[defer.Deferred[Any]] = [defer.maybeDeferred(self._stop_listening)]
        sig, self.signaling = self.signaling, None
        self.registration = None
        if sig is not None and not sig.disconnected.called:
            stopping.append(self._hang_up(sig))
        done: defer.Deferred[Any] = defer.gatherResults(stopping, consumeErrors=True)
        done.addCallback(lambda _: None).chainDeferred(stopped)

    def _hang_up(self, sig: SignalingClientProtocol) -> defer.Deferred[None]:
        """Unregister, then close; each step bounded (``Timeouts.stop_*``), the close by an abort."""
        d = sig.unregister()
        d.addTimeout(self.config.timeouts.stop_unregister, self.reactor)
        d.addErrback(lambda f: log.info("unregistering failed: {why}", why=f.getErrorMessage()))
        return d.addBoth(lambda _: self._close(sig))

    def _close(self, sig: SignalingClientProtocol) -> defer.Deferred[None]:
        """Close, aborted after ``stop_close``: a silent server never sends its close_notify."""
        if sig.disconnected.called:
            return sig.disconnected
        sig.hang_up()
        wait = self.config.timeouts.stop_close

        def abort() -> None:
            if not sig.disconnected.called:
                log.info("the server did not close in {s:g} s: aborting the connection", s=wait)
                sig.abort()

        aborter = self.reactor.callLater(wait, abort)

        def closed(result: None) -> None:
            if aborter.active():
                aborter.cancel()
            return result

        return sig.disconnected.addBoth(closed)

    def _map_app_port(self) -> None:
        """Ask the gateway for a mapping of the app port, unless told not to (``--no-port-mapping``)."""
        if self.config.ports.port_mapping and self.app_port:
            self._mapper = mapper_for(self.reactor, self.app_port)
            if self._mapper is not None:  # a new mapping goes to the server at once (REGISTER)
                self._mapper.on_change = lambda m: self._refresh_timer() if m and self.registration else None
                self._mapper.start()

    def _stop_listening(self) -> defer.Deferred[None] | None:
        mapper, self._mapper = self._mapper, None
        released = mapper.release() if mapper is not None else None  # deletes it at the gateway
        port, self._app_port = self._app_port, None
        if released is not None:
            waits: list[defer.Deferred[Any]] = [released]
            if port is not None:
                waits.append(defer.maybeDeferred(port.stopListening))
            return defer.gatherResults(waits).addCallback(lambda _: None)
        if port is not None:
            return port.stopListening()
        return None

    @property
    def public_ip(self) -> str | None:
        """Our public address as the server saw it at REGISTER (None: not registered)."""
        return self.registration.public_ip if self.registration is not None else None

    @property
    def signaling_up(self) -> bool:
        return (
            self.signaling is not None
            and not self.signaling.disconnected.called
            and self.registration is not None
        )

    @property
    def app_port(self) -> int | None:
        """The port where peers can connect to us directly (the ``passive`` candidate)."""
        if self._app_port is None:
            return None
        address = self._app_port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        return address.port

    # -- signaling --------------------------------------------------------------------

    @defer.inlineCallbacks
    def _connect_and_register(self) -> Generator[defer.Deferred[Any], Any, Registration]:
        """One attempt: connect over TLS, REGISTER; the life machine hears how it went."""
        server = self.server
        account = self.config.account
        options = tls.client_options(server.ca_path, server.expected_name)
        sig = yield self.connect_signaling(
            self.reactor, server.host, server.port, options,
            lambda: SignalingClientProtocol(
                self.reactor, account.user_id, account.password, server.domain, self._on_request
            ),
            timeout=self.config.timeouts.connect_timeout, expected_name=server.expected_name,
        )
        if self._stopped():
            sig.hang_up()
            raise ConnectFailed("the agent stopped")
        try:
            registration: Registration = yield sig.register(self.config.timeouts.register_expires, self.port_mapping)
        except Exception:
            failure = Failure()
            yield self._close(sig)  # nothing of a failed attempt outlives it, bounded (it waited for ever)
            failure.raiseException()
        if self._stopped():
            sig.hang_up()
            raise ConnectFailed("the agent stopped")
        self._life.registered(sig, registration)
        return registration

    def _stopped(self) -> bool:
        """Stopped while connecting: the attempt hangs up (only stopped refuses once started)."""
        return self._life_core.refusal is not None

    def adopt(self, sig: SignalingClientProtocol, registration: Registration) -> None:
        """For the life machine: ``sig`` is registered; keep it alive and let waiting calls go."""
        self.signaling = sig
        self._registered(registration)
        self._attempt = 0
        sig.disconnected.addCallback(lambda _: self._signaling_lost(sig))
        self._later("keepalive", self.config.timeouts.keepalive_interval, self._keepalive)
        if not self._calls:
            self.ready_port.refill(0)
        self._probe_over_ipv6(sig, registration)
        server = self.server
        log.info(
            "registered as {user} at {host}:{port}, public address {ip}:{pport}",
            user=self.user_id, host=server.host, port=server.port,
            ip=registration.public_ip, pport=registration.public_port,
        )
        self._wake_up_waiters(None)

    def _probe_over_ipv6(self, sig: SignalingClientProtocol, registration: Registration) -> None:
        offer = registration.probe
        if offer is None or not any(":" in ip for ip in offer.ips) or ":" in sig.local_ip:
            return  # no IPv6 probe address, or we signal over IPv6 already
        probe_other_family(self.reactor, registration, self.find_ipv6(), self.config.timeouts.probe_timeout)

    def hang_up_stray(self, sig: SignalingClientProtocol) -> None:
        sig.hang_up()

    def _registered(self, registration: Registration) -> None:
        self.registration = registration
        self._registered_at = self.reactor.seconds()
        refresh = max(registration.expires * 0.8, min(registration.expires, 30))
        self._later("refresh", refresh, self._refresh_timer)

    def _refresh(self) -> defer.Deferred[Registration]:
        """Re-REGISTER on the same connection (expiry coming, or a fresh probe token)."""
        sig = self.signaling
        if sig is None or sig.disconnected.called:
            return defer.fail(ConnectFailed("not connected to the server"))
        waiter: defer.Deferred[Registration] = defer.Deferred()
        self._refresh_waiters.append(waiter)
        if len(self._refresh_waiters) > 1:
            return waiter  # one REGISTER in flight serves everyone

        def done(result: Registration | Failure) -> None:
            waiters, self._refresh_waiters = self._refresh_waiters, []
            if isinstance(result, Failure):
                log.warn("re-REGISTER failed ({why}); reconnecting", why=result.getErrorMessage())
                if not sig.disconnected.called:
                    sig.hang_up()
                for d in waiters:
                    d.errback(result)
                return
            self._registered(result)
            for d in waiters:
                d.callback(result)

        sig.register(self.config.timeouts.register_expires, self.port_mapping).addBoth(done)
        return waiter

    def _refresh_timer(self) -> None:
        self._refresh().addErrback(lambda _: None)  # failures are logged; reconnecting handles them

    def _keepalive(self) -> None:
        """Our own ping: a silent dead connection is noticed within the timeout."""
        sig = self.signaling
        if sig is None or sig.disconnected.called:
            return
        d = sig.ping()
        d.addTimeout(self.config.timeouts.keepalive_timeout, self.reactor)

        def dead(failure: Failure) -> None:
            if not sig.disconnected.called:
                log.warn("no keepalive answer from the server; reconnecting")
                sig.abort()

        d.addCallbacks(lambda _: None, dead)
        self._later("keepalive", self.config.timeouts.keepalive_interval, self._keepalive)

    def _signaling_lost(self, sig: SignalingClientProtocol) -> None:
        if sig is not self.signaling:
            return
        self.registration = None
        self.ready_port.clear()  # probed for a connection (maybe a public address) now gone
        for name in ("refresh", "keepalive"):
            timer = self._timers.pop(name, None)
            if timer is not None and timer.active():
                timer.cancel()
        for call in list(self._calls.values()):
            call.signaling_lost()  # a call already dialing goes on without it
        self._life.lost()

    def log_lost(self) -> None:
        log.warn("signaling connection lost; reconnecting")

    def backoff_delay(self, attempt: int) -> float:
        """Exponential with full jitter around it: 0.5x..1.5x of min(max, initial * 2**attempt)."""
        return self.config.reconnect.delay(attempt, self._jitter())

    def reconnect_later(self) -> None:
        # One round through every server is one step of the back-off.
        delay = self.backoff_delay(self._attempt // len(self.config.server.addresses))
        self._attempt += 1
        log.info("reconnecting in {delay:.1f} s", delay=delay)
        self._later("reconnect", delay, self._life.retry_due)

    def reconnect_now(self) -> None:
        self._connect_and_register().addErrback(self._life.retry_failed)

    def log_retry_failure(self, failure: Failure) -> None:
        level = log.error if failure.check(RegistrationFailed) else log.warn
        level("reconnecting to {host}:{port} failed: {why}", host=self.server.host, port=self.server.port,
              why=failure.getErrorMessage())
        self._server_index = (self._server_index + 1) % len(self.config.server.addresses)  # the next, in order

    def refill_ready_port(self) -> None:
        if self.signaling_up:
            self.ready_port.refill()  # only now: probes during a punch would move a sequential NAT on

    def _wake_up_waiters(self, result: Failure | None) -> None:
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            if result is not None:
                d.errback(result)
            else:
                d.callback(None)

    def fresh_registration(self) -> defer.Deferred[tuple[SignalingClientProtocol, Registration]]:
        """(signaling, registration) with a probe token that is still good."""
        refusal = self._life_core.refusal
        if refusal is not None:
            return defer.fail(ConnectFailed(refusal))
        if not self.signaling_up:
            d: defer.Deferred[None] = defer.Deferred()
            self._up_waiters.append(d)
            return d.addCallback(lambda _: self.fresh_registration())
        registration, sig = self.registration, self.signaling
        assert registration is not None and sig is not None
        probe = registration.probe
        left = self._registered_at + (probe.expires if probe else 0) - self.reactor.seconds()
        if probe is not None and probe.expires and left < TOKEN_MARGIN:
            log.debug("probe token expires in {left:.0f} s: registering again", left=left)
            return self._refresh().addCallback(lambda reg: (sig, reg))
        return defer.succeed((sig, registration))

    def probe_punch_port(
        self, sig: SignalingClientProtocol, registration: Registration | None, local: tuple[str, int],
        limit: int | None = None,
    ) -> defer.Deferred[list[ProbeResult]]:
        """Probe ``local`` (a bound reusable port) from at most ``limit`` endpoints (agentprobes.py)."""
        return probe_punch_port(self.reactor, sig, registration, local, self.config.timeouts.probe_timeout, limit)

    @defer.inlineCallbacks
    def _prepare_punch_port(self) -> Generator[defer.Deferred[Any], Any, PreparedPort | None]:
        """For ReadyPort: a fresh reusable port, probed now, for the next call."""
        if self.ready_port.max_age <= 0 or not self.signaling_up:
            return None
        sig, registration = yield self.fresh_registration()
        prepared: PreparedPort | None = yield prepared_punch_port(
            self.reactor, sig, registration, self.config.timeouts.probe_timeout)
        return prepared

    def _later(self, name: str, delay: float, f: Callable[[], object]) -> None:
        old = self._timers.pop(name, None)
        if old is not None and old.active():
            old.cancel()
        self._timers[name] = self.reactor.callLater(delay, f)

    # -- requests from the server -------------------------------------------------------

    def _on_request(self, sig: SignalingClientProtocol, request: Request) -> None:
        method = request.method
        call = self._calls.get(request.call_id or "")
        if method == "INVITE":
            if call is not None:
                return  # a retransmission; the call is already being handled
            IncomingCall(self, sig, request).handle()
        elif method == "ACK":
            if isinstance(call, IncomingCall):
                call.ack(request)
        elif method in ("CANCEL", "BYE"):
            sig.respond(request, 200 if call is not None else 481)
            if isinstance(call, IncomingCall) and method == "CANCEL":
                call.cancelled(request)
            elif call is not None:
                call.peer_ended(request)
        elif method in ("INFO", "OPTIONS"):
            sig.respond(request, 200)
        else:
            sig.respond(request, 405, headers=[("Allow", "INVITE, ACK, CANCEL, BYE, INFO, OPTIONS")])

    # -- calls (used by calls.py) ---------------------------------------------------

    def connect(
        self, peer_id: str, protocol_factory: IProtocolFactory, *, timeout: float = 20.0, prefer_stunt: bool = False
    ) -> defer.Deferred[PeerConnection]:
        """A verified connection to ``peer_id``; fails with ConnectFailed(reason).

        Every technique starts at the dial moment anyway; ``prefer_stunt`` (the
        peer's flag says ``stunt``) only skips its public endpoint, known closed.
        """
        if peer_id == self.user_id:
            return defer.fail(ConnectFailed("cannot connect to ourselves"))
        return OutgoingCall(self, peer_id, protocol_factory, timeout, prefer_stunt).run()

    def call_started(self, call: CallBase) -> None:
        self._calls[call.call_id] = call

    def call_ended(self, call: CallBase) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        if not self._calls:
            self._life.calls_over()

    def dialer_started(self, dialer: Dialer) -> None:
        self._dialers[dialer.tag] = dialer
        if self.on_progress is not None:
            self.on_progress("punching (simultaneous open)")

    def dialer_ended(self, dialer: Dialer) -> None:
        if self._dialers.get(dialer.tag) is dialer:
            del self._dialers[dialer.tag]

    def _dialer_for_tag(self, tag: bytes) -> Dialer | None:
        dialer = self._dialers.get(tag)
        return dialer if dialer is not None and not dialer.finished else None

    def peer_accepted(self, connection: PeerConnection) -> None:
        log.info(
            "peer {peer} connected via {technique} from {remote}",
            peer=connection.peer_id, technique=connection.technique, remote=connection.remote,
        )
        if self.on_peer is not None:
            try:
                self.on_peer(connection)
            except Exception:
                log.failure("on_peer failed for {peer}", peer=connection.peer_id)


__all__ += ["SignalingError"]
