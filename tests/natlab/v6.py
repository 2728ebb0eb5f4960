"""IPv6 for the NAT lab (issue 17): dual-stack sites behind stateful firewalls.

Built on a lab made with ``Lab(..., ipv6={"a", ...})`` after its IPv4 part:
each named site's NAT box also routes IPv6, without any NAT (IPv6 has
none), and its ``inet`` filter table, which already drops new connections
arriving on the WAN side for both families, becomes the site's stateful
IPv6 firewall; the NAT's ``inbound`` behaviour says how it turns an
unsolicited SYN away: ``drop`` drops it, ``icmp`` rejects it with ICMPv6
"administratively prohibited", ``rst`` with a TCP reset. Sites not named
stay IPv4-only (their peers get no IPv6 address at all).

Addresses: 2001:db8::/32 (documentation space, global unicast as the
client's address choice wants it), site k's LAN ``2001:db8:k::/64`` (peer i
at ``::1i`` (10 + i)), its link to the core ``2001:db8:0:k::/64``, the
server's ``2001:db8:0:ff::/64``. Every address is added ``nodad`` (no
duplicate address detection: a tentative address is never offered).

The core's delay daemon gets the IPv6 packets too (``ip6tables`` into the
same queue: the daemon reads only the hook and the interfaces), so both
families see the same link delays.
"""

from __future__ import annotations

from collections.abc import Callable

SERVER_V6 = "2001:db8:0:ff::10"


def site_lan(k: int) -> str:
    return f"2001:db8:{k}::"


def peer_v6(k: int, i: int) -> str:
    return f"2001:db8:{k}::{10 + i}"


def queue_argvs(queue_num: int = 0) -> list[list[str]]:
    """The core's IPv6 packets to the delay daemon, as ``nat.core_queue_argvs`` does for IPv4."""
    return [["ip6tables", "-w", "-t", "mangle", "-A", chain, "-j", "NFQUEUE", "--queue-num", str(queue_num)]
            for chain in ("PREROUTING", "POSTROUTING")]


def firewall_rules(inbound: str, wan_if: str = "wan") -> list[str]:
    """``nft`` commands that make the site's forward chain refuse unsolicited IPv6 SYNs as told."""
    if inbound == "drop":
        return []  # the chain's own "iifname wan ct state new drop" does it
    reject = "icmpv6 type admin-prohibited" if inbound == "icmp" else "tcp reset"
    return [f'insert rule inet natlab_filter forward iifname "{wan_if}" meta nfproto ipv6 '
            f"ct state new meta l4proto tcp reject with {reject}"]


def build(lab: object, ipn: Callable[..., None], sysctl: Callable[..., None], nft: Callable[[str, str], None],
          sites: set[str]) -> None:
    """Add IPv6 to ``lab`` (a built ``Lab``): the core, the server and the named sites."""
    core = lab.core.netns  # type: ignore[attr-defined]
    sysctl(core, "net.ipv6.conf.all.forwarding=1")
    ipn(core, "addr", "add", "2001:db8:0:ff::1/64", "dev", "s0", "nodad")
    server = lab.server.netns  # type: ignore[attr-defined]
    ipn(server, "addr", "add", f"{SERVER_V6}/64", "dev", "eth0", "nodad")
    ipn(server, "-6", "route", "add", "default", "via", "2001:db8:0:ff::1")
    for k, (name, nat) in enumerate(lab.nats.items(), start=1):  # type: ignore[attr-defined]
        if name not in sites:
            continue
        ipn(core, "addr", "add", f"2001:db8:0:{k}::1/64", "dev", f"n{name}", "nodad")
        ipn(core, "-6", "route", "add", f"{site_lan(k)}/64", "via", f"2001:db8:0:{k}::2")
        sysctl(nat.netns, "net.ipv6.conf.all.forwarding=1")
        ipn(nat.netns, "addr", "add", f"2001:db8:0:{k}::2/64", "dev", "wan", "nodad")
        ipn(nat.netns, "-6", "route", "add", "default", "via", f"2001:db8:0:{k}::1")
        ipn(nat.netns, "addr", "add", f"{site_lan(k)}1/64", "dev", "lan", "nodad")
        for peer in lab.peers.values():  # type: ignore[attr-defined]
            if peer.nat != name:
                continue
            i = int(peer.name[len(name):])
            ipn(peer.netns, "addr", "add", f"{peer_v6(k, i)}/64", "dev", "eth0", "nodad")
            ipn(peer.netns, "-6", "route", "add", "default", "via", f"{site_lan(k)}1")
        for rule in firewall_rules(lab.specs[name].inbound):  # type: ignore[attr-defined]
            nft(nat.netns, rule)
