"""Bounds that hold the server under abuse: output buffers, rates, refusals.

A peer that sends requests and never reads their answers made the server
buffer answers without limit (issue 13: two connections, 750 MiB). Every
signaling and web connection now has an ``OutputGuard``: the transport
pauses it when its send buffer passes Twisted's ``bufferSize`` (64 KiB),
and the guard then stops reading from the peer, so no new answers are
made; if the buffer still grows past ``max_buffer`` (answers already on
their way, server-initiated messages) or stays blocked ``stall_timeout``,
the connection is aborted and its buffers freed.

``RefusalLog`` writes refused connections as one line per source per
interval, not one per connection (a flood wrote a warning per attempt).
``TokenBucket`` is the per-connection rate limit of requests and pings.
docs/security.rst lists every limit with its default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from typing import Protocol as TypingProtocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from kerjostunt.tcp import send_at_once
from kerjostunt.wire.sip.parser import Limits

log = Logger()
_Conn = TypeVar("_Conn")

MAX_OUTPUT_BUFFER = 1 << 20   # bytes a connection may have waiting to be sent
WRITE_STALL_TIMEOUT = 60.0    # seconds a connection may keep its reader paused
REFUSAL_LOG_INTERVAL = 60.0   # one summary line per refused source per interval
TRIM_AFTER_CLOSES = 256       # closed connections that make a heap trim worth it
TRIM_DELAY = 2.0              # seconds: a flood's closes coalesce into one trim
MAX_PENDING_HANDSHAKES = 2_000  # per TLS listener: connections mid-handshake holding OpenSSL state
TRIM_MIN_INTERVAL = 30.0      # seconds between trims: steady churn costs one collection per interval


@dataclass(frozen=True)
class ConnectionLimits:
    """Time and volume bounds for one signaling connection."""

    handshake_timeout: float = 10.0      # TLS handshake must finish
    register_timeout: float = 30.0       # a connection that never registers
    idle_timeout: float = 900.0          # registered but silent (keepalives count)
    partial_message_timeout: float = 20.0  # slow input: a message must complete
    max_per_ip: int = 1000               # concurrent connections from one IP
    max_unregistered: int = 10_000       # concurrent connections not (yet) registered, all IPs
    requests_per_second: float = 20.0    # token bucket per connection
    request_burst: float = 60.0
    pings_per_second: float = 1.0        # keepalive pings answered per connection
    ping_burst: float = 10.0
    rtt_interval: float = 60.0           # server-initiated keepalive ping period
    max_output_buffer: int = MAX_OUTPUT_BUFFER
    write_stall_timeout: float = WRITE_STALL_TIMEOUT
    sip: Limits = Limits()


@dataclass(frozen=True)
class WebLimits:
    """Bounds of the HTTPS service's connections (docs/web.rst, docs/security.rst)."""

    max_connections: int = 1024          # open at once, all IPs
    max_per_ip: int = 32                 # open at once from one IP
    idle_timeout: float = 30.0           # without a byte, TLS handshake included
    header_timeout: float = 10.0         # a request's first byte to its last header line
    max_output_buffer: int = MAX_OUTPUT_BUFFER
    write_stall_timeout: float = WRITE_STALL_TIMEOUT


class TokenBucket:
    """Requests per second with a burst; cheap enough for every connection."""

    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_stamp")

    def __init__(self, clock: IReactorTime, rate: float, burst: float) -> None:
        self._clock, self._rate, self._burst = clock, rate, burst
        self._tokens = burst
        self._stamp = clock.seconds()

    def take(self) -> bool:
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def buffered_bytes(transport: object) -> int:
    """Bytes written to ``transport`` that the kernel has not taken yet.

    Walks through protocol wrappers (TLS) down to the socket's
    ``FileDescriptor``, counting the TLS layer's own buffer of writes made
    before its handshake finished. Twisted keeps these counts in private
    attributes (``dataBuffer``, ``offset``, ``_tempDataLen``); no public
    call gives them. 0 for transports without a socket (tests).
    """
    total = 0
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            pending = len(transport.dataBuffer) - transport.offset
            return total + pending + transport._tempDataLen
        if isinstance(transport, TLSMemoryBIOProtocol):
            total += sum(len(data) for data in transport._appSendBuffer)
        if not isinstance(transport, ProtocolWrapper):
            return total
        transport = transport.transport
    return total


class GuardedTransport(TypingProtocol):
    """What the guard needs of a transport: pause reading, abort, take a producer."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class OutputGuard:
    """Bounds what one connection may have waiting to be sent.

    Registered as the transport's streaming producer (``attach``): the
    transport calls ``pauseProducing`` when its buffer is full, and the
    guard stops reading from the peer; ``resumeProducing`` when it drained.
    ``wrote`` after each write aborts a connection whose buffer passed
    ``max_buffer``; a pause longer than ``stall_timeout`` aborts it too.
    ``on_abort(why)`` is told before the abort (log, count). A protocol that
    is a producer itself (twisted.web's channel) calls ``paused``,
    ``resumed`` and ``wrote`` from its own methods instead of attaching.
    """

    def __init__(
        self,
        clock: IReactorTime,
        transport: GuardedTransport,
        max_buffer: int,
        stall_timeout: float,
        on_abort: Callable[[str], None],
    ) -> None:
        self._clock, self._transport = clock, transport
        self._max_buffer, self._stall_timeout = max_buffer, stall_timeout
        self._on_abort = on_abort
        self._stall: IDelayedCall | None = None
        self.peak = 0  # the largest buffer seen after a write (tests, the bench)
        self.aborted = False
        self._stopped = False  # the connection is gone: arm nothing any more
        self._attached = False

    def attach(self) -> None:
        self._transport.registerProducer(self, True)
        self._attached = True

    def detach(self) -> None:
        """Before a clean close: Twisted's TLS sends its close alert only once no producer is registered."""
        self.stop()
        if self._attached:
            self._attached = False
            self._transport.unregisterProducer()

    # IPushProducer: the transport's side

    def pauseProducing(self) -> None:
        self.paused()
        self._transport.pauseProducing()  # stop reading: no more requests, no more answers

    def resumeProducing(self) -> None:
        self.resumed()
        if not self.aborted:
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stop()

    # the protocol's side

    def paused(self) -> None:
        if self._stall is None and not (self.aborted or self._stopped):
            self._stall = self._clock.callLater(self._stall_timeout, self._abort, "peer not reading")

    def resumed(self) -> None:
        self._cancel()

    def wrote(self) -> None:
        """After a write: abort when the buffer passed the limit."""
        size = buffered_bytes(self._transport)
        self.peak = max(self.peak, size)
        if size > self._max_buffer and not self.aborted:
            self._abort(f"output buffer over {self._max_buffer} bytes")

    def stop(self) -> None:
        self._stopped = True
        self._cancel()

    def _cancel(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _abort(self, why: str) -> None:
        self._cancel()  # from wrote(): the stall timer may still be armed
        if self.aborted:
            return
        self.aborted = True
        self._on_abort(why)
        self._transport.abortConnection()


class OldestFirst(Generic[_Conn]):
    """Connections not registered yet, oldest first, in all and per source address.

    When an address's table is full the server closes that address's oldest
    unregistered connection rather than refuse the newcomer: idle connections from one
    address (1,000 of them locked every user behind that address out for
    as long as they lived) then cost the attacker a steady stream of new
    connections, while a real peer registers within a few round trips.
    Registered connections are never in here, so never evicted.
    """

    def __init__(self) -> None:
        self._all: dict[_Conn, str] = {}
        self._by_host: dict[str, dict[_Conn, None]] = {}

    def add(self, conn: _Conn, host: str) -> None:
        """Track ``conn``; one already tracked keeps its age."""
        if conn not in self._all:
            self._all[conn] = host
            self._by_host.setdefault(host, {})[conn] = None

    def discard(self, conn: _Conn) -> None:
        host = self._all.pop(conn, None)
        if host is not None:
            of_host = self._by_host[host]
            del of_host[conn]
            if not of_host:
                del self._by_host[host]

    def oldest(self, host: str | None = None) -> _Conn | None:
        """The oldest of ``host`` (of all when None), or None."""
        table = self._all if host is None else self._by_host.get(host, {})
        return next(iter(table), None)

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, conn: object) -> bool:
        return conn in self._all


class RefusalLog:
    """Refused connections, logged as one line per source per interval.

    The first refusal from a source in an interval arms the interval's one
    timer; when it fires, each source refused meanwhile gets one warning
    with its count and reasons. No refusal, no timer.
    """

    def __init__(self, clock: IReactorTime, what: str, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self._clock, self._what, self._interval = clock, what, interval
        self._pending: dict[str, Counter[str]] = {}
        self._timer: IDelayedCall | None = None

    def refused(self, host: str, why: str) -> None:
        self._pending.setdefault(host, Counter())[why] += 1
        if self._timer is None:
            self._timer = self._clock.callLater(self._interval, self.flush)

    def flush(self) -> None:
        """Write the summary lines now (the timer does; so does a stop)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, {}
        for host, reasons in pending.items():
            log.warn(
                "Refused {n} {what} connection(s) from {host} in the last {interval:g} s: {reasons}",
                n=sum(reasons.values()), what=self._what, host=host, interval=self._interval,
                reasons=", ".join(f"{why} ({count})" for why, count in reasons.most_common()),
            )


class PerSourceCap:
    """Open connections per source address, at most ``max_per_ip`` each; refusals in aggregate.

    The probe ports had no such bound: 9,000 trickled connections from one
    address stayed open (issue 13). One table serves every probe port, so
    the cap is per address over all of them.
    """

    def __init__(self, clock: IReactorTime, what: str, max_per_ip: int,
                 counter: Callable[[str], None] | None = None) -> None:
        self.max_per_ip = max_per_ip
        self.refusals = RefusalLog(clock, what)
        self._open: dict[str, int] = {}
        self._counter = counter

    def admit(self, host: str) -> bool:
        """Room for one more from ``host``? If so it is counted until ``release``."""
        count = self._open.get(host, 0)
        if count >= self.max_per_ip:
            self.refusals.refused(host, f"{self.max_per_ip} open from this IP")
            if self._counter is not None:
                self._counter("refused_probe_per_ip")
            return False
        self._open[host] = count + 1
        return True

    def release(self, host: str) -> None:
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
        else:
            self._open.pop(host, None)

    def open_from(self, host: str) -> int:
        return self._open.get(host, 0)

    def stop(self) -> None:
        self.refusals.flush()


class PendingHandshakes:
    """The connections of one TLS listener that hold OpenSSL state but have not finished
    their handshake, at most ``limit``: a newcomer past it closes the oldest.

    ``LazyTLSProtocol`` makes a connection that never speaks cheap; one that
    sends five bytes of a ClientHello and stalls still costs its OpenSSL state
    (about 50 KiB) until its handshake timeout. A real handshake finishes
    within a round trip or two, so the oldest pending one is the stalled one:
    7,000 of them held 485 MiB for 10 s; now at most ``limit`` do.
    """

    def __init__(self, limit: int = MAX_PENDING_HANDSHAKES,
                 evicted: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self._table: OldestFirst[LazyTLSProtocol] = OldestFirst()
        self._evicted = evicted

    def started(self, conn: LazyTLSProtocol) -> None:
        self._table.add(conn, "")
        while len(self._table) > self.limit:
            oldest = self._table.oldest()
            if oldest is None or oldest is conn:
                break
            self._table.discard(oldest)
            if self._evicted is not None:
                self._evicted(_host_of(oldest))
            oldest.evict()

    def ended(self, conn: LazyTLSProtocol) -> None:
        self._table.discard(conn)

    def __len__(self) -> int:
        return len(self._table)


def _host_of(conn: LazyTLSProtocol) -> str:
    peer = conn.transport.getPeer() if conn.transport is not None else None
    return str(getattr(peer, "host", "?"))


class LazyTLSProtocol(TLSMemoryBIOProtocol):
    """TLS whose OpenSSL connection is made when the peer's first byte arrives, not at accept.

    ``TLSMemoryBIOProtocol`` creates its ``SSL`` object and runs a first
    ``do_handshake`` in ``makeConnection``: about 17 KiB for the object and
    its memory BIOs and 28 KiB more of read and handshake buffers, for every
    TCP connection, before the peer has said anything. 7,000 connections that
    never send a ClientHello cost 48 KiB each (issue 13). A server speaks
    second in TLS, so nothing is lost by waiting: the counting, timers and
    admission (the wrapped protocol's ``connectionMade``) still happen at
    accept, and a connection that never sends a byte costs only its Python
    objects until its handshake timeout closes it (docs/security.rst).

    Relies on ``TLSMemoryBIOProtocol`` internals (``_tlsConnection``,
    ``factory._creatorCallable``, ``_lostTLSConnection``);
    ``tests.test_pretls`` holds them to their meaning.
    """

    _tlsConnection: Any

    def _pending(self) -> PendingHandshakes | None:
        table = getattr(self.factory, "pending_handshakes", None)
        return table if isinstance(table, PendingHandshakes) else None

    def makeConnection(self, transport: ITransport) -> None:
        """``TLSMemoryBIOProtocol.makeConnection`` without the OpenSSL connection and handshake."""
        self._tlsConnection = None
        self._appSendBuffer = []
        send_at_once(transport)
        for interface in providedBy(transport):
            directlyProvides(self, interface)
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._tlsConnection is None:
            if self._aborted or self._lostTLSConnection:
                return
            self._tlsConnection = self.factory._creatorCallable(self)
            pending = self._pending()
            if pending is not None:
                pending.started(self)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def evict(self) -> None:
        """Abort, and free the OpenSSL state now: the reactor's ``connectionLost`` comes only after
        this read batch, which may hold thousands of new handshakes (epoll hands them over at once)."""
        self.abortConnection()  # type: ignore[no-untyped-call]
        self._tlsConnection = None
        self._lostTLSConnection = True

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()  # type: ignore[no-untyped-call]
        pending = self._pending()
        if self._handshakeDone and pending is not None:
            pending.ended(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pending = self._pending()
        if pending is not None:
            pending.ended(self)
        if self._tlsConnection is None:
            self._lostTLSConnection = True  # nothing to shut down or read out
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _shutdownTLS(self) -> None:
        if self._tlsConnection is None:
            if self.transport is not None:
                self.transport.loseConnection()  # what OpenSSL does before any negotiation
            return
        super()._shutdownTLS()  # type: ignore[no-untyped-call]

    def _write(self, data: bytes) -> None:
        if self._tlsConnection is None:
            if not self._lostTLSConnection:
                self._bufferedWrite(data)  # type: ignore[no-untyped-call]  # sent after the handshake
            return
        super()._write(data)  # type: ignore[no-untyped-call]


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Gives the memory of a closed flood back to the system.

    A connection's TLS state and buffers (about 40 KiB) are freed when it
    closes, but glibc keeps freed heap pages mapped, so after 7,000
    connections the server's RSS stayed up (issue 13). After
    ``TRIM_AFTER_CLOSES`` closes, one ``malloc_trim(0)`` runs ``TRIM_DELAY``
    later (the rest of the flood's closes coalesce into it), and at most one
    per ``TRIM_MIN_INTERVAL``. A full
    ``gc.collect`` comes first: a closed connection's objects hold
    reference cycles, and with the server's high first GC threshold
    (``service.tune_gc``) an idle server would free them only much later.
    No-op without glibc.
    """

    def __init__(self, clock: IReactorTime, trim: Callable[[int], int] | None = None) -> None:
        self._clock = clock
        self._trim = trim if trim is not None else _malloc_trim()
        self._closes = 0
        self._timer: IDelayedCall | None = None
        self._stopped = False  # the listener stopped: late closes arm nothing
        self._last = float("-inf")
        self.trims = 0

    def closed(self) -> None:
        self._closes += 1
        if self._trim is not None and self._closes >= TRIM_AFTER_CLOSES and self._timer is None and not self._stopped:
            wait = max(TRIM_DELAY, self._last + TRIM_MIN_INTERVAL - self._clock.seconds())
            self._timer = self._clock.callLater(wait, self.trim)

    def trim(self) -> None:
        self._timer = None
        self._closes = 0
        self._last = self._clock.seconds()
        if self._trim is not None:
            gc.collect()
            self._trim(0)
            self.trims += 1

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
