"""
What the server tells one side about a call, and what a call ends with.

Pure helpers around the SIP messages of docs/protocol.rst ("Calls"): the
call parameters read from the forwarded INVITE or the 200 OK, our SDP offer,
the dial-in delay and the outcome body; the verified connection a call hands
to the application, and the failure it reports instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client import reasons
from kerjostunt.client.nat.relay import RelayPlan
from kerjostunt.wire import kerjo, turn
from kerjostunt.wire.candidates import Scope, screen
from kerjostunt.wire.kerjo import Outcome, RelayOffer
from kerjostunt.wire.sdp import (
    MAPPING_FOUNDATION,
    Candidate,
    SDPError,
    SessionDescription,
    candidate_priority,
    parse_sdp,
)
from kerjostunt.wire.sip.headers import parse_name_addr
from kerjostunt.wire.sip.message import Request, Response

Endpoint = tuple[str, int]

log = Logger()


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerConnection:
    """A verified connection to a peer; ``protocol`` is the application's."""

    peer_id: str
    protocol: object
    technique: str
    outcome: str  # 'direct' | 'stunt' | 'relay'
    remote: tuple[str, int]
    elapsed_ms: float


class ConnectFailed(Exception):
    """The peer could not be reached; ``code`` is the SIP status when there was one."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# -- pure helpers ----------------------------------------------------------------


@dataclass(frozen=True)
class CallSetup:
    """What the server told one side about a call (headers plus the peer's SDP)."""

    call_id: str
    secret: bytes
    role: str
    peer_public: str | None
    remote: SessionDescription
    peer_nat: str | None = None  # X-Kerjo-NAT as sent (birthday.parse_nat_header)
    relay: RelayOffer | None = None  # X-Kerjo-Relay: the TURN relay this call may use (docs/relay.rst)
    #: X-Kerjo-Probes: probe at most this many probe endpoints (None: all)
    probe_limit: int | None = None

    @property
    def handshake_id(self) -> str:
        """The call ID both peers feed the handshake MAC.

        The server is a back-to-back agent: each leg has its own SIP Call-ID
        and neither peer learns the other's, so the shared per-call secret is
        the only identifier both sides hold.
        """
        return hashlib.sha256(b"kerjostunt-1 call-id\0" + self.secret).hexdigest()[:32]


def read_setup(message: Request | Response) -> CallSetup:
    """The call parameters from the forwarded INVITE or the 200 OK; ValueError if unusable."""
    call_id = message.headers.get("Call-ID")
    if not call_id:
        raise ValueError("no Call-ID")
    headers = kerjo.parse_call_headers(message.headers.get)
    try:
        remote = parse_sdp(message.body)
    except SDPError as e:
        raise ValueError(f"bad SDP: {e}") from None
    if remote.punch_candidate is None and not remote.of_type("prflx"):
        raise ValueError("the peer's SDP has no punch candidate")
    return CallSetup(call_id, headers.secret, headers.role.value, headers.peer_public, remote, headers.nat,
                     _relay_offer(message), kerjo.parse_probes(message.headers.get(kerjo.PROBES)))


def _relay_offer(message: Request | Response) -> RelayOffer | None:
    """``X-Kerjo-Relay``, or None; an unusable one only costs the relay."""
    try:
        return kerjo.parse_relay_offer(message.headers.get(kerjo.RELAY))
    except ValueError as e:
        log.warn("ignoring an unusable relay offer: {why}", why=str(e))
        return None


def relay_candidate(relayed: Endpoint, mapped: Endpoint | None) -> Candidate:
    """Our TURN relayed address as an ICE-TCP ``typ relay`` candidate (RFC 6544: passive, it is dialed)."""
    raddr, rport = mapped if mapped is not None else (None, None)
    return Candidate("r1", 1, "TCP", candidate_priority("relay", "passive"), relayed[0], relayed[1],
                     "relay", "passive", raddr, rport)


def relay_plan(offer: RelayOffer, local_ip: str) -> RelayPlan:
    return RelayPlan(offer.servers, turn.Credentials(offer.username, offer.password), local_ip)


def dial_in_seconds(message: Request | Response) -> float:
    """``X-Kerjo-Dial-In`` (ms after receipt) in seconds, 0 when absent or odd."""
    return kerjo.parse_dial_in(message.headers.get(kerjo.DIAL_IN))


def build_offer(user: str, host_ip: str, punch_port: int, app_port: int | None, *,
                ipv6_punch: Endpoint | None = None, mapped: Endpoint | None = None) -> SessionDescription:
    """Our SDP: the punch port (``so``) and, if we listen, the app port (``passive``);
    a dual-stack side's IPv6 punch port (``so``), ranked first (RFC 8305: IPv6 first);
    and the gateway's mapping of the app port (``srflx passive``, foundation ``pm``)."""
    candidates = [
        Candidate("1", 1, "TCP", candidate_priority("host", "so"), host_ip, punch_port, "host", "so"),
    ]
    if app_port:
        candidates.append(
            Candidate("2", 1, "TCP", candidate_priority("host", "passive"), host_ip, app_port, "host", "passive")
        )
    if ipv6_punch is not None:
        # RFC 6544 priority: the same type and direction, a higher local preference.
        priority = candidate_priority("host", "so") + (1 << 8)
        candidates.insert(0, Candidate("6", 1, "TCP", priority, ipv6_punch[0], ipv6_punch[1], "host", "so"))
    if mapped is not None and app_port:
        candidates.append(Candidate(MAPPING_FOUNDATION, 1, "TCP", candidate_priority("srflx", "passive"),
                                    mapped[0], mapped[1], "srflx", "passive", raddr=host_ip, rport=app_port))
    return SessionDescription(user=user, host_ip=host_ip, candidates=candidates, punch_port=punch_port)


def outcome_body(outcome: str, technique: str, remote: Endpoint | None, elapsed_ms: float,
                 tried: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The INFO body of docs/protocol.rst ("Outcome"); ``tried`` is the race's ``Dialer.tried()``."""
    return Outcome(outcome, technique, remote, int(round(elapsed_ms)), tried).to_bytes()


def user_of(name_addr: str | None) -> str | None:
    """The user part of a From/To value, None when it does not parse."""
    try:
        return parse_name_addr(name_addr or "").uri.user
    except ValueError:
        return None


def tag_of(name_addr: str | None) -> str | None:
    """The tag of a From/To value, None when absent or unparsable."""
    try:
        return parse_name_addr(name_addr or "").tag
    except ValueError:
        return None


def reason_of(failure: Failure) -> str:
    """A failure in a few words, for logs and the attempts' error list."""
    return reasons.plain(failure)


def screened(setup: CallSetup, scope: Scope) -> SessionDescription:
    """The peer's SDP without the candidates we must not dial, each refusal logged.

    The server drops the same ones (server/calls/dialing.py); a client checks
    again because a server bug, or a server that lies, must not make it
    connect to its own loopback, a metadata address or its LAN.
    """
    kept, refused = screen(setup.remote.candidates, scope)
    if refused:
        log.warn("call {call}: not dialing {count} candidate(s) of the peer: {which}", call=setup.call_id,
                 count=len(refused), which=", ".join(f"{c.ip}:{c.port} {c.typ} ({why})" for c, why in refused[:8]))
    return replace(setup.remote, candidates=kept)
