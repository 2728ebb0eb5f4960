"""nftables rule sets for the lab's NAT boxes and its core router.

Pure text generation: nothing here runs a command, so the rule sets can be
read (and unit-tested) without root.  ``tests/natlab/lab.py`` loads them with
``nft -f -`` inside the right namespace.

How each behaviour is made (see docs/nat-lab.rst for the measured results):

- ``preserving``: plain ``masquerade``.  Linux keeps the source port whenever
  the resulting tuple is still unique, and every connection from one local
  ip:port gets the same public port, so the mapping is endpoint-independent.
- ``random``: ``masquerade random``.  With the random flag the kernel never
  tries to keep the port and draws a new one for every new 5-tuple
  (address-and-port-dependent mapping); the lab's smoke test checks the ports
  really are scattered.
- ``sequential``: ``snat to ADDR : numgen inc mod N map { 0 : P0, ... }``.
  Every new connection (NAT rules see only a connection's first packet) takes
  the next port of an explicit table ``P_i = base + i * delta``.  The plain
  ``numgen inc mod N offset X`` form cannot be used: nftables stores the
  generated number in host byte order and the NAT expression reads it as a
  network-order port, so the ports come out byte-swapped.
- inbound unsolicited SYN (a SYN to the public address that matches no
  mapping is delivered to the NAT box itself): ``rst`` adds nothing, the box's
  own TCP stack answers RST because nothing listens; ``drop`` drops new
  connections arriving on the WAN side; ``icmp`` rejects them with ICMP
  destination unreachable, administratively prohibited (the connecting side
  sees EHOSTUNREACH, which tells it apart from a RST's ECONNREFUSED).

Filtering is what conntrack gives: an inbound packet passes only when it is
the reply direction of an existing mapping (same remote ip:port), so a SYN
from the peer the local side is dialing passes once the local SYN has gone
out; this is what TCP hole punching (simultaneous open) relies on.  Packets
conntrack judges invalid (e.g. a SYN-ACK outside the window it learned) are
dropped in the forward chain, as a firewalling home router does, so no
un-translated private address ever leaves a NAT.
"""

from __future__ import annotations

ALLOCATIONS = ("preserving", "sequential", "random")
INBOUND = ("drop", "rst", "icmp")

#: First port of a sequential NAT's table (d > 0); a negative delta counts
#: down from SEQUENTIAL_TOP.
SEQUENTIAL_BASE = 20000
SEQUENTIAL_TOP = 60000
#: Largest number of entries in a sequential NAT's port table.  The counter
#: wraps after that many connections; large enough that a test never sees it.
SEQUENTIAL_MAX_ENTRIES = 2000


def sequential_ports(delta: int) -> list[int]:
    """The port table a sequential NAT with this delta walks through."""
    if delta == 0:
        raise ValueError("sequential delta must not be 0")
    if delta > 0:
        n = min(SEQUENTIAL_MAX_ENTRIES, (65535 - SEQUENTIAL_BASE) // delta + 1)
        return [SEQUENTIAL_BASE + i * delta for i in range(n)]
    n = min(SEQUENTIAL_MAX_ENTRIES, (SEQUENTIAL_TOP - 1024) // -delta + 1)
    return [SEQUENTIAL_TOP + i * delta for i in range(n)]


def nat_ruleset(
    *,
    allocation: str,
    delta: int,
    inbound: str,
    wan_if: str,
    public_ip: str,
) -> str:
    """The complete nft rule set of one NAT box."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}")
    if inbound not in INBOUND:
        raise ValueError(f"unknown inbound behaviour {inbound!r}")

    if allocation == "preserving":
        snat = "masquerade"
    elif allocation == "random":
        snat = "masquerade random"
    else:
        ports = sequential_ports(delta)
        elements = ", ".join(f"{i} : {p}" for i, p in enumerate(ports))
        snat = (
            f"meta l4proto tcp snat to {public_ip} : "
            f"numgen inc mod {len(ports)} map {{ {elements} }}\n"
            f'        oifname "{wan_if}" masquerade'
        )

    if inbound == "rst":
        unsolicited = "# rst: nothing listens on the box, its TCP stack answers RST"
    elif inbound == "drop":
        unsolicited = f'iifname "{wan_if}" ct state new drop'
    else:
        unsolicited = (
            f'iifname "{wan_if}" ct state new meta l4proto tcp '
            f"reject with icmp type admin-prohibited"
        )

    return f"""\
flush ruleset
table ip natlab_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan_if}" {snat}
    }}
}}
table inet natlab_filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        {unsolicited}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state invalid drop
        iifname "{wan_if}" ct state new drop
    }}
}}
"""


def core_queue_argvs(queue_num: int = 0) -> list[list[str]]:
    """The core router's rules: every packet goes to the delay daemon's
    queue as it arrives (PREROUTING) and as it leaves (POSTROUTING).

    Made with iptables (the nft compatibility layer, ``xt_NFQUEUE``) because
    this kernel has no ``nft_queue``: a native ``queue num N`` rule fails to
    load.  No ``--queue-bypass``: with the daemon gone packets are dropped,
    so a lab without its delays fails loudly instead of running fast.
    """
    return [
        ["iptables", "-w", "-t", "mangle", "-A", chain, "-j", "NFQUEUE",
         "--queue-num", str(queue_num)]
        for chain in ("PREROUTING", "POSTROUTING")
    ]
