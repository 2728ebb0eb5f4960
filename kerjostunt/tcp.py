"""TCP helpers both the server and the client use on their connections."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

__all__ = ["host_port", "no_delay"]


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

    (``object`` too: mypy-zope takes ``IAddress`` to be only its IP providers.)
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    return "?", 0
