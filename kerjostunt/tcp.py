"""TCP helpers both the server and the client use on their connections."""

from __future__ import annotations

import ipaddress

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = ["host_port", "no_delay", "plain_ip", "send_at_once"]


class _SendAtOnce(tcp.Server):
    """A ``tcp.Server`` whose ``write`` sends at once when nothing waits in its buffer.

    Twisted's ``write`` only buffers: the bytes go out in ``doWrite`` once
    epoll says the socket is writable, which costs two ``epoll_ctl`` calls
    (start and stop watching for writability) and a pass through the reactor
    loop for every message. A signaling connection writes one SIP message at a
    time and its socket buffer is almost always empty, so sending in ``write``
    saves that work on nearly every message (docs/performance.rst, issue 16).
    Whatever the kernel does not take, and every write while something is
    already queued, goes through Twisted's buffer as before, in order. A
    pull producer (twisted.web sending a file) keeps Twisted's path: it is
    asked for more only from ``doWrite``.
    """

    def write(self, data: bytes) -> None:
        if (data and self.connected and not self.disconnecting and not self._writeDisconnected
                and not self._tempDataBuffer and self.offset == len(self.dataBuffer)
                and (self.producer is None or self.streamingProducer)):
            try:
                sent = self.socket.send(data)
            except OSError:  # full (EAGAIN), or an error doWrite meets and reports as it would have
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[no-untyped-call]


def send_at_once(transport: object) -> None:
    """Make an accepted TCP connection's writes go out at once (``_SendAtOnce``).

    Only a plain ``tcp.Server`` is changed (its class, which adds no state);
    any other transport (TLS wrappers, test transports) is left alone.
    """
    if type(transport) is tcp.Server:
        transport.__class__ = _SendAtOnce


def no_delay(transport: object) -> None:
    """Turn Nagle's algorithm off where the transport has it (TLS passes it on).

    With it, a message written while an earlier one is unacknowledged waits
    for that ACK, which the peer may delay by 40 ms: the 200 to a caller that
    had just got its 100 Trying reached it 40 ms after the ACK reached the
    callee, and the two sides' dial moments were 40 ms apart (NAT lab).

    ``object``, not ``ITCPTransport``: test transports, and TLS wrappers
    whose lower transport is not TCP, have no such method and are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def host_port(address: IAddress | object) -> tuple[str, int]:
    """(host, port) of an IP address; ``("?", 0)`` for any other kind (UNIX, none).

    An IPv4-mapped IPv6 address (a peer of a dual-stack ``::`` listener)
    reads as the IPv4 address it maps: the registrar, the per-IP limits and
    prediction compare it with what the same peer shows over IPv4.

    (``object`` too: mypy-zope takes ``IAddress`` to be only its IP providers.)
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return plain_ip(address.host), address.port
    return "?", 0


def plain_ip(host: str) -> str:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1``; any other text unchanged."""
    if ":" not in host or "." not in host:
        return host
    try:
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)
