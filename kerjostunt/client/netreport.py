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

__all__ = ["INBOUND", "PEER_KINDS", "NetReport", "inbound_of", "port_speed", "verdict", "format_text"]

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
        ("verdict", report.verdict),
    ]
    rows += [("problem", e) for e in report.errors]
    return "".join(f"{name:<16}{value}\n" for name, value in rows)
