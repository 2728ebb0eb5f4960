"""
Non-blocking TCP connects and listens from a shared, reusable local port.

STUNT needs several sockets on one local port at once: a listener (so the
peer's SYN is accepted) and one or more outgoing connects (so our SYN opens
the mapping in our own NAT, and simultaneous open can happen).  Linux only
allows that when every one of those sockets sets SO_REUSEADDR and
SO_REUSEPORT before bind(); none of it needs root.

Twisted's own ``connectTCP`` cannot bind to a port that a listener already
holds (it does not set SO_REUSEPORT) and cannot set the TTL of the first SYN,
so the connect is done here by hand: the socket is made non-blocking,
connect_ex() starts the handshake, a tiny descriptor waits for writability
through the reactor, and the connected socket is then adopted into the
reactor with ``adoptStreamConnection``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorFDSet,
    IReactorTime,
    IReadWriteDescriptor,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()



class SocketReactor(IReactorTime, IReactorFDSet):
    """What the NAT techniques need of the reactor: time, and sockets made by hand.

    IReactorTime, IReactorFDSet and IReactorSocket's two adopt methods (the
    global reactor provides all three).  An interface rather than a
    typing.Protocol, so that Twisted's own time-taking APIs (``addTimeout``,
    a HandshakeFactory's clock) accept it as it is.
    """

    def adoptStreamConnection(fileDescriptor: int, addressFamily: socket.AddressFamily,
                              factory: IProtocolFactory) -> None:
        """IReactorSocket's, for any protocol factory (Twisted's stub asks for a ServerFactory)."""

    def adoptStreamPort(fileDescriptor: int, addressFamily: socket.AddressFamily,
                        factory: IProtocolFactory) -> IListeningPort:
        """IReactorSocket's, for any protocol factory (Twisted's stub asks for a ServerFactory)."""


Endpoint = tuple[str, int]

_IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EINTR}


def family_of(host: str) -> socket.AddressFamily:
    """IPv6 for a textual address containing a colon, IPv4 otherwise."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reusable_socket(local: tuple[str, int]) -> socket.socket:
    """
    A TCP socket bound to ``local`` that other reusable sockets may share.

    The options must be set before bind(): that is when the kernel decides
    whether the port may be shared.
    """
    family = family_of(local[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(local)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _ttl_option(family: socket.AddressFamily) -> tuple[int, int]:
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
    return socket.IPPROTO_IP, socket.IP_TTL


def _connect_error(code: int) -> Exception:
    """Twisted's connect error for an errno (ECONNREFUSED -> ConnectionRefusedError)."""
    exc: Exception = error.getConnectError(  # type: ignore[no-untyped-call]  # untyped in Twisted
        (code, errno.errorcode.get(code, str(code))))
    return exc


@implementer(IProtocolFactory)
class _CapturingFactory:
    """
    Passes buildProtocol through and remembers the protocol.

    adoptStreamConnection returns nothing, yet the caller of connect_from
    wants the protocol instance the connection was given.
    """

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped
        self.protocol: IProtocol | None = None

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        self.protocol = self.wrapped.buildProtocol(addr)
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


@implementer(IReadWriteDescriptor)
class _ConnectWaiter:
    """
    Watches a connecting socket until the kernel says how it went.

    Writability means the TCP handshake finished, one way or the other;
    SO_ERROR tells which.  epoll reports a refused connect as an error event,
    which the reactor delivers as connectionLost rather than doWrite, so both
    paths end in the same check.
    """

    def __init__(self, sock: socket.socket, done: Callable[[int], None]) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._done: Callable[[int], None] | None = done

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "kerjostunt-connect"

    def doRead(self) -> None:
        return None

    def doWrite(self) -> None:
        self._check()
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._check()

    def _check(self) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        try:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            code = e.errno or errno.EBADF
        done(code)


def connect_from(
    reactor: SocketReactor,
    local: tuple[str, int],
    remote: tuple[str, int],
    protocol_factory: IProtocolFactory,
    *,
    timeout: float,
    ttl: int | None = None,
) -> Deferred[Any]:
    """
    Connect to ``remote`` from the reusable local endpoint ``local``.

    Fires with the protocol built by ``protocol_factory`` once the connected
    socket has been adopted into the reactor.  Fails with Twisted's
    ConnectionRefusedError on RST, TimeoutError after ``timeout`` seconds
    (``reactor.callLater``), another ConnectError for other socket errors.
    Cancelling closes the socket.

    ``ttl`` applies to the first SYN only: it is set before connect() sends
    the SYN and restored right after, so retransmissions, the SYN-ACK of a
    simultaneous open and all data leave with the normal TTL.
    """
    sock = reusable_socket(local)
    return _Connect(reactor, sock, protocol_factory).start(remote, timeout, ttl)


def _start_connect(sock: socket.socket, remote: tuple[str, int], ttl: int | None) -> int:
    """connect_ex() with the first SYN's TTL set to ``ttl`` (and restored right after); the errno."""
    default_ttl = None
    level = option = 0
    if ttl is not None:
        level, option = _ttl_option(sock.family)
        default_ttl = sock.getsockopt(level, option)
        sock.setsockopt(level, option, ttl)
    try:
        code = sock.connect_ex(remote)
    except OSError as e:
        code = e.errno or errno.EINVAL
    if default_ttl is not None:
        sock.setsockopt(level, option, default_ttl)
    return code


class _Connect:
    """One ``connect_from``: the socket, what watches it, its timeout, the Deferred."""

    def __init__(self, reactor: SocketReactor, sock: socket.socket, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.sock = sock
        self.factory = factory
        self.waiter: _ConnectWaiter | None = None
        self.timer: IDelayedCall | None = None
        self.result: Deferred[Any] = Deferred(lambda _: self._cleanup(close=True))

    def start(self, remote: tuple[str, int], timeout: float, ttl: int | None) -> Deferred[Any]:
        code = _start_connect(self.sock, remote, ttl)
        if code == 0:
            self._connected(0)
        elif code not in _IN_PROGRESS:
            self._fail(_connect_error(code))
        else:
            self.timer = self.reactor.callLater(timeout, self._timed_out, remote)
            self.waiter = _ConnectWaiter(self.sock, self._connected)
            self.reactor.addWriter(self.waiter)
        return self.result

    def _cleanup(self, close: bool) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            self.reactor.removeWriter(waiter)
            self.reactor.removeReader(waiter)
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if close:
            self.sock.close()

    def _fail(self, exc: Exception) -> None:
        self._cleanup(close=True)
        if not self.result.called:
            self.result.errback(exc)

    def _timed_out(self, remote: tuple[str, int]) -> None:
        self.timer = None
        self._fail(error.TimeoutError(string=f"connect to {remote[0]}:{remote[1]}"))  # type: ignore[no-untyped-call]

    def _connected(self, code: int) -> None:
        if self.result.called:
            return
        if code != 0:
            self._fail(_connect_error(code))
            return
        self._cleanup(close=False)
        sock = self.sock
        capture = _CapturingFactory(self.factory)
        try:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, capture)
        except Exception as e:
            sock.close()
            self.result.errback(e)
            return
        # The reactor holds its own duplicate of the descriptor now.
        sock.close()
        if capture.protocol is None:
            self.result.errback(error.ConnectError(string="factory refused the connection"))  # type: ignore[no-untyped-call]
        else:
            self.result.callback(capture.protocol)


class HeldConnect:
    """
    A non-blocking connect from a reusable local port (as ``connect_from``, but
    the socket stays reachable: the birthday technique's hard side reads its
    TCP state, and closes and redials it without a Deferred per attempt).

    ``done(attempt, errno_code)`` is called once, never synchronously.
    """

    def __init__(self, reactor: SocketReactor, local: Endpoint, remote: Endpoint, ttl: int | None,
                 done: Callable[[HeldConnect, int], None]) -> None:
        self.reactor = reactor
        self.remote = remote
        self.sock: socket.socket | None = reusable_socket(local)
        self.port = self.sock.getsockname()[1]
        self.primed = ttl is not None
        self.timer: IDelayedCall | None = None
        self._done: Callable[[HeldConnect, int], None] | None = done
        self._waiter: _ConnectWaiter | None = None
        sock = self.sock
        try:
            code = _start_connect(sock, remote, ttl)
        except BaseException:
            self.close()
            raise
        if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EINTR):
            self._waiter = _ConnectWaiter(sock, self._finished)
            reactor.addWriter(self._waiter)
        else:
            reactor.callLater(0, self._finished, code)

    def tcp_state(self) -> int | None:
        if self.sock is None:
            return None
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return None

    def _finished(self, code: int) -> None:
        done, self._done = self._done, None
        self._unwatch()
        if done is not None:
            done(self, code)

    def _unwatch(self) -> None:
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self.reactor.removeWriter(waiter)
            self.reactor.removeReader(waiter)
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def adopt(self, factory: IProtocolFactory) -> IProtocol | None:
        """Hand the connected socket to the reactor; the protocol, or None."""
        sock, self.sock = self.sock, None
        assert sock is not None
        capture = _CapturingFactory(factory)
        try:
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, capture)
        finally:
            sock.close()  # the reactor holds its own duplicate
        return capture.protocol

    def close(self) -> None:
        self._done = None
        self._unwatch()
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()


def error_name(code: int) -> str:
    """A short name for a connect errno, as the failure texts count them."""
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if code == errno.ETIMEDOUT:
        return "timed out"
    return errno.errorcode.get(code, str(code)).lower()


def listen_reusable(
    reactor: SocketReactor, local: tuple[str, int], factory: IProtocolFactory, backlog: int = 16
) -> IListeningPort:
    """
    Listen on ``local`` while outgoing sockets share the same port.

    Raises OSError when the port cannot be shared (held by a socket that did
    not set SO_REUSEPORT, or by another user).
    """
    sock = reusable_socket(local)
    try:
        sock.listen(backlog)
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        # adoptStreamPort duplicated the descriptor.
        sock.close()


def abort_protocol(protocol: object) -> None:
    """Drop a losing attempt's connection at once (no FIN handshake to wait for)."""
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abortConnection()
