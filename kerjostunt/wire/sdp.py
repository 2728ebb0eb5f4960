"""The SDP subset of docs/protocol.rst: ICE-TCP candidate lines and a punch port.

Pure (no Twisted, no I/O) so the server (``calls.py``) and the client share
it. ``parse_sdp`` checks syntax and bounds only; what a *client* may send
(exactly one ``host so`` punch candidate, no ``srflx``/``prflx``) is
``validate_offer``'s job, because the server's augmented bodies carry
``prflx``/``srflx`` lines that the client must still parse.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field, replace

__all__ = [
    "SDPError", "Candidate", "SessionDescription", "parse_sdp", "validate_offer",
    "candidate_priority", "MAX_SDP_BYTES", "MAX_RELAY_CANDIDATES", "MAX_CANDIDATES", "TYPES", "TCPTYPES",
    "MAPPING_FOUNDATION",
]

MAX_SDP_BYTES = 32 * 1024
MAX_CANDIDATES = 32
MAX_LINES = 256
#: relayed addresses a client may offer (one per TURN server it allocated on)
MAX_RELAY_CANDIDATES = 2

TYPES = ("host", "srflx", "prflx", "relay")
TCPTYPES = ("active", "passive", "so")
#: RFC 5245 type preferences
_TYPE_PREF = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}
#: RFC 6544 4.2 direction preferences (for hosts behind a NAT: so first)
_DIRECTION_PREF = {"so": 6, "active": 5, "passive": 4}

_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}\Z")
#: the foundation of a client's own ``srflx passive`` candidate: its gateway's port mapping
MAPPING_FOUNDATION = "pm"
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
_DIGITS = re.compile(r"[0-9]{1,10}\Z")
_EXTENSION = re.compile(r"[A-Za-z0-9._-]{1,32}\Z")


class SDPError(ValueError):
    """The body is not the SDP this protocol uses (answer 400)."""


def candidate_priority(typ: str, tcptype: str | None, component: int = 1, other: int = 8191) -> int:
    """RFC 6544 priority: type, then direction, then 'other' preference."""
    local = (_DIRECTION_PREF.get(tcptype or "", 0) << 13) + max(0, min(other, 8191))
    return (_TYPE_PREF.get(typ, 0) << 24) + (local << 8) + (256 - component)


@dataclass(frozen=True)
class Candidate:
    foundation: str
    component: int
    transport: str
    priority: int
    ip: str
    port: int
    typ: str
    tcptype: str | None
    raddr: str | None = None
    rport: int | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def to_line(self) -> str:
        """The ``a=candidate:`` line (no CRLF)."""
        parts = [f"a=candidate:{self.foundation}", str(self.component), self.transport,
                 str(self.priority), self.ip, str(self.port), "typ", self.typ]
        if self.raddr is not None and self.rport is not None:
            parts += ["raddr", self.raddr, "rport", str(self.rport)]
        if self.tcptype is not None:
            parts += ["tcptype", self.tcptype]
        return " ".join(parts)

    @classmethod
    def from_value(cls, value: str) -> Candidate:
        """Parse what follows ``a=candidate:``."""
        words = value.split(" ")
        if len(words) < 8 or words[6] != "typ":
            raise SDPError(f"bad candidate line: {value[:80]!r}")
        foundation, component, transport, priority, ip, port, _, typ = words[:8]
        if not _FOUNDATION.match(foundation):
            raise SDPError("bad candidate foundation")
        if transport.upper() != "TCP":
            raise SDPError("only TCP candidates are used")
        if typ not in TYPES:
            raise SDPError(f"bad candidate type {typ[:20]!r}")
        ext: dict[str, str] = {}
        rest = words[8:]
        if len(rest) % 2:
            raise SDPError("bad candidate extension attributes")
        for name, val in zip(rest[::2], rest[1::2]):
            if not _EXTENSION.match(name) or (name != "raddr" and not _EXTENSION.match(val)):
                raise SDPError("bad candidate extension attribute")
            if name in ext:
                raise SDPError(f"repeated candidate attribute {name}")
            ext[name] = val
        tcptype = ext.get("tcptype")
        if tcptype is not None and tcptype not in TCPTYPES:
            raise SDPError(f"bad tcptype {tcptype[:20]!r}")
        raddr = ext.get("raddr")
        rport = ext.get("rport")
        if (raddr is None) != (rport is None):
            raise SDPError("raddr and rport go together")
        return cls(
            foundation=foundation,
            component=_int(component, 1, 256, "component"),
            transport="TCP",
            priority=_int(priority, 1, 2**31 - 1, "priority"),
            ip=_ip(ip),
            port=_int(port, 0, 65535, "port"),
            typ=typ,
            tcptype=tcptype,
            raddr=_ip(raddr) if raddr is not None else None,
            rport=_int(rport, 0, 65535, "rport") if rport is not None else None,
        )


@dataclass
class SessionDescription:
    user: str
    host_ip: str
    candidates: list[Candidate] = field(default_factory=list)
    punch_port: int | None = None

    def to_bytes(self) -> bytes:
        family = "IP6" if ":" in self.host_ip else "IP4"
        media_port = self.punch_port if self.punch_port is not None else 9
        lines = [
            "v=0",
            f"o={self.user} 0 0 IN {family} {self.host_ip}",
            "s=kerjostunt",
            f"c=IN {family} {self.host_ip}",
            "t=0 0",
            f"m=application {media_port} TCP kerjo",
        ]
        lines += [c.to_line() for c in self.candidates]
        if self.punch_port is not None:
            lines.append(f"a=x-kerjo-punch-port:{self.punch_port}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # Conveniences for both sides.
    def of_type(self, typ: str, tcptype: str | None = None) -> list[Candidate]:
        return [c for c in self.candidates if c.typ == typ and (tcptype is None or c.tcptype == tcptype)]

    @property
    def punch_candidate(self) -> Candidate | None:
        """The ``host so`` candidate of the session's own address family (the probed punch port)."""
        found = [c for c in self.of_type("host", "so") if _family(c.ip) == _family(self.host_ip)]
        return found[0] if found else None

    def other_family(self, tcptype: str) -> list[Candidate]:
        """``host`` candidates of the family the session is not in: a dual-stack
        peer's IPv6 ones when it signals over IPv4 (issue 17, docs/punching.rst)."""
        return [c for c in self.of_type("host", tcptype) if _family(c.ip) != _family(self.host_ip)]

    def with_candidates(self, extra: list[Candidate]) -> SessionDescription:
        return replace(self, candidates=list(self.candidates) + list(extra))


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _int(text: str, low: int, high: int, what: str) -> int:
    if not _DIGITS.match(text):
        raise SDPError(f"bad {what}")
    value = int(text)
    if not low <= value <= high:
        raise SDPError(f"{what} out of range")
    return value


def _ip(text: str) -> str:
    address = _normalized_ip(text)
    if address is None:
        raise SDPError(f"bad address {text[:60]!r}")
    return address


@functools.lru_cache(maxsize=4096)
def _normalized_ip(text: str) -> str | None:
    """``ipaddress``'s strict parse, remembered: a peer's addresses repeat in every SDP
    (o=, c=, each candidate) and call, and parsing one costs more than the rest of its line."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_sdp(body: bytes) -> SessionDescription:
    """Parse syntax and bounds; unknown ``a=`` attributes and other lines are ignored."""
    if not isinstance(body, (bytes, bytearray)):
        raise SDPError("SDP must be bytes")
    if len(body) > MAX_SDP_BYTES:
        raise SDPError("SDP larger than 32 KiB")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise SDPError("SDP is not UTF-8") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != "v=0":
        raise SDPError("SDP must start with v=0")
    if len(lines) > MAX_LINES:
        raise SDPError("too many SDP lines")
    user: str | None = None
    host_ip: str | None = None
    candidates: list[Candidate] = []
    punch_port: int | None = None
    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha() or not line.isprintable():
            raise SDPError(f"bad SDP line {line[:60]!r}")
        kind, value = line[0], line[2:]
        if kind == "o":
            words = value.split(" ")
            if len(words) != 6 or words[4] not in ("IP4", "IP6") or not _USER.match(words[0]):
                raise SDPError("bad o= line")
            if user is not None:
                raise SDPError("more than one o= line")
            user, host_ip = words[0], _ip(words[5])
        elif kind == "c":
            words = value.split(" ")
            if len(words) != 3 or words[1] not in ("IP4", "IP6"):
                raise SDPError("bad c= line")
            _ip(words[2])
        elif kind == "a" and value.startswith("candidate:"):
            if len(candidates) >= MAX_CANDIDATES:
                raise SDPError("more than 32 candidates")
            candidates.append(Candidate.from_value(value[len("candidate:"):]))
        elif kind == "a" and value.startswith("x-kerjo-punch-port:"):
            if punch_port is not None:
                raise SDPError("more than one x-kerjo-punch-port")
            punch_port = _int(value[len("x-kerjo-punch-port:"):], 1, 65535, "punch port")
    if user is None or host_ip is None:
        raise SDPError("no o= line")
    return SessionDescription(user=user, host_ip=host_ip, candidates=candidates, punch_port=punch_port)


def validate_offer(description: SessionDescription) -> int:
    """The rules for a body a client sends; returns the punch port.

    Exactly one ``host so`` candidate of the session's address family,
    whose port ``a=x-kerjo-punch-port`` repeats, and at most one of the
    other family (a dual-stack client's IPv6 punch port); only ``host``
    candidates, ``so`` or ``passive``; at most ``MAX_RELAY_CANDIDATES``
    ``relay passive`` ones (a TURN relayed address the client allocated,
    docs/relay.rst); and at most one ``srflx passive`` of foundation
    ``pm``: the gateway's mapping of the client's app port.
    """
    relays = description.of_type("relay")
    if len(relays) > MAX_RELAY_CANDIDATES or any(c.tcptype != "passive" or c.port == 0 for c in relays):
        raise SDPError("relay candidates are tcptype passive, at most two")
    mapped = [c for c in description.candidates if c.typ == "srflx" and c.foundation == MAPPING_FOUNDATION]
    if len(mapped) > 1 or any(c.tcptype != "passive" for c in mapped):
        raise SDPError("at most one port mapping, a srflx passive candidate")
    for c in description.candidates:
        if c.typ == "relay" or c in mapped:
            continue
        if c.typ != "host":
            raise SDPError(f"clients send host and relay candidates only, not {c.typ}")
        if c.tcptype not in ("so", "passive"):
            raise SDPError("host candidates are tcptype so or passive")
        if c.port == 0:
            raise SDPError("candidate port 0")
    own = _family(description.host_ip)
    punch = [c for c in description.of_type("host", "so") if _family(c.ip) == own]
    if len(punch) != 1:
        raise SDPError("exactly one punch (tcptype so) candidate is required")
    if len(description.other_family("so")) > 1:
        raise SDPError("at most one punch (tcptype so) candidate of the other address family")
    if description.punch_port is None:
        raise SDPError("no a=x-kerjo-punch-port")
    if punch[0].port != description.punch_port:
        raise SDPError("a=x-kerjo-punch-port differs from the so candidate's port")
    return description.punch_port
