"""TCP helpers both the server and the client use on their connections."""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = ["host_port", "no_delay", "plain_ip"]


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
