"""kerjostunt's own parts of the wire, each written and read in one place.

SIP, STUN and SDP are standards with their own modules; what is ours rides on
them as ``X-Kerjo-*`` headers and one INFO body (docs/protocol.rst). The
server writes most of them and the client reads them (the outcome body goes
the other way), so each element has its format and its parse side by side
here and neither side can drift from the other.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from kerjostunt.wire.prediction import UNKNOWN, NATDescription

#: the per-call secret (hex) both peers key the handshake with
CALL_SECRET = "X-Kerjo-Call-Secret"
#: which side opens the per-call handshake (simultaneous open leaves both
#: sides believing they dialed)
ROLE = "X-Kerjo-Role"
#: the other side's NAT as the server classified it
NAT = "X-Kerjo-NAT"
#: the other side's public address as the server saw it
PEER_PUBLIC = "X-Kerjo-Peer-Public"
#: milliseconds after receipt at which to start dialing
DIAL_IN = "X-Kerjo-Dial-In"
#: the forwarded INVITE and the 200 OK: the TURN relay this call may use, with its credential
RELAY = "X-Kerjo-Relay"
#: REGISTER's 200 OK: the probe token, its password and the probe ports
PROBE = "X-Kerjo-Probe"
#: REGISTER's 200 OK: the probe service's second address, if it has one
PROBE_ALT_IP = "X-Kerjo-Probe-Alt-IP"
#: a REGISTER's digest algorithms the client computes beyond MD5 (``SHA-256``): the server
#: offers them only to clients that name them, because common SIP tools (baresip 1.0)
#: give up at the sight of any challenge they cannot compute (docs/protocol.rst)
DIGEST = "X-Kerjo-Digest"
#: the server's own addresses that serve the probe ports, both families (issue 17)
PROBE_IPS = "X-Kerjo-Probe-IPs"
#: REGISTER: the gateway's mapping of the client's app port (PCP, NAT-PMP, UPnP-IGD), ``ip:port``;
#: the server keeps it with the binding when the address is the public one it sees (issue 17)
PORT_MAPPING = "X-Kerjo-Port-Mapping"
#: the forwarded INVITE: probe at most this many probe endpoints for the call (absent: all).
#: ``1`` behind a NAT the server already knows (a sequential one: it needs only its newest port)
PROBES = "X-Kerjo-Probes"

#: Content-Type of the outcome INFO body
OUTCOME_CONTENT_TYPE = "application/x-kerjo-outcome"
MAX_OUTCOME_BYTES = 1024
#: a larger dial-in is a server bug, not a plan (seconds)
MAX_DIAL_IN = 10.0

#: The reason phrase of a 480 when the callee is offline and its calls with the caller failed since
#: their last success (the callee gave the pair up and closed its signaling): the caller counts it
#: as the pair's failure, not as an absence (issue 12, docs/protocol.rst).
PAIR_FAILED_REASON = "Temporarily Unavailable: offline, and your calls failed"
#: The start of a 488's reason phrase when no technique can join the two NATs as the server's
#: probes describe them (prediction.no_technique): the caller gives the pair up at once.
NO_TECHNIQUE_REASON = "Not Acceptable Here: no technique joins these NATs"
#: The reason phrase of a 491: the callee's own call to the caller waits for its turn at a NAT
#: (server/calls/lanes.py) and will connect them.
CROSSING_REASON = "Request Pending: the peer is calling you"

Endpoint = tuple[str, int]
#: how a parser reads one header: ``message.headers.get``
HeaderGetter = Callable[[str], "str | None"]


class Role(str, Enum):
    """``X-Kerjo-Role``: the handshake initiator speaks first."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


# -- tags and branches -------------------------------------------------------------


def new_tag() -> str:
    """A From/To tag: 48 random bits, as RFC 3261 19.3 asks (at least 32)."""
    return secrets.token_hex(6)


def new_branch() -> str:
    """A Via branch with RFC 3261's magic cookie and 80 random bits."""
    return "z9hG4bK" + secrets.token_hex(10)


# -- endpoints ---------------------------------------------------------------------


def format_endpoint(endpoint: Endpoint) -> str:
    """``ip:port``, with brackets around an IPv6 address."""
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    """The inverse of :func:`format_endpoint`; ValueError unless an IP literal and a port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("bad endpoint")
    return str(ipaddress.ip_address(host)), int(port)


# -- the outcome INFO body ---------------------------------------------------------

OUTCOMES = ("direct", "stunt", "relay", "failed")
TECHNIQUES = ("lan", "public", "simultaneous-open", "low-ttl", "accepted", "birthday", "ipv6", "port-mapping",
              "relay", "none")
_OUTCOME_KEYS = ("outcome", "technique", "remote", "elapsed_ms", "tried")
_KEY_VALUE = re.compile(r"([a-z_]{1,16})=([\x21-\x7e]{1,64})\Z")
#: ``tried``: what the side's race attempted, in order (docs/protocol.rst "Outcome")
TRIED_TECHNIQUES = ("lan", "public", "punch", "birthday", "simultaneous-open", "low-ttl", "accepted", "relay",
                    "ipv6", "port-mapping")
TRIED_RESULTS = ("connected", "handshake", "refused", "timeout", "unreachable", "reset", "skipped",
                 "cancelled", "failed")
MAX_TRIED = 12
_TRIED = re.compile(r"tried=((?:[a-z0-9-]{1,20}:[a-z]{1,12},){0,11}[a-z0-9-]{1,20}:[a-z]{1,12})\Z")
_MAX_ELAPSED_MS = 3_600_000


class OutcomeError(ValueError):
    """An outcome body we cannot use (the server answers 400)."""


@dataclass(frozen=True)
class Outcome:
    """What one side reports about a call: how it connected, or that it did not."""

    outcome: str
    technique: str
    remote: Endpoint | None
    elapsed_ms: int | None
    #: (technique, result) in the order the race started them (``TRIED_*``)
    tried: tuple[tuple[str, str], ...] = ()

    @property
    def success(self) -> bool:
        return self.outcome != "failed"

    def to_bytes(self) -> bytes:
        """The body of docs/protocol.rst ("Outcome"); a failed outcome names no remote."""
        lines = [f"outcome={self.outcome}", f"technique={self.technique}"]
        if self.remote is not None and self.outcome != "failed":
            lines.append(f"remote={format_endpoint(self.remote)}")
        if self.elapsed_ms is not None:
            lines.append(f"elapsed_ms={self.elapsed_ms}")
        if self.tried:
            lines.append("tried=" + ",".join(f"{t}:{r}" for t, r in self.tried[:MAX_TRIED]))
        return ("\n".join(lines) + "\n").encode("ascii")


def parse_outcome(body: bytes) -> Outcome:
    """Strict: known keys once each, ``key=value`` lines, bounded."""
    values = _outcome_fields(body)
    outcome = values.get("outcome")
    if outcome not in OUTCOMES:
        raise OutcomeError("outcome must be direct, stunt or failed")
    technique = values.get("technique")
    if technique not in TECHNIQUES:
        raise OutcomeError("bad or missing technique")
    remote = None
    if "remote" in values:
        if outcome == "failed":
            raise OutcomeError("a failed outcome has no remote")
        try:
            remote = parse_endpoint(values["remote"])
        except ValueError:
            raise OutcomeError("bad remote endpoint") from None
    elif outcome != "failed":
        raise OutcomeError("remote is required when connected")
    elapsed = None
    if "elapsed_ms" in values:
        if not values["elapsed_ms"].isdigit() or int(values["elapsed_ms"]) > _MAX_ELAPSED_MS:
            raise OutcomeError("bad elapsed_ms")
        elapsed = int(values["elapsed_ms"])
    return Outcome(outcome, technique, remote, elapsed, _parse_tried(values.get("tried")))


def _parse_tried(value: str | None) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    tried = []
    for entry in value.split(","):
        technique, _, result = entry.partition(":")
        if technique not in TRIED_TECHNIQUES or result not in TRIED_RESULTS:
            raise OutcomeError(f"bad tried entry {entry[:40]!r}")
        tried.append((technique, result))
    return tuple(tried)


def _outcome_fields(body: bytes) -> dict[str, str]:
    if len(body) > MAX_OUTCOME_BYTES:
        raise OutcomeError("outcome body too large")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise OutcomeError("outcome body is not ASCII") from None
    values: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            continue
        tried = _TRIED.match(line)  # the one longer value
        match = _KEY_VALUE.match(line)
        if tried is not None:
            key, value = "tried", tried.group(1)
        elif match is not None:
            key, value = match.groups()
        else:
            raise OutcomeError(f"bad outcome line {line[:40]!r}")
        if key not in _OUTCOME_KEYS:
            raise OutcomeError(f"unknown outcome key {key!r}")
        if key in values:
            raise OutcomeError(f"repeated outcome key {key!r}")
        values[key] = value
    return values


# -- X-Kerjo-NAT -------------------------------------------------------------------


def format_nat(nat: NATDescription, confidence: float) -> str:
    """``mapping=...; allocation=...; delta=...; confidence=...``."""
    delta = "none" if nat.delta is None else str(nat.delta)
    return f"mapping={nat.mapping}; allocation={nat.allocation}; delta={delta}; confidence={confidence:.2f}"


def parse_nat(value: str | None) -> NATDescription | None:
    """The peer's NAT from :func:`format_nat`'s text; None when absent or unreadable.

    Lenient on purpose: the client only uses it to choose a technique, and an
    unknown field must not fail a call.
    """
    if not value:
        return None
    fields = _semicolon_params(value)
    if "mapping" not in fields and "allocation" not in fields:
        return None
    delta: int | None
    try:
        delta = int(fields.get("delta", "none"))
    except ValueError:
        delta = None
    return NATDescription(
        behind_nat=True,
        mapping=fields.get("mapping", UNKNOWN),
        allocation=fields.get("allocation", UNKNOWN),
        delta=delta,
        public_ip=None,
    )


def _semicolon_params(value: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, val = part.partition("=")
        if sep:
            fields[key.strip().lower()] = val.strip()
    return fields


# -- X-Kerjo-Digest ----------------------------------------------------------------


def format_digest(algorithms: Sequence[str]) -> str:
    """``X-Kerjo-Digest``: the digest algorithms a client computes, comma-separated."""
    return ", ".join(algorithms)


def parse_digest(value: str | None) -> frozenset[str]:
    """The algorithms an ``X-Kerjo-Digest`` names, upper case; empty for none or garbage."""
    if not value:
        return frozenset()
    return frozenset(part.strip().upper() for part in value.split(",")[:8] if 0 < len(part.strip()) <= 16)


# -- X-Kerjo-Dial-In ---------------------------------------------------------------


def format_dial_in(ms: int) -> str:
    return str(ms)


def parse_dial_in(value: str | None) -> float:
    """Seconds after receipt; 0 when absent or odd, at most :data:`MAX_DIAL_IN`."""
    try:
        ms = float((value or "").strip())
    except ValueError:
        return 0.0
    if ms != ms or ms < 0:  # NaN or negative
        return 0.0
    return min(ms / 1000.0, MAX_DIAL_IN)


# -- the call headers of the forwarded INVITE and of the 200 OK ---------------------


@dataclass(frozen=True)
class CallHeaders:
    """What the server adds to each side's INVITE or 200 OK besides the SDP."""

    secret: bytes
    role: Role
    nat: str | None
    peer_public: str | None

    def items(self) -> list[tuple[str, str]]:
        headers = [(CALL_SECRET, self.secret.hex()), (ROLE, self.role.value)]
        if self.nat is not None:
            headers.append((NAT, self.nat))
        if self.peer_public is not None:
            headers.append((PEER_PUBLIC, self.peer_public))
        return headers


def parse_call_headers(get: HeaderGetter) -> CallHeaders:
    """ValueError when the secret or the role is unusable; NAT and public address are optional."""
    secret_hex = (get(CALL_SECRET) or "").strip()
    try:
        secret = bytes.fromhex(secret_hex)
    except ValueError:
        raise ValueError(f"{CALL_SECRET} is not hex") from None
    if len(secret) < 16:
        raise ValueError(f"no usable {CALL_SECRET}")
    role = (get(ROLE) or "").strip().lower()
    try:
        parsed_role = Role(role)
    except ValueError:
        raise ValueError(f"bad {ROLE} {role[:20]!r}") from None
    peer_public = (get(PEER_PUBLIC) or "").strip() or None
    nat = (get(NAT) or "").strip() or None
    return CallHeaders(secret, parsed_role, nat, peer_public)


def parse_probes(value: str | None) -> int | None:
    """``X-Kerjo-Probes``: how many probe endpoints to probe; None (all) when absent or unusable."""
    text = (value or "").strip()
    if not text.isdigit() or len(text) > 2:
        return None
    return int(text)


# -- X-Kerjo-Relay -----------------------------------------------------------------

#: the relay's moments: at the dial moment beside the other techniques, or once they failed
RELAY_NOW, RELAY_FALLBACK = "now", "fallback"
_RELAY_CREDENTIAL = re.compile(r"[A-Za-z0-9:._+/=@-]{1,128}\Z")


@dataclass(frozen=True)
class RelayOffer:
    """``X-Kerjo-Relay``: TURN servers (tried in order), a time-limited credential, and when to relay.

    ``servers=203.0.113.1:3478,203.0.113.2:3478; username=1733100000:alice;
    password=BASE64; when=now`` (docs/protocol.rst, docs/relay.rst).
    """

    servers: tuple[Endpoint, ...]
    username: str
    password: str
    when: str = RELAY_NOW

    def value(self) -> str:
        servers = ",".join(format_endpoint(s) for s in self.servers)
        return f"servers={servers}; username={self.username}; password={self.password}; when={self.when}"


def parse_relay_offer(value: str | None) -> RelayOffer | None:
    """None when absent; ValueError when present but unusable (the call goes on without a relay)."""
    if not value or not value.strip():
        return None
    fields = _semicolon_params(value)
    try:
        servers = tuple(parse_endpoint(s.strip()) for s in fields.get("servers", "").split(",") if s.strip())
    except ValueError:
        raise ValueError(f"bad {RELAY} servers") from None
    username, password = fields.get("username", ""), fields.get("password", "")
    when = fields.get("when", RELAY_NOW).lower()
    if not servers or len(servers) > 8:
        raise ValueError(f"{RELAY} names no server")
    if not _RELAY_CREDENTIAL.match(username) or not _RELAY_CREDENTIAL.match(password):
        raise ValueError(f"bad {RELAY} credential")
    if when not in (RELAY_NOW, RELAY_FALLBACK):
        raise ValueError(f"bad {RELAY} when={when[:20]!r}")
    return RelayOffer(servers, username, password, when)


# -- X-Kerjo-Probe -----------------------------------------------------------------


@dataclass(frozen=True)
class ProbeOffer:
    """What REGISTER's 200 OK says about probing: token, password, ports, lifetime."""

    token: str
    password: str
    ports: tuple[int, ...]
    expires: int
    alt_ip: str | None = None
    #: the server's addresses serving the probe ports (a dual-stack client probes
    #: the other family's once, so the server learns its address there too)
    ips: tuple[str, ...] = ()

    def items(self) -> list[tuple[str, str]]:
        ports = ",".join(str(p) for p in self.ports)
        value = f"token={self.token}; password={self.password}; ports={ports}; expires={self.expires}"
        headers = [(PROBE, value)]
        if self.alt_ip:
            headers.append((PROBE_ALT_IP, self.alt_ip))
        if self.ips:
            headers.append((PROBE_IPS, ", ".join(self.ips)))
        return headers


def parse_probe_ips(value: str | None) -> tuple[str, ...]:
    """``X-Kerjo-Probe-IPs``: the IP literals in it (anything else is skipped), at most 8."""
    found: list[str] = []
    for part in (value or "").split(",")[:8]:
        try:
            found.append(str(ipaddress.ip_address(part.strip())))
        except ValueError:
            continue
    return tuple(found)


def parse_probe_offer(value: str, alt_ip: str | None, ips: str | None = None) -> ProbeOffer:
    """ValueError when a field is missing or not a number."""
    params = _semicolon_params(value)
    try:
        return ProbeOffer(
            token=params["token"],
            password=params["password"],
            ports=tuple(int(p) for p in params["ports"].split(",") if p),
            expires=int(params.get("expires", "0") or 0),
            alt_ip=alt_ip,
            ips=parse_probe_ips(ips),
        )
    except KeyError as missing:
        raise ValueError(f"{PROBE} has no {missing}") from None

