"""
A peer: its signaling connection, and the peer-to-peer connections it makes and accepts.

``PeerAgent`` keeps one TLS signaling connection to the STUNT server alive
(REGISTER with digest, answering keepalives and sending its own, re-REGISTER
before expiry, reconnect with jittered exponential backoff), listens on an
application port for direct connections from peers, and runs the call flows
of ``calling.py``: ``connect(peer_id, factory)`` for an outgoing connection,
``accept_factory``/``on_peer`` for incoming ones.  See docs/client.rst.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt import tls
from kerjostunt.client.calls import (
    AppPortFactory,
    ConnectFailed,
    Dialer,
    IncomingCall,
    OutgoingCall,
    PeerConnection,
)
from kerjostunt.client.nat.probing import probe_from
from kerjostunt.client.nat.readyport import PreparedPort, ReadyPort
from kerjostunt.client.nat.sockets import reusable_socket
from kerjostunt.client.signaling import (
    ProbeOffer,
    Registration,
    RegistrationFailed,
    SignalingClientProtocol,
    SignalingError,
    connect_signaling,
)

__all__ = ["PeerAgent", "PeerConnection", "ConnectFailed", "DEFAULT_PORT"]

log = Logger()

DEFAULT_PORT = 5061
TOKEN_MARGIN = 10.0  # re-REGISTER when the probe token has less left than this
START_PROBE_WAIT = 2.0  # start() waits at most this long for the first punch port


class PeerAgent:
    """A peer: keeps the signaling connection (connect, REGISTER with digest,
    answer keepalives, re-register before expiry, reconnect with jittered
    exponential backoff), and makes/accepts peer-to-peer connections."""

    def __init__(
        self,
        reactor: Any,
        *,
        server: tuple[str, int],
        user_id: str,
        password: str,
        domain: str,
        ca_path: str,
        tls_hostname: str | None = None,
        accept_factory: IProtocolFactory | None = None,
        on_peer: Callable[[PeerConnection], None] | None = None,
        listen_port: int | None = 0,
        punch_deadline: float = 10.0,
        low_ttl: int | None = 2,
        register_expires: int = 3600,
        keepalive_interval: float = 60.0,
        keepalive_timeout: float = 30.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        probe_timeout: float = 5.0,
        punch_port_max_age: float = 30.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.user_id = user_id
        self._password = password
        self.domain = domain
        self.ca_path = ca_path
        self.tls_hostname = tls_hostname or server[0]
        self.accept_factory = accept_factory
        self.on_peer = on_peer
        self.listen_port = listen_port
        self.punch_deadline = punch_deadline
        #: TTL of the first SYN to each punch candidate: our NAT is hop 1, so 2 leaves it.
        self.low_ttl = low_ttl
        self.register_expires = register_expires
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.probe_timeout = probe_timeout
        self._jitter = jitter
        #: how to open the signaling connection (tests replace it)
        self.connect_signaling = connect_signaling

        self.state = "idle"  # idle -> starting -> up <-> reconnecting -> stopped
        self.signaling: SignalingClientProtocol | None = None
        self.registration: Registration | None = None
        self._registered_at = 0.0
        self._refresh_waiters: list[defer.Deferred] = []
        self._up_waiters: list[defer.Deferred] = []
        self._attempt = 0
        self._timers: dict[str, Any] = {}
        self._app_port: IListeningPort | None = None
        self._calls: dict[str, Any] = {}
        self._dialers: dict[bytes, Dialer] = {}
        #: the next call's punch port, probed while idle (readyport.py); max age 0 turns it off
        self.ready_port = ReadyPort(reactor, self._prepare_punch_port, max_age=punch_port_max_age)

    # -- life ---------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Connect and REGISTER once; fails clearly on a bad password or an untrusted server.

        Fires with the registration once the first punch port is probed too
        (readyport.py), so that the first ``connect`` does not wait for probes.
        """
        if self.state != "idle":
            return defer.fail(RuntimeError(f"agent already {self.state}"))
        self.state = "starting"
        if self.listen_port is not None:
            try:
                self._app_port = self.reactor.listenTCP(
                    self.listen_port, AppPortFactory(self._dialer_for_tag, self.reactor)
                )
            except Exception as e:
                self.state = "idle"
                return defer.fail(e)

        def failed(failure: Failure) -> Failure:
            self.state = "idle"
            self._stop_listening()
            return failure

        d = self._connect_and_register()
        d.addCallback(self._first_punch_port)
        return d.addErrback(failed)

    def _first_punch_port(self, registration: Registration) -> defer.Deferred:
        """The registration, once the first punch port is probed or START_PROBE_WAIT has passed.

        Probes take four round trips to the server; when the probe ports do
        not answer, they take their timeouts, and ``start`` does not wait for
        those (a ``connect`` meanwhile waits for the preparation under way).
        """
        waited = self.ready_port.when_ready()
        waited.addTimeout(START_PROBE_WAIT, self.reactor)
        waited.addErrback(lambda f: f.trap(defer.TimeoutError))
        return waited.addCallback(lambda _: registration)

    def stop(self) -> defer.Deferred:
        """Unregister and close signaling; established peer connections stay."""
        self.state = "stopped"
        self.ready_port.clear()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for call in list(self._calls.values()):
            call.stop("the agent is stopping")
        self._wake_up_waiters(Failure(ConnectFailed("the agent stopped")))
        stopping = [defer.maybeDeferred(self._stop_listening)]
        sig, self.signaling = self.signaling, None
        self.registration = None
        if sig is not None and not sig.disconnected.called:
            stopping.append(self._hang_up(sig))
        return defer.gatherResults(stopping, consumeErrors=True).addCallback(lambda _: None)

    def _hang_up(self, sig: SignalingClientProtocol) -> defer.Deferred:
        def close(_: Any) -> defer.Deferred:
            if not sig.disconnected.called:
                sig.transport.loseConnection()
            return sig.disconnected

        d = sig.unregister()
        d.addTimeout(5.0, self.reactor)
        d.addErrback(lambda f: log.info("unregistering failed: {why}", why=f.getErrorMessage()))
        return d.addBoth(close)

    def _stop_listening(self) -> Any:
        port, self._app_port = self._app_port, None
        if port is not None:
            return port.stopListening()
        return None

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
        return self._app_port.getHost().port if self._app_port is not None else None

    # -- signaling --------------------------------------------------------------------

    @defer.inlineCallbacks
    def _connect_and_register(self):  # type: ignore[no-untyped-def]
        host, port = self.server
        options = tls.client_options(self.ca_path, self.tls_hostname)
        sig = yield self.connect_signaling(
            self.reactor, host, port, options,
            lambda: SignalingClientProtocol(self.reactor, self.user_id, self._password, self.domain, self._on_request),
        )
        if self.state == "stopped":
            sig.transport.loseConnection()
            raise ConnectFailed("the agent stopped")
        try:
            registration = yield sig.register(self.register_expires)
        except Exception:
            failure = Failure()
            if not sig.disconnected.called:
                sig.transport.loseConnection()
                yield sig.disconnected  # nothing of a failed attempt outlives it
            failure.raiseException()
        if self.state == "stopped":
            sig.transport.loseConnection()
            raise ConnectFailed("the agent stopped")
        self.signaling = sig
        self._registered(registration)
        self._attempt = 0
        self.state = "up"
        sig.disconnected.addCallback(lambda _: self._signaling_lost(sig))
        self._later("keepalive", self.keepalive_interval, self._keepalive)
        if not self._calls:
            self.ready_port.refill(0)
        log.info(
            "registered as {user} at {host}:{port}, public address {ip}:{pport}",
            user=self.user_id, host=host, port=port, ip=registration.public_ip, pport=registration.public_port,
        )
        self._wake_up_waiters(None)
        return registration

    def _registered(self, registration: Registration) -> None:
        self.registration = registration
        self._registered_at = self.reactor.seconds()
        refresh = max(registration.expires * 0.8, min(registration.expires, 30))
        self._later("refresh", refresh, self._refresh_timer)

    def _refresh(self) -> defer.Deferred:
        """Re-REGISTER on the same connection (expiry coming, or a fresh probe token)."""
        sig = self.signaling
        if sig is None or sig.disconnected.called:
            return defer.fail(ConnectFailed("not connected to the server"))
        waiter: defer.Deferred = defer.Deferred()
        self._refresh_waiters.append(waiter)
        if len(self._refresh_waiters) > 1:
            return waiter  # one REGISTER in flight serves everyone

        def done(result: Any) -> None:
            waiters, self._refresh_waiters = self._refresh_waiters, []
            if isinstance(result, Failure):
                log.warn("re-REGISTER failed ({why}); reconnecting", why=result.getErrorMessage())
                if not sig.disconnected.called:
                    sig.transport.loseConnection()
            else:
                self._registered(result)
            for d in waiters:
                d.errback(result) if isinstance(result, Failure) else d.callback(result)

        sig.register(self.register_expires).addBoth(done)
        return waiter

    def _refresh_timer(self) -> None:
        self._refresh().addErrback(lambda _: None)  # failures are logged; reconnecting handles them

    def _keepalive(self) -> None:
        """Our own ping: a silent dead connection is noticed within the timeout."""
        sig = self.signaling
        if sig is None or sig.disconnected.called:
            return
        d = sig.ping()
        d.addTimeout(self.keepalive_timeout, self.reactor)

        def dead(failure: Failure) -> None:
            if not sig.disconnected.called:
                log.warn("no keepalive answer from the server; reconnecting")
                sig.transport.abortConnection()

        d.addCallbacks(lambda _: None, dead)
        self._later("keepalive", self.keepalive_interval, self._keepalive)

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
            if isinstance(call, OutgoingCall) and call.state in ("preparing", "inviting") or isinstance(call, IncomingCall) and call.state in ("preparing", "answered"):
                call.stop("lost the signaling connection")
        if self.state == "up":
            log.warn("signaling connection lost; reconnecting")
            self.state = "reconnecting"
            self._schedule_reconnect()

    def backoff_delay(self, attempt: int) -> float:
        """Exponential with full jitter around it: 0.5x..1.5x of min(max, initial * 2**attempt)."""
        base = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return base * (0.5 + self._jitter())

    def _schedule_reconnect(self) -> None:
        delay = self.backoff_delay(self._attempt)
        self._attempt += 1
        log.info("reconnecting in {delay:.1f} s", delay=delay)
        self._later("reconnect", delay, self._reconnect)

    def _reconnect(self) -> None:
        if self.state != "reconnecting":
            return

        def failed(failure: Failure) -> None:
            if self.state != "reconnecting":
                return
            level = log.error if failure.check(RegistrationFailed) else log.warn
            level("reconnecting failed: {why}", why=failure.getErrorMessage())
            self._schedule_reconnect()

        self._connect_and_register().addErrback(failed)

    def _wake_up_waiters(self, result: Any) -> None:
        waiters, self._up_waiters = self._up_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def fresh_registration(self) -> defer.Deferred:
        """(signaling, registration) with a probe token that is still good."""
        if self.state in ("idle", "stopped"):
            return defer.fail(ConnectFailed(f"the agent is {self.state}, not registered"))
        if not self.signaling_up:
            d: defer.Deferred = defer.Deferred()
            self._up_waiters.append(d)
            return d.addCallback(lambda _: self.fresh_registration())
        registration = self.registration
        assert registration is not None and self.signaling is not None
        probe = registration.probe
        left = self._registered_at + (probe.expires if probe else 0) - self.reactor.seconds()
        if probe is not None and probe.expires and left < TOKEN_MARGIN:
            log.debug("probe token expires in {left:.0f} s: registering again", left=left)
            return self._refresh().addCallback(lambda reg: (self.signaling, reg))
        return defer.succeed((self.signaling, registration))

    def probe_punch_port(
        self, sig: SignalingClientProtocol, registration: Registration | None, local: tuple[str, int]
    ) -> defer.Deferred:
        """Probe ``local`` (a bound reusable port); fires with the results, [] when nothing to probe with."""
        offer = registration.probe if registration is not None else None
        if offer is None or not offer.ports:
            log.warn("the server offered no probe ports")
            return defer.succeed([])
        return probe_from(
            self.reactor, local, self.probe_servers(sig, offer),
            username=offer.token, password=offer.password, timeout=self.probe_timeout,
        )

    @defer.inlineCallbacks
    def _prepare_punch_port(self):  # type: ignore[no-untyped-def]
        """For ReadyPort: a fresh reusable port, probed now, for the next call."""
        if self.ready_port.max_age <= 0 or not self.signaling_up:
            return None
        sig, registration = yield self.fresh_registration()
        local_ip = sig.transport.getHost().host
        holder = reusable_socket((local_ip, 0))
        port = holder.getsockname()[1]
        try:
            results = yield self.probe_punch_port(sig, registration, (local_ip, port))
        except BaseException:
            holder.close()
            raise
        if not results:
            holder.close()
            return None
        return PreparedPort(holder, local_ip, port, results, self.reactor.seconds(), registration.public_ip)

    def probe_servers(self, sig: SignalingClientProtocol, offer: ProbeOffer) -> list[tuple[str, int]]:
        """The probe ports at the address we reach the server on, then the alternate IP."""
        server_ip = sig.transport.getPeer().host
        servers = [(server_ip, port) for port in offer.ports]
        if offer.alt_ip and offer.ports:
            servers.append((offer.alt_ip, offer.ports[0]))
        return servers

    def _later(self, name: str, delay: float, f: Callable[..., Any], *args: Any) -> None:
        old = self._timers.pop(name, None)
        if old is not None and old.active():
            old.cancel()
        self._timers[name] = self.reactor.callLater(delay, f, *args)

    # -- requests from the server -------------------------------------------------------

    def _on_request(self, sig: SignalingClientProtocol, request: Any) -> None:
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

    # -- calls (used by calling.py) ---------------------------------------------------

    def connect(
        self, peer_id: str, protocol_factory: IProtocolFactory, *, timeout: float = 20.0, prefer_stunt: bool = False
    ) -> defer.Deferred:
        """A verified connection to ``peer_id``; fails with ConnectFailed(reason).

        Every technique starts at the dial moment anyway; ``prefer_stunt`` (the
        peer's flag says ``stunt``) only skips its public endpoint, known closed.
        """
        if peer_id == self.user_id:
            return defer.fail(ConnectFailed("cannot connect to ourselves"))
        return OutgoingCall(self, peer_id, protocol_factory, timeout, prefer_stunt).run()

    def call_started(self, call: Any) -> None:
        self._calls[call.call_id] = call

    def call_ended(self, call: Any) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        if not self._calls and self.state == "up" and self.signaling_up:
            self.ready_port.refill()  # only now: probes during a punch would move a sequential NAT on

    def dialer_started(self, dialer: Dialer) -> None:
        self._dialers[dialer.tag] = dialer

    def dialer_ended(self, dialer: Dialer) -> None:
        if self._dialers.get(dialer.tag) is dialer:
            del self._dialers[dialer.tag]

    def _dialer_for_tag(self, tag: bytes) -> Dialer | None:
        dialer = self._dialers.get(tag)
        return dialer if dialer is not None and dialer.state != "done" else None

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
