"""The signaling stream: one TLS connection per peer carrying SIP messages.

This module frames bytes into messages, keeps each connection's life
(handshake, unregistered, registered, closed) as an explicit state machine
with its timers, answers keepalives, knows each peer's RTT (``rtt.py``), and enforces the
per-IP and per-connection limits (the machinery and defaults: ``limits.py``).
What a request *means* is the router's business.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import TypeVar

from automat import TypeMachineBuilder
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import ContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.machines import indexed
from kerjostunt.server.limits import (
    ConnectionLimits,
    GuardedTransport,
    HeapTrimmer,
    LazyTLSProtocol,
    OldestFirst,
    OutputGuard,
    PendingHandshakes,
    RefusalLog,
    TokenBucket,
)
from kerjostunt.server.rtt import (
    TCPI_MIN_RTT_OFFSET,
    TCPI_RTT_OFFSET,
    has_kernel_rtt,
    kernel_rtt,
    rtt_from_tcp_info,
    tcp_socket_of,
)
from kerjostunt.tcp import host_port, no_delay, send_at_once
from kerjostunt.wire.sip.message import Request, Response, make_response, stamp_source
from kerjostunt.wire.sip.parser import KeepAlivePing, KeepAlivePong, SIPParseError, StreamParser

__all__ = [
    "TCPI_MIN_RTT_OFFSET", "TCPI_RTT_OFFSET", "AdmittingTLSFactory", "ConnectionLimits", "SignalingFactory",
    "SignalingProtocol", "TokenBucket", "kernel_rtt", "rtt_from_tcp_info", "tcp_socket_of",
]
log = Logger()
_Message = TypeVar("_Message", Request, Response)

CRLF = b"\r\n"
RTT_SAMPLES = 3            # round trips kept; the smallest is the estimate
QUICK_PING_INTERVAL = 0.5  # between the first pings after registering
PING_BYTES = b"\r\n\r\n"

class Router(TypingProtocol):
    """The part of the server that gives requests and responses meaning."""

    def handle_request(self, connection: SignalingProtocol, request: Request) -> None: ...

    def handle_response(self, connection: SignalingProtocol, response: Response) -> None: ...

    def connection_lost(self, connection: SignalingProtocol) -> None: ...


@implementer(IHandshakeListener)
class SignalingProtocol(Protocol):
    """One peer's signaling connection."""

    # TLSMemoryBIOProtocol in service (an ITLSTransport), TCP in tests.
    transport: ITCPTransport | None

    def __init__(self, factory: SignalingFactory, address: IAddress | None) -> None:
        self.factory = factory
        self._clock = factory.clock
        self.limits = factory.limits
        self.peer: tuple[str, int] = host_port(address)
        self.user_ids: set[str] = set()
        self._parser = StreamParser(self.limits.sip)
        self._bucket = TokenBucket(self._clock, self.limits.requests_per_second, self.limits.request_burst)
        self._pings = TokenBucket(self._clock, self.limits.pings_per_second, self.limits.ping_burst)
        self._guard: OutputGuard | None = None  # once connected: bounds what waits to be sent
        # One timer for the state (handshake, register, or, once registered,
        # both the idle limit and the keepalive pings), one for slow input.
        self._timer: IDelayedCall | None = None
        self._partial_timer: IDelayedCall | None = None
        self._ping_sent_at: float | None = None
        self._next_ping = 0.0
        self._rtt_samples: tuple[float, ...] = ()
        self._quick_pings = 0  # left to send; only where the kernel gives no RTT
        # Activity only stamps the time; the registered timer, when it fires,
        # looks at it (no cancel + callLater per message).
        self._last_activity = 0.0
        self.closed = False
        #: close() asked for: the TLS close waits for the peer's close_notify,
        #: and what the peer sends meanwhile is read but never handled
        self._closing = False
        self._life = _ConnectionLifeMachine(self)

    # -- inputs of the connection's life (the machine is at the end of this module)

    def tls_ready(self) -> None:
        """The TLS handshake completed."""
        self._life.tls_ready()

    def user_bound(self) -> None:
        """The registrar bound a user to this connection."""
        self._life.user_bound()

    def last_user_unbound(self) -> None:
        """No user is bound here any more."""
        self._life.last_user_unbound()

    def timed_out(self) -> None:
        """The current state's timer ran out."""
        self._life.timed_out()

    def lost(self) -> None:
        """The transport is gone."""
        self._life.lost()

    # -- what the life's transitions do

    def await_registration(self) -> None:
        """Unregistered: the peer has ``register_timeout`` to REGISTER."""
        self.factory.unregistered.add(self, self.peer[0])
        self._arm(self.limits.register_timeout, "never registered")

    def await_activity(self) -> None:
        """Registered: one timer for the idle limit and the keepalive pings."""
        self.factory.unregistered.discard(self)
        now = self._clock.seconds()
        self._last_activity = now
        if not has_kernel_rtt(self.transport):
            # No kernel RTT (not Linux, not TCP): measure it with a few quick
            # pings right away, so the first call already has samples.
            self._quick_pings = RTT_SAMPLES
            self._next_ping = now
        else:
            self._next_ping = now + self.limits.rtt_interval
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(0.0, self._registered_tick)

    def drop(self) -> None:
        """Timed out: abort the transport (``lost`` follows)."""
        self._cancel_timers()
        if self.transport is not None:
            self.transport.abortConnection()

    def evict(self) -> None:
        """Make room in a full table: its slot is free at once, the abort follows."""
        log.info("Closing {peer}: oldest unregistered connection of a full table", peer=self.peer)
        self.factory.count("evicted")
        self.factory.connection_closed(self)
        self.timed_out()

    def forget(self) -> None:
        """Gone: no more timers, and the factory stops counting it."""
        self.closed = True
        self._cancel_timers()
        if self._guard is not None:
            self._guard.stop()
        self.factory.connection_closed(self)


    # -- the connection's life ------------------------------------------------

    # -- Twisted callbacks ------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connection_opened(self)
        no_delay(self.transport)
        send_at_once(self.transport)  # plain TCP signaling (tests, a TLS front); TLS does it below itself
        self._guard_output()
        self._arm(self.limits.handshake_timeout, "TLS handshake")
        if not self.factory.tls:
            self.tls_ready()

    def handshakeCompleted(self) -> None:
        self.tls_ready()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        was_open = not self.closed
        self.lost()
        if was_open:
            self.factory.router.connection_lost(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self._closing:
            # After a fatal error the parser raises again on every read: a
            # peer that kept sending got one log line per TLS record, for
            # the 10 s the close may take.
            return
        # feed_events never raises: errors come in stream order, a fatal one last.
        for event in self._parser.feed_events(data):
            if self._closed_by_handler():
                return
            if isinstance(event, SIPParseError):
                self._reject(event)
            else:
                self._dispatch(event)
        self._track_partial()

    def _closed_by_handler(self) -> bool:
        """Did handling an earlier message of this read close the connection?"""
        return self.closed

    # -- what arrived -----------------------------------------------------------

    def _dispatch(self, event: Request | Response | KeepAlivePing | KeepAlivePong) -> None:
        if isinstance(event, KeepAlivePing):
            self._activity()
            if self._pings.take():
                self._write(CRLF)
            else:  # RFC 5626 peers ping every ~30 s; a flood gets no answers
                self.factory.count("pings_dropped")
        elif isinstance(event, KeepAlivePong):
            self._activity()
            self._pong_received()
        elif isinstance(event, Request):
            self._activity()
            if not self._bucket.take():
                self.factory.count("rate_limited")
                resp = make_response(event, 503)
                resp.headers.add("Retry-After", "1")
                if event.method != "ACK":
                    self.send(resp)
                return
            self._safely(self.factory.router.handle_request, event)
        else:
            self._activity()
            self._safely(self.factory.router.handle_response, event)

    def _safely(self, handler: Callable[[SignalingProtocol, _Message], None], message: _Message) -> None:
        """A bug in one handler answers 500 to that request, never kills the reactor loop."""
        try:
            handler(self, message)
        except Exception:
            log.failure("Handler failed for {what} from {peer}", what=_describe(message), peer=self.peer)
            self.factory.count("internal_errors")
            if isinstance(message, Request) and message.method != "ACK":
                self.send(make_response(message, 500))

    def _reject(self, exc: SIPParseError) -> None:
        self.factory.count("parse_errors")
        log.info("Bad input from {peer}: {code} {reason}", peer=self.peer, code=exc.code, reason=exc.reason)
        if isinstance(exc.message, Request) and exc.message.method != "ACK":
            try:
                self.send(make_response(exc.message, exc.code, exc.reason))
            except Exception:
                log.failure("Could not answer bad input from {peer}", peer=self.peer)
        if exc.fatal:
            self.close()

    # -- sending ----------------------------------------------------------------

    def send(self, message: Request | Response) -> None:
        if not self.closed:
            if isinstance(message, Response):
                stamp_source(message, *self.peer)
            self._write(message.to_bytes())

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            if self._guard is not None:
                self._guard.wrote()

    def _guard_output(self) -> None:
        """Bound the output buffer: stop reading from a peer that does not read (limits.py)."""
        if self.transport is None:
            return
        transport: GuardedTransport = self.transport  # type: ignore[assignment]  # TLS or TCP: both pause
        self._guard = OutputGuard(
            self._clock, transport, self.limits.max_output_buffer, self.limits.write_stall_timeout,
            self._output_aborted,
        )
        self._guard.attach()

    def _output_aborted(self, why: str) -> None:
        log.info("Closing {peer}: {why}", peer=self.peer, why=why)
        self.factory.count("output_overflows")

    def close(self) -> None:
        """Close after flushing what was written (an error response, say)."""
        if self.transport is not None and not self.closed and not self._closing:
            self._closing = True
            if self._guard is not None:
                self._guard.detach()
            self.transport.loseConnection()
            # A peer that never reads must not hold the socket open for ever.
            self._arm(self.limits.handshake_timeout, "closing")

    # -- registration hooks (called by the registrar) ---------------------------

    def bound(self, user_id: str) -> None:
        self.user_ids.add(user_id)
        self.user_bound()

    def unbound(self, user_id: str) -> None:
        self.user_ids.discard(user_id)
        if not self.user_ids:
            self.last_user_unbound()

    # -- RTT --------------------------------------------------------------------

    @property
    def rtt(self) -> float | None:
        """Seconds: the kernel's minimum RTT of this TCP connection, else the
        smallest of the last few keepalive round trips; None until measured.

        Calls time both peers' SYNs from it, so the path's base delay matters,
        not a queueing spike; one ping sample alone can be off by tens of ms.
        The kernel's figure (Linux TCP_INFO) is known from the TCP and TLS
        handshakes, excludes both ends' application queueing, and costs no
        pings: about six TLS records per registration less (docs/decisions.rst).
        """
        measured = kernel_rtt(self.transport)
        if measured is not None:
            return measured
        return min(self._rtt_samples) if self._rtt_samples else None

    def note_rtt_sample(self, sample: float) -> None:
        self._rtt_samples = (*self._rtt_samples[-(RTT_SAMPLES - 1):], sample)

    def _registered_tick(self) -> None:
        """The registered state's one timer: idle limit and keepalive pings."""
        self._timer = None
        if self.closed or not self.user_ids:
            return
        now = self._clock.seconds()
        idle_at = self._last_activity + self.limits.idle_timeout
        if now >= idle_at:
            self._time_out("idle")
            return
        if now >= self._next_ping:
            self._ping_sent_at = now
            self._write(PING_BYTES)
            # Liveness (and RTT samples where the kernel has none): one ping
            # per rtt_interval, after the quick ones if any are due.
            self._quick_pings = max(0, self._quick_pings - 1)
            quick = self._quick_pings > 0
            self._next_ping = now + (QUICK_PING_INTERVAL if quick else self.limits.rtt_interval)
        self._timer = self._clock.callLater(min(idle_at, self._next_ping) - now, self._registered_tick)

    def _pong_received(self) -> None:
        if self._ping_sent_at is not None:
            self.note_rtt_sample(self._clock.seconds() - self._ping_sent_at)
            self._ping_sent_at = None

    # -- timers -----------------------------------------------------------------

    def _arm(self, delay: float, why: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._expire, why)

    def _expire(self, why: str) -> None:
        self._timer = None
        self._time_out(why)

    def _time_out(self, why: str) -> None:
        log.info("Closing {peer}: {why} timeout", peer=self.peer, why=why)
        self.factory.count("timeouts")
        self.timed_out()

    def _activity(self) -> None:
        self._last_activity = self._clock.seconds()

    def _track_partial(self) -> None:
        """Slow input: a message started must finish within the limit."""
        if self._parser.buffered and self._partial_timer is None:
            self._partial_timer = self._clock.callLater(
                self.limits.partial_message_timeout, self._expire_partial
            )
        elif not self._parser.buffered and self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None

    def _expire_partial(self) -> None:
        # Not through _expire: that forgets self._timer, which is still armed
        # (register/idle) and must be cancelled when the connection is dropped.
        self._partial_timer = None
        self._time_out("incomplete message")

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._partial_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._partial_timer = None


def _describe(message: Request | Response) -> str:
    if isinstance(message, Request):
        return message.method
    return str(message.code)


class SignalingFactory(Factory):
    """Builds signaling connections, enforcing the per-IP connection limit."""
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(
        self,
        router: Router,
        clock: IReactorTime,
        limits: ConnectionLimits = ConnectionLimits(),
        *,
        tls: bool = True,
        counter: Callable[[str], None] | None = None,
    ) -> None:
        self.router = router
        self.clock = clock
        self.limits = limits
        self.tls = tls
        self._per_ip: dict[str, int] = defaultdict(int)
        self.connections: set[SignalingProtocol] = set()
        self.unregistered: OldestFirst[SignalingProtocol] = OldestFirst()  # handshaking or not registered yet
        self.refusals = RefusalLog(clock, "signaling")
        self.trimmer = HeapTrimmer(clock)
        self._counter = counter

    def count(self, what: str) -> None:
        if self._counter is not None:
            self._counter(what)

    def admits(self, addr: IAddress | None) -> bool:
        """Room for one more from this address? Refusals are logged in aggregate (RefusalLog)."""
        host = host_port(addr)[0]
        if self._per_ip.get(host, 0) >= self.limits.max_per_ip and not self._evict(self.unregistered.oldest(host)):
            self.refusals.refused(host, f"{self.limits.max_per_ip} open from this IP")
            self.count("refused_per_ip")
            return False
        # All addresses together: refused, not evicted. In a reconnect storm the
        # oldest are the handshakes closest to done; the refused ones retry.
        if len(self.unregistered) >= self.limits.max_unregistered:
            self.refusals.refused(host, f"{self.limits.max_unregistered} unregistered open")
            self.count("refused_unregistered")
            return False
        return True

    def _evict(self, conn: SignalingProtocol | None) -> bool:
        """A full per-IP table closes its oldest unregistered connection for the newcomer (limits.OldestFirst)."""
        if conn is None:
            return False
        conn.evict()
        return True

    def doStop(self) -> None:
        self.refusals.flush()  # no summary timer outlives the listener
        self.trimmer.stop()
        super().doStop()  # type: ignore[no-untyped-call]

    def buildProtocol(self, addr: IAddress | None) -> SignalingProtocol | None:
        return SignalingProtocol(self, addr) if self.admits(addr) else None

    def connection_opened(self, conn: SignalingProtocol) -> None:
        self._per_ip[conn.peer[0]] += 1
        self.connections.add(conn)
        self.unregistered.add(conn, conn.peer[0])

    def connection_closed(self, conn: SignalingProtocol) -> None:
        self.unregistered.discard(conn)
        if conn in self.connections:
            self.trimmer.closed()
            self.connections.discard(conn)
            self._per_ip[conn.peer[0]] -= 1
            if self._per_ip[conn.peer[0]] <= 0:
                del self._per_ip[conn.peer[0]]


class AdmittingTLSFactory(TLSMemoryBIOFactory):
    """TLS around the signaling factory that refuses over-limit IPs before any handshake work.

    Its connections are plain ``TLSMemoryBIOProtocol``, not Twisted's default
    ``BufferingTLSTransport``: that one gathers small writes into one TLS
    record at the next reactor iteration, with a timer per write and an
    aggregator per connection.  Signaling writes each SIP message whole, in
    one call, so there is nothing to gather, and the timer and the later
    iteration only cost CPU, memory and latency (docs/performance.rst).
    """
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    protocol = LazyTLSProtocol  # OpenSSL's state at the first byte, not at accept (issue 13)
    wrappedFactory: SignalingFactory

    def __init__(self, options: IOpenSSLServerConnectionCreator | ContextFactory, client: bool,
                 wrapped: IProtocolFactory) -> None:
        super().__init__(options, client, wrapped)
        refusals = getattr(wrapped, "refusals", None)
        counter = getattr(wrapped, "count", None)

        def evicted(host: str) -> None:
            if isinstance(refusals, RefusalLog):
                refusals.refused(host, "oldest of the pending TLS handshakes")
            if callable(counter):
                counter("evicted_handshakes")

        #: connections mid-handshake holding OpenSSL state (``limits.PendingHandshakes``)
        self.pending_handshakes = PendingHandshakes(evicted=evicted)

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        # None refuses the connection (Factory's contract), which WrappingFactory's stub does not allow.
        if not self.wrappedFactory.admits(addr):
            return None
        return super().buildProtocol(addr)


# -- a signaling connection's life ---------------------------------------------


class ConnectionLife(TypingProtocol):
    """The inputs of one signaling connection's life.

    handshaking (TCP up, TLS must finish in time) -> unregistered (TLS up,
    the peer must REGISTER in time) <-> registered (at least one user bound;
    idle limit and keepalives) -> closed (nothing more is sent or processed).
    A timeout in any open state aborts the transport; its loss then forgets
    the connection.
    """

    def tls_ready(self) -> None:
        """The TLS handshake completed."""

    def user_bound(self) -> None:
        """The registrar bound a user to this connection."""

    def last_user_unbound(self) -> None:
        """No user is bound here any more."""

    def timed_out(self) -> None:
        """The current state's timer ran out."""

    def lost(self) -> None:
        """The transport is gone."""


_life = TypeMachineBuilder(ConnectionLife, SignalingProtocol)
_handshaking = _life.state("handshaking")
_unregistered = _life.state("unregistered")
_registered = _life.state("registered")
_closed = _life.state("closed")


@_handshaking.upon(ConnectionLife.tls_ready).to(_unregistered)
@_registered.upon(ConnectionLife.last_user_unbound).to(_unregistered)
def _await_registration(life: ConnectionLife, conn: SignalingProtocol) -> None:
    conn.await_registration()


@_unregistered.upon(ConnectionLife.user_bound).to(_registered)
def _await_activity(life: ConnectionLife, conn: SignalingProtocol) -> None:
    conn.await_activity()


@_handshaking.upon(ConnectionLife.timed_out).to(_closed)
@_unregistered.upon(ConnectionLife.timed_out).to(_closed)
@_registered.upon(ConnectionLife.timed_out).to(_closed)
def _drop(life: ConnectionLife, conn: SignalingProtocol) -> None:
    conn.drop()


@_handshaking.upon(ConnectionLife.lost).to(_closed)
@_unregistered.upon(ConnectionLife.lost).to(_closed)
@_registered.upon(ConnectionLife.lost).to(_closed)
@_closed.upon(ConnectionLife.lost).loop()
def _forget(life: ConnectionLife, conn: SignalingProtocol) -> None:
    conn.forget()


_unregistered.upon(ConnectionLife.last_user_unbound).loop().returns(None)
_registered.upon(ConnectionLife.user_bound).loop().returns(None)
for _input in (ConnectionLife.tls_ready, ConnectionLife.user_bound, ConnectionLife.last_user_unbound,
               ConnectionLife.timed_out):
    _closed.upon(_input).loop().returns(None)

_ConnectionLifeMachine = indexed(_life.build())
