"""The web service's connections: HTTP parsing limits, timeouts, counts, bounded output.

``web.py`` answers requests; this module decides which connections live:
twisted.web's channel with tighter parsing limits, a header deadline (the
idle timer alone lets one byte per 10 s keep a connection for ever), an
``OutputGuard`` against clients that pipeline requests and never read
(issue 13), and a Site that counts connections per IP and in all so the
TLS wrapper can refuse extras before any handshake work. The limits and
their defaults are ``limits.WebLimits`` (docs/security.rst).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from kerjostunt.server.limits import GuardedTransport, HeapTrimmer, OutputGuard, RefusalLog, WebLimits
from kerjostunt.tcp import host_port

log = Logger()

# Bounds on what a client may send and how long it may take.
MAX_REQUEST_LINE = 2048  # request line (so the URL) and each header line
MAX_HEADER_BYTES = 8192  # request line plus all headers
MAX_HEADERS = 40
MAX_BODY = 0  # only GET and HEAD are served: no request body at all
IDLE_TIMEOUT = WebLimits.idle_timeout  # seconds without a byte, TLS handshake included
MAX_CONNECTIONS_PER_IP = WebLimits.max_per_ip


# -- HTTP channel with limits ----------------------------------------------


class LimitedChannel(http.HTTPChannel):
    """twisted.web's channel with tighter limits and answers for breaking them."""

    MAX_LENGTH = MAX_REQUEST_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES

    factory: WebSite
    _header_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._peer_host = host_port(self.transport.getPeer() if self.transport is not None else None)[0]
        self.factory.connection_opened(self._peer_host)
        limits = self.factory.limits
        transport: GuardedTransport = self.transport  # type: ignore[assignment]  # TLS or TCP: both pause
        self._guard = OutputGuard(
            self.factory.clock, transport, limits.max_output_buffer, limits.write_stall_timeout, self._aborted
        )

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._guard.stop()
        self._cancel_header_timer()
        self.factory.connection_closed(self._peer_host)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    # -- the output guard: twisted.web's channel is the transport's producer itself

    def pauseProducing(self) -> None:
        """The peer does not read: stop reading it, and stop answering what was read.

        twisted.web pauses the socket only between requests, and it parses
        the pipelined requests it has already read (its LineReceiver loop)
        whatever the transport says, answering each: one read of
        ``GET /metrics`` lines made megabytes of answers. LineReceiver's
        ``paused`` stops that loop; the socket is paused in every case.
        """
        self._guard.paused()
        self.paused = True
        super().pauseProducing()  # type: ignore[no-untyped-call]
        if self.transport is not None:
            cast(GuardedTransport, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._guard.resumed()
        self.paused = False
        super().resumeProducing()  # type: ignore[no-untyped-call]
        if self._buffer and not self._handlingRequest and self.transport is not None:
            self.dataReceived(b"")  # parse the pipelined requests held while paused

    def write(self, data: bytes) -> None:
        super().write(data)  # type: ignore[no-untyped-call]
        self._guard.wrote()

    def writeSequence(self, iovec: list[bytes]) -> None:
        super().writeSequence(iovec)  # type: ignore[no-untyped-call]
        self._guard.wrote()

    def _aborted(self, why: str) -> None:
        log.info("web: closing {host}: {why}", host=self._peer_host, why=why)
        self.factory.count("web_output_overflows")

    # -- the header deadline: the idle timer alone lets 1 byte per 10 s live for ever

    def dataReceived(self, data: bytes) -> None:
        if self._header_timer is None and not self._handlingRequest:
            self._header_timer = self.factory.clock.callLater(self.factory.limits.header_timeout, self._slow_headers)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _slow_headers(self) -> None:
        self._header_timer = None
        log.info("web: closing {host}: request headers not complete in time", host=self._peer_host)
        self.factory.count("web_timeouts")
        if self.transport is not None:
            cast(GuardedTransport, self.transport).abortConnection()  # TLS or TCP: both abort

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would just drop the connection; say why first.
        status = b"414 URI Too Long" if self._in_request_line() else b"431 Request Header Fields Too Large"
        self._refuse(status)

    def allHeadersReceived(self) -> None:
        self._cancel_header_timer()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        # length is None for chunked bodies; both are refused before any is read.
        if self.length is None or self.length > MAX_BODY:
            self._refuse(b"413 Content Too Large")

    def _in_request_line(self) -> bool:
        return bool(getattr(self, "_HTTPChannel__first_line", 1))

    def _refuse(self, status: bytes) -> None:
        def noop(*args: object) -> None:
            """What is read after the refusal is ignored."""

        self.lineReceived = self.rawDataReceived = self.dataReceived = noop  # type: ignore[method-assign, assignment]
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self._guard.stop()
            self.loseConnection()  # type: ignore[no-untyped-call]  # HTTPChannel's: unregisters itself as producer, or TLS never closes


class WebSite(server.Site):
    """A Site that counts connections (per IP and in all), so the TLS wrapper can refuse extras."""

    protocol = LimitedChannel  # type: ignore[assignment]  # the stub wants a factory function

    def __init__(
        self,
        root: resource.IResource,
        clock: IReactorTime,
        max_per_ip: int = MAX_CONNECTIONS_PER_IP,
        *,
        limits: WebLimits = WebLimits(),
        count: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(root, timeout=limits.idle_timeout, reactor=clock)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.limits = limits
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = {}
        self.open = 0
        self.refusals = RefusalLog(clock, "web")
        self.trimmer = HeapTrimmer(clock)
        self.count = count or (lambda what: None)
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.noisy = False

    def admits(self, addr: IAddress | None) -> bool:
        host = host_port(addr)[0]
        if self.open >= self.limits.max_connections:
            self.refusals.refused(host, f"{self.limits.max_connections} web connections open")
        elif self.per_ip.get(host, 0) >= self.max_per_ip:
            self.refusals.refused(host, f"{self.max_per_ip} open from this IP")
        else:
            return True
        self.count("web_refused")
        return False

    def doStop(self) -> None:
        self.refusals.flush()  # no summary timer outlives the listener
        self.trimmer.stop()
        super().doStop()  # type: ignore[no-untyped-call]

    def buildProtocol(self, addr: IAddress | None) -> http.HTTPChannel | None:  # type: ignore[override]
        # None refuses the connection (Factory's contract), which HTTPFactory's stub does not allow.
        if not self.admits(addr):
            return None
        channel: http.HTTPChannel | None = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        return channel

    def connection_opened(self, host: str) -> None:
        self.open += 1
        self.per_ip[host] = self.per_ip.get(host, 0) + 1

    def connection_closed(self, host: str) -> None:
        self.open -= 1
        self.trimmer.closed()
        left = self.per_ip.get(host, 0) - 1
        if left > 0:
            self.per_ip[host] = left
        else:
            self.per_ip.pop(host, None)
        if not self.per_ip:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once no connection is open (tests and graceful shutdowns wait on it)."""
        if not self.per_ip:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def log(self, request: http.Request) -> None:
        """No Apache-style access log; requests are logged as structured events."""
