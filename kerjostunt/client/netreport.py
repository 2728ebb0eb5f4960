"""What ``kerjostunt netcheck`` found, and what it means for the user's calls.

Pure: no Twisted, no sockets.  ``client/netcheck.py`` measures and fills a
:class:`NetReport`; this module reads the NAT's behaviour out of the probe
samples (``wire/prediction.py``, the same classification the server runs on
every peer), turns the timed probes into a port speed, and says in plain
words who can reach the user.  The verdict asks ``prediction.no_technique``,
the rule the server refuses hopeless calls by (488), about a few kinds of
peer, so it says what the server will really do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kerjostunt.wire import prediction
from kerjostunt.wire.prediction import (
    APD,
    EI,
    PRESERVING,
    RANDOM,
    SEQUENTIAL,
    UNKNOWN,
    NATDescription,
    Sample,
    no_technique,
)

__all__ = ["INBOUND", "PEER_KINDS", "IPv6Check", "MappingCheck", "NetReport", "inbound_of", "other_paths",
           "port_speed", "verdict", "format_text"]

#: What an unsolicited SYN met, from the server's connect-back word (server/connectback.py)
INBOUND = {
    "connected": "open",
    "refused": "reset",
    "timeout": "dropped",
    "unreachable": "icmp",
}

_INBOUND_TEXT = {
    "open": "reaches you (no NAT or firewall in the way, or one that lets it in)",
    "reset": "reset (something answers RST)",
    "dropped": "dropped (no answer)",
    "icmp": "rejected with ICMP (destination unreachable)",
    "unknown": "could not tell",
}

#: The kinds of peer the verdict asks ``no_technique`` about, in the words it uses.
PEER_KINDS: tuple[tuple[str, NATDescription], ...] = (
    ("a public address", NATDescription(False, EI, PRESERVING, None, None)),
    ("port-preserving NATs", NATDescription(True, EI, PRESERVING, None, None)),
    ("sequential NATs", NATDescription(True, APD, SEQUENTIAL, 1, None)),
    ("random NATs", NATDescription(True, APD, RANDOM, None, None)),
)


def inbound_of(server_word: str | None, accepted: bool) -> str:
    """open / reset / dropped / icmp / unknown: our listener's view first, then the server's word."""
    if accepted:
        return "open"
    if server_word is None:
        return "unknown"
    inbound = INBOUND.get(server_word, "unknown")
    # The server connected, yet our listener saw nothing: something in between
    # (a proxy, a NAT forwarding the port elsewhere) took the connection.
    return "unknown" if inbound == "open" else inbound


def port_speed(before: Sample | None, after: Sample | None, nat: NATDescription) -> float | None:
    """Ports per second other hosts took from the NAT between two timed probes, or None.

    Only a sequential NAT has a counter to watch: between the two probes we
    made one connection ourselves (the second probe), so every further step
    of ``delta`` is another host's connection.  A punch is aimed at ports
    predicted from the last probe; this says how fast that prediction ages.
    """
    if before is None or after is None or nat.allocation != SEQUENTIAL or not nat.delta:
        return None
    elapsed = after.time - before.time
    if elapsed <= 0 or before.mapped_ip != after.mapped_ip:
        return None
    moved = (after.mapped_port - before.mapped_port) // nat.delta  # connections, ours included
    return max(0, moved - 1) * abs(nat.delta) / elapsed


@dataclass
class IPv6Check:
    """IPv6 (issue 17): no NAT there, only a firewall; peers with IPv6 punch through it."""

    #: this host's global IPv6 address (the one a call offers), None: it has none
    address: str | None = None
    #: the server's IPv6 address (announced in its probe answer, or --server's), None: it named none
    server: str | None = None
    reached: bool = False
    #: the address the server saw us at (ours: no NAT66 in the way)
    mapped: str | None = None
    rtt_ms: float | None = None
    connect_back: str | None = None
    inbound: str = "unknown"
    #: why it was not tested or did not work, in words
    detail: str = ""


@dataclass
class MappingCheck:
    """The gateway's port mapping (PCP, NAT-PMP, UPnP-IGD: ``nat/portmap.py``), asked and deleted."""

    asked: bool = False
    method: str | None = None
    internal_port: int | None = None
    external_ip: str | None = None
    external_port: int | None = None
    lifetime: int | None = None
    deleted: bool | None = None
    #: each method's refusal, or why nothing was asked
    errors: list[str] = field(default_factory=list)


@dataclass
class NetReport:
    """Everything one netcheck run measured (``--json`` prints it as it is, plus the verdict)."""

    server: str
    probe_ports: tuple[int, ...]
    local_ip: str
    #: the server's second address (OTHER-ADDRESS), when it has one
    other_address: str | None = None
    public_ip: str | None = None
    public_port: int | None = None
    nat: NATDescription = field(default_factory=lambda: NATDescription(True, UNKNOWN, UNKNOWN, None, None))
    ports_per_second: float | None = None
    #: the server's connect-back word and what it means
    connect_back: str | None = None
    inbound: str = "unknown"
    hairpin: bool | None = None
    hairpin_detail: str = ""
    rtt_ms: float | None = None
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ipv6: IPv6Check = field(default_factory=IPv6Check)
    port_mapping: MappingCheck = field(default_factory=MappingCheck)

    def classify(self) -> None:
        """The NAT from the samples (as the server classifies a peer's probes)."""
        if self.samples:
            self.nat = prediction.classify(self.samples)
            last = self.samples[-1]
            self.public_ip = last.mapped_ip

    @property
    def verdict(self) -> str:
        return verdict(self.nat, self.inbound)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["nat"] = self.nat.to_dict()
        out["probe_ports"] = list(self.probe_ports)
        out["verdict"] = self.verdict
        out["other_paths"] = other_paths(self)
        out["unreachable_peers"] = unreachable_kinds(self.nat)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


def unreachable_kinds(nat: NATDescription) -> list[str]:
    """The kinds of peer no direct technique joins us with (only a relay would)."""
    if nat.allocation == UNKNOWN and nat.behind_nat:
        return []
    return [kind for kind, peer in PEER_KINDS if no_technique(nat, peer)]


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def verdict(nat: NATDescription, inbound: str) -> str:
    """One sentence for the user: who can reach them directly, who needs a relay."""
    if not nat.behind_nat:
        if inbound == "open":
            return "you have a public address: peers behind any NAT can reach you directly"
        return ("you have a public address behind a firewall that stops unsolicited connections: "
                "peers behind most NATs can still reach you directly (by hole punching)")
    if nat.allocation == UNKNOWN or nat.mapping == UNKNOWN:
        return "could not tell how your NAT maps ports (too few probes answered): try again"
    failing = unreachable_kinds(nat)
    if not failing:
        return "peers behind most NATs can reach you directly"
    reachable = [kind for kind, _ in PEER_KINDS if kind not in failing]
    text = f"only a relay will join you to peers behind {_join(failing)}"
    if reachable:
        return f"{text}; peers with {_join(reachable)} can reach you directly"
    return text


def other_paths(report: NetReport) -> list[str]:
    """The verdict's further sentences: direct paths besides the IPv4 NAT's (a mapping, IPv6)."""
    lines = []
    pm = report.port_mapping
    if pm.method is not None and report.nat.behind_nat:
        granted = f"{pm.method} mapped port {pm.internal_port} to {pm.external_ip}:{pm.external_port}"
        if pm.external_ip == report.public_ip:
            # The server's relay-only rule (prediction.no_technique, its 488) judges the NAT alone.
            caveat = "" if not unreachable_kinds(report.nat) else " (the relay-only rule above does not count it yet)"
            lines.append(f"a port mapping makes your NAT reachable directly ({granted}): "
                         f"peers connect to it without punching{caveat}")
        else:
            lines.append(f"the gateway granted a port mapping ({granted}), but your public address is "
                         f"{report.public_ip}: another NAT beyond it, so the mapping does not reach you")
    v6 = report.ipv6
    if v6.reached:
        lines.append("IPv6 works: peers with IPv6 reach you directly")
    elif v6.address is not None and v6.server is not None:
        lines.append(f"you have an IPv6 address but it does not reach the server ({v6.detail}): "
                     "IPv6 will not help your calls")
    return lines


def _ipv6_rows(v6: IPv6Check) -> list[tuple[str, str]]:
    if v6.address is None or v6.server is None or not v6.reached:
        return [("IPv6", v6.detail or "not tested")]
    via = "" if v6.mapped in (None, v6.address) else f" (seen as {v6.mapped}: a NAT66 in the way)"
    rtt = "" if v6.rtt_ms is None else f", RTT {v6.rtt_ms:.1f} ms"
    return [("IPv6", f"{v6.address} reaches the server at [{v6.server}]{via}{rtt}"),
            ("IPv6 inbound", _INBOUND_TEXT.get(v6.inbound, v6.inbound))]


def _mapping_row(pm: MappingCheck) -> str:
    if pm.method is None:
        why = "; ".join(pm.errors) or "no answer"
        return f"no port mapping ({why})" if pm.asked else f"not asked ({why})"
    deleted = {True: "deleted again", False: "deleting it failed", None: "not deleted"}[pm.deleted]
    return (f"{pm.method} mapped port {pm.internal_port} to {pm.external_ip}:{pm.external_port} "
            f"for {pm.lifetime} s ({deleted})")


def _nat_line(nat: NATDescription) -> str:
    if not nat.behind_nat:
        return "none (your address is public)"
    allocation = nat.allocation
    if nat.allocation == SEQUENTIAL and nat.delta is not None:
        allocation += f" (step {nat.delta:+d})"
    return f"mapping {nat.mapping}, allocation {allocation}"


def format_text(report: NetReport) -> str:
    """The human-readable report, one fact a line."""
    extra = f"; second address {report.other_address}" if report.other_address else "; no second address"
    public = "-" if report.public_ip is None else f"{report.public_ip}:{report.public_port}"
    speed = ("-" if report.ports_per_second is None
             else f"{report.ports_per_second:.1f} ports/s taken by other hosts")
    if report.hairpin is None:
        hairpin = report.hairpin_detail or "not tested"
    else:
        hairpin = "yes" if report.hairpin else f"no ({report.hairpin_detail})"
    rtt = "-" if report.rtt_ms is None else f"{report.rtt_ms:.1f} ms"
    rows = [
        ("server", f"{report.server} (probe ports {', '.join(map(str, report.probe_ports))}{extra})"),
        ("local address", report.local_ip),
        ("public address", public),
        ("NAT", _nat_line(report.nat)),
        ("port speed", speed),
        ("unsolicited SYN", _INBOUND_TEXT.get(report.inbound, report.inbound)),
        ("hairpinning", hairpin),
        ("server RTT", rtt),
        *_ipv6_rows(report.ipv6),
        ("port mapping", _mapping_row(report.port_mapping)),
        ("verdict", report.verdict),
        *(("", line) for line in other_paths(report)),
    ]
    rows += [("problem", e) for e in report.errors]
    return "".join(f"{name:<16}{value}\n" for name, value in rows)
