"""Which candidate addresses one peer may make another dial: the rule both sides apply.

A caller's SDP names addresses the callee's client will connect to. Left
unchecked, one peer could make another's machine connect to ``127.0.0.1:22``,
to a cloud metadata address (``169.254.169.254``), to the server itself or
into its own LAN from outside (issue 13). The server drops such candidates
before it forwards an offer or an answer, and the client refuses the same
ones before it dials, whatever the server sent: one pure function, so the
two lists cannot drift apart.

Never dialed: unspecified, loopback, link-local, multicast, broadcast and
reserved addresses, and the server's own. Private ranges (RFC 1918,
CGNAT ``100.64.0.0/10``, IPv6 ULA ``fc00::/7``) only as ``host``
candidates between two peers behind one public address (one LAN).
Loopback is allowed in one case: everything runs on one host (both peers
registered from one loopback address; for the client, its server is on
loopback), as in the tests and a developer's machine, where a peer could
connect to its own loopback anyway.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from kerjostunt.wire.sdp import Candidate

__all__ = ["Scope", "refusal", "screen", "is_loopback", "normalized", "PRIVATE_NETWORKS"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: reachable only inside one site: host candidates in these go to a peer on the same LAN only.
#: Explicit, not ``ipaddress``'s ``is_private``: that also covers 198.18.0.0/15 (the NAT lab's
#: "Internet") and documentation ranges, which route like public addresses here.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(frozen=True)
class Scope:
    """Where the candidates go, as far as the rule needs to know.

    ``same_network``: both peers are seen at one public address (one LAN).
    ``local``: everything runs on one host, so loopback candidates make sense.
    ``own``: the server's addresses, never a dial target.
    """

    same_network: bool = False
    local: bool = False
    own: frozenset[str] = field(default_factory=frozenset)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> IPAddress | None:
    """The address ``text`` names, or None; remembered (``ipaddress`` parses in Python, and every
    call asks about the same few addresses: its peers', the server's, their candidates')."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def normalized(ip: str) -> str | None:
    """The address as the rule compares it (``::ffff:192.0.2.1`` is ``192.0.2.1``); None if not one."""
    address = _address(ip)
    return None if address is None else str(address)


def is_loopback(ip: str) -> bool:
    """``127.0.0.0/8``, ``::1`` (and ``::ffff:127.x``): this host."""
    address = _address(ip)
    return address is not None and address.is_loopback


def refusal(candidate: Candidate, scope: Scope) -> str | None:
    """Why ``candidate`` must not be passed on or dialed, or None when it may."""
    address = _address(candidate.ip)
    if address is None:
        return "not an address"
    if candidate.port == 0:
        return "port 0"
    if address.is_unspecified:
        return "unspecified address"
    if address.is_loopback:
        return None if scope.local else "loopback address"
    if (str(address) in scope.own or candidate.ip in scope.own) and candidate.typ != "relay":
        # A TURN relay may run on the server's host (docs/relay.rst): a relayed address is reached
        # only through that relay's Connect, never dialed.
        return "the server's own address"
    if address.is_link_local:
        return "link-local address"
    if address.is_multicast:
        return "multicast address"
    if address == _BROADCAST or address.is_reserved:
        return "broadcast or reserved address"
    if any(address in network for network in PRIVATE_NETWORKS if network.version == address.version):
        if candidate.typ != "host":
            # The server's own observation (prflx/srflx) of a peer on a private network is where
            # it saw that peer: a server on a LAN sees its peers at LAN addresses.
            return None
        return None if scope.same_network else "private address of another network"
    return None


def screen(candidates: Iterable[Candidate], scope: Scope) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """The candidates that may go on, and those refused with the reason."""
    kept: list[Candidate] = []
    refused: list[tuple[Candidate, str]] = []
    for candidate in candidates:
        why = refusal(candidate, scope)
        if why is None:
            kept.append(candidate)
        else:
            refused.append((candidate, why))
    return kept, refused
