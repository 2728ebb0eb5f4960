"""Which of this host's IPv6 addresses a call offers as its IPv6 candidates.

IPv6 has no NAT: a host's global address is its public address, and a
stateful firewall in front of it opens for the connections it starts, so a
simultaneous open from that address is the easiest punch there is
(docs/punching.rst, "ipv6"). Which address, of the several a host has:

- global unicast only (``2000::/3``): never link-local (``fe80::/10``, it
  needs a zone and means nothing to a peer elsewhere; the server refuses
  it too), loopback, unique-local (``fc00::/7``, private like RFC 1918
  space: only a peer on the same site could use it), or IPv4-mapped;
- never a tentative (duplicate address detection still running), failed or
  deprecated one (its preferred lifetime is over: the kernel stops using it
  for new connections);
- a temporary (RFC 8981 privacy) address before a stable one, as the
  kernel's own source address selection prefers it (RFC 6724 rule 7): the
  stable one often carries the MAC (EUI-64) and never changes, while a
  temporary one is used by this host's other outgoing connections anyway.
  A call's connection outlives the address's preferred lifetime (the kernel
  keeps a deprecated address until its valid lifetime ends), so a rotation
  does not break a connection made before it.

Linux lists every address with its flags in ``/proc/net/if_inet6``; where
that file does not exist (other systems, no IPv6) no address is offered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IPv6Address", "global_ipv6_addresses", "parse_if_inet6", "preferred_ipv6"]

IF_INET6 = Path("/proc/net/if_inet6")

# include/uapi/linux/if_addr.h
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
_UNUSABLE = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE

_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


@dataclass(frozen=True)
class IPv6Address:
    address: str
    interface: str
    temporary: bool


def parse_if_inet6(text: str) -> list[IPv6Address]:
    """The usable global unicast addresses in ``/proc/net/if_inet6``'s text, in its order.

    Each line: 32 hex digits, interface index, prefix length, scope, flags
    (all hex), interface name. Lines that do not parse are skipped.
    """
    found: list[IPv6Address] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) != 6 or len(words[0]) != 32:
            continue
        try:
            address = ipaddress.IPv6Address(int(words[0], 16))
            flags = int(words[4], 16)
        except ValueError:
            continue
        if address not in _GLOBAL_UNICAST or address.ipv4_mapped is not None or flags & _UNUSABLE:
            continue
        found.append(IPv6Address(str(address), words[5], bool(flags & IFA_F_TEMPORARY)))
    return found


def _read_if_inet6() -> str:
    try:
        return IF_INET6.read_text()
    except OSError:
        return ""


def global_ipv6_addresses(read: Callable[[], str] = _read_if_inet6) -> list[IPv6Address]:
    """This host's usable global IPv6 addresses, temporary ones first."""
    addresses = parse_if_inet6(read())
    return sorted(addresses, key=lambda a: not a.temporary)


def preferred_ipv6(read: Callable[[], str] = _read_if_inet6) -> str | None:
    """The one address a call offers (None: no usable global IPv6 address)."""
    addresses = global_ipv6_addresses(read)
    return addresses[0].address if addresses else None
