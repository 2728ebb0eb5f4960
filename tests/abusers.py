"""Clients that attack the server on loopback: shared by tests.test_abuse and bench/abuse.py.

Each is a plain Twisted protocol over a real socket; none sleeps: they write
from reactor turns and report through Deferreds.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

SMALL_BUFFER = 4096  # the attacker's socket buffers: its kernel takes little of the flood


def options_request(n: int, domain: str = "kerjo.test") -> bytes:
    """A small well-formed SIP request the server answers (OPTIONS)."""
    return (
        f"OPTIONS sip:{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKflood{n}\r\n"
        f"From: <sip:flood@{domain}>;tag=f{n}\r\n"
        f"To: <sip:{domain}>\r\n"
        f"Call-ID: flood-{n}\r\n"
        f"CSeq: {n} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def shrink_buffers(sock: socket.socket | None) -> None:
    """Small kernel buffers, so what the kernel holds does not hide the server's own."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


def socket_of(transport: object) -> socket.socket | None:
    """The socket under a (TLS) transport."""
    for _ in range(3):
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


@implementer(IHandshakeListener)
class NonReader(Protocol):
    """Sends ``make(n)`` for n in range(count), ``batch`` per reactor turn, and never reads.

    ``ready`` fires when TLS is up (reading already paused); ``lost`` when
    the connection ends, with the number of requests it managed to write.
    """

    def __init__(self, clock: IReactorTime, make: Callable[[int], bytes], count: int, batch: int = 200) -> None:
        self._clock, self._make, self._count, self._batch = clock, make, count, batch
        self.sent = 0
        self.bytes_sent = 0
        self.ready: defer.Deferred[NonReader] = defer.Deferred()
        self.lost: defer.Deferred[int] = defer.Deferred()
        self.gone = False

    def connectionMade(self) -> None:
        shrink_buffers(socket_of(self.transport))

    def handshakeCompleted(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]  # never read a byte
        self.ready.callback(self)
        self._clock.callLater(0, self._more)

    def _more(self) -> None:
        if self.gone:
            return
        end = min(self._count, self.sent + self._batch)
        data = b"".join(self._make(n) for n in range(self.sent, end))
        self.transport.write(data)  # type: ignore[union-attr]
        self.bytes_sent += len(data)
        self.sent = end
        if self.sent < self._count:
            self._clock.callLater(0, self._more)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.gone = True
        self.lost.callback(self.sent)


@implementer(IHandshakeListener)
class Trickler(Protocol):
    """Writes ``data`` one byte per ``interval`` seconds (a slowloris), once TLS is up.

    ``lost`` fires with how long the connection lived, from its TCP connect.
    """

    def __init__(self, clock: IReactorTime, data: bytes, interval: float) -> None:
        self._clock, self._data, self._interval = clock, data, interval
        self.lost: defer.Deferred[float] = defer.Deferred()
        self._started = 0.0
        self._call: IDelayedCall | None = None
        self.shook = False  # TLS came up (a refused connection closes before)

    def connectionMade(self) -> None:
        self._started = self._clock.seconds()

    def handshakeCompleted(self) -> None:
        self.shook = True
        self._drip()

    def _drip(self) -> None:
        if self._data:
            self.transport.write(self._data[:1])  # type: ignore[union-attr]
            self._data = self._data[1:]
        self._call = self._clock.callLater(self._interval, self._drip)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.lost.callback(self._clock.seconds() - self._started)


class RawTrickler(Protocol):
    """Plain TCP: writes the first byte of ``data`` at once, then one per ``interval`` seconds
    (``interval`` 0: all of it at once).

    Empty ``data``: a connection that never says anything (no TLS at all).
    ``lost`` fires with how long the connection lived.
    """

    def __init__(self, clock: IReactorTime, data: bytes, interval: float) -> None:
        self._clock, self._data, self._interval = clock, data, interval
        self.lost: defer.Deferred[float] = defer.Deferred()
        self._started = 0.0
        self._call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._started = self._clock.seconds()
        self._drip()

    def _drip(self) -> None:
        if not self._data:
            return
        size = len(self._data) if self._interval <= 0 else 1
        self.transport.write(self._data[:size])  # type: ignore[union-attr]
        self._data = self._data[size:]
        if self._data:
            self._call = self._clock.callLater(self._interval, self._drip)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.lost.callback(self._clock.seconds() - self._started)
