"""When and where each side dials: the dial moments, the predictions, the candidates the server adds.

Pure functions of what the server knows about both sides (round-trip times,
probe samples, the offered SDP); the call machine puts their results into
the forwarded INVITE, the 200 and the ACK (docs/protocol.rst, "Calls").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from twisted.logger import Logger

from kerjostunt.wire import kerjo
from kerjostunt.wire.candidates import Scope, is_loopback, normalized, screen
from kerjostunt.wire.prediction import (
    RANDOM,
    UNKNOWN,
    NATDescription,
    Prediction,
    Sample,
    classify,
    predict,
    wrap_port,
)
from kerjostunt.wire.sdp import (
    MAPPING_FOUNDATION,
    Candidate,
    SDPError,
    SessionDescription,
    candidate_priority,
    parse_sdp,
    validate_offer,
)

log = Logger(namespace="kerjostunt.server.calls")

#: how many predicted ports each side gets (a window for sequential NATs)
PREDICTION_WINDOW = 4
#: the window behind a sequential NAT other hosts use too (lanes.py): their probes between a
#: prediction and its punch move the counter on by a few steps (NAT lab group: 2-3 of d=4)
LANE_WINDOW = 8
#: at most this many candidate lines in an SDP (docs/protocol.rst)
MAX_SDP_CANDIDATES = 32
#: a client's SDP may carry this many candidate lines; the server adds at most
#: PREDICTION_WINDOW prflx and MAX_SRFLX srflx lines so every SDP stays <= 32
MAX_OFFER_CANDIDATES = 16
MAX_SRFLX = 12
#: used when a connection's RTT has not been measured yet (seconds)
DEFAULT_RTT = 0.100
DIAL_MARGIN_MS = 30.0


def dial_in_ms(rtt_a: float | None, rtt_b: float | None) -> tuple[int, int]:
    """protocol.rst: both start max(ra, rb)/2 + 30 ms from now, each told relative to receipt."""
    ra = (rtt_a if rtt_a is not None else DEFAULT_RTT) * 1000.0
    rb = (rtt_b if rtt_b is not None else DEFAULT_RTT) * 1000.0
    top = max(ra, rb)
    return round((top - ra) / 2 + DIAL_MARGIN_MS), round((top - rb) / 2 + DIAL_MARGIN_MS)


def format_endpoint(endpoint: tuple[str, int] | None) -> str | None:
    """An attempt row's endpoint text (None stays None)."""
    return None if endpoint is None else kerjo.format_endpoint(endpoint)


def nat_header(prediction: Prediction) -> str:
    """The ``X-Kerjo-NAT`` value that tells the other side about this one."""
    return kerjo.format_nat(prediction.nat, prediction.confidence)


def offers_mapping(sd: SessionDescription, public_ip: str) -> bool:
    """The side offers its gateway's port mapping (``srflx`` ``pm``) at the public address the
    server sees it at: the peer can dial it whatever the two NATs do (``augmented`` passes it on)."""
    return any(c.foundation == MAPPING_FOUNDATION and c.ip == public_ip for c in sd.of_type("srflx", "passive"))


def augmented(sd: SessionDescription, prediction: Prediction, public_ip: str,
              scope: Scope | None = None) -> SessionDescription:
    """The side's own SDP plus predicted (prflx) and public passive (srflx) candidates.

    With a ``scope`` (who receives it), only what the other side may dial
    (``wire.candidates``): the rest is dropped, and a dropped host address
    is not named in ``raddr`` or ``o=`` either. A port mapping the side
    offers (``srflx`` ``pm``) is passed on only when it names the public
    address the server sees the side at: nobody else's.
    """
    punch = sd.punch_candidate
    assert punch is not None and sd.punch_port is not None
    own, refused = screen(sd.candidates, scope) if scope is not None else (list(sd.candidates), [])
    own = [c for c in own if c.typ != "srflx" or c.ip == public_ip]
    hidden = {c.ip for c, _ in refused}

    def based(candidate: Candidate, ip: str, port: int) -> Candidate:
        return candidate if ip in hidden else replace(candidate, raddr=ip, rport=port)

    extra = [
        based(Candidate(f"p{i + 1}", 1, "TCP", candidate_priority("prflx", "so") - i, prediction.ip, port,
                        "prflx", "so"), punch.ip, sd.punch_port)
        for i, port in enumerate(prediction.ports[:LANE_WINDOW])
    ]
    room = max(0, min(MAX_SRFLX, MAX_SDP_CANDIDATES - len(sd.candidates) - len(extra)))
    extra += [
        based(Candidate(f"s{j + 1}", 1, "TCP", candidate_priority("srflx", "passive") - j, public_ip, c.port,
                        "srflx", "passive"), c.ip, c.port)
        # Only the signaling family's: the public IPv4 address says nothing of an IPv6 listener.
        for j, c in enumerate([c for c in sd.of_type("host", "passive") if (":" in c.ip) == (":" in public_ip)][:room])
    ]
    if scope is not None:
        extra, dropped = screen(extra, scope)
        refused += dropped
    if refused:
        log.info("Not forwarding {count} candidate(s) of {user}: {which}", count=len(refused), user=sd.user,
                 which=", ".join(f"{c.ip}:{c.port} {c.typ} ({why})" for c, why in refused[:8]))
    host_ip = public_ip if sd.host_ip in hidden else sd.host_ip
    return replace(sd, host_ip=host_ip, candidates=own + extra)


def local_addresses(*conns: object) -> frozenset[str]:
    """The server's addresses as these connections reach it (``getHost``): with a wildcard
    listener the settings name none, but every peer's connection does."""
    found: set[str] = set()
    for conn in conns:
        transport = getattr(conn, "transport", None)
        host = getattr(transport.getHost(), "host", None) if transport is not None else None
        address = normalized(host) if isinstance(host, str) else None
        if address is not None:
            found.add(address)
    return frozenset(found)


def scope_between(from_ip: str, to_ip: str, server_addresses: frozenset[str]) -> Scope:
    """The candidate rule's view of one side's SDP on its way to the other.

    One public address for both: one LAN (private host candidates pass);
    that address on loopback: one host (loopback passes too).
    """
    same = from_ip == to_ip
    return Scope(same_network=same, local=same and is_loopback(from_ip), own=server_addresses)


def predict_for(user_id: str, sdp: SessionDescription, samples: Sequence[Sample], signaling_ip: str) -> Prediction:
    """From the probes of exactly the SDP's punch port; else the signaling address, low confidence."""
    punch = sdp.punch_port
    assert punch is not None
    if any(s.local_port == punch for s in samples):
        try:
            return predict(samples, local_port=punch, window=PREDICTION_WINDOW)
        except Exception:
            log.failure("Prediction failed for {user}", user=user_id)
    nat = classify(samples) if samples else NATDescription(True, UNKNOWN, UNKNOWN, None, signaling_ip)
    return Prediction(signaling_ip, (punch,), 0.1, nat)


def preserved(prediction: Prediction, nat: NATDescription, sdp: SessionDescription) -> Prediction:
    """The prediction for a side whose NAT keeps ports (seen from all its hosts), not its own few probes.

    The punch port itself first, then the mapping its probes got (a
    collision with another host gives some other port).
    """
    punch = sdp.punch_port
    assert punch is not None
    ports = tuple(dict.fromkeys([punch, *prediction.ports]))[:PREDICTION_WINDOW]
    return Prediction(prediction.ip, ports, max(prediction.confidence, 0.85), nat)


def parse_offer(body: bytes) -> SessionDescription:
    """An offer or answer SDP the server will augment and pass on; SDPError if it cannot."""
    sdp = parse_sdp(body)
    validate_offer(sdp)
    if len(sdp.candidates) > MAX_OFFER_CANDIDATES:
        raise SDPError(f"at most {MAX_OFFER_CANDIDATES} candidates")
    return sdp


def shifted(prediction: Prediction, latest_port: int, unseen: int) -> Prediction:
    """A sequential NAT's window counted from its newest observed port plus ``unseen`` mappings.

    With ``latest_port`` the side's own newest mapping and nothing unseen,
    this is the prediction itself.  With unseen mappings (other calls'
    punches since the newest probe) the step below the estimate is kept
    last, in case one of them never left.
    """
    d = prediction.nat.delta
    if not d:
        return prediction
    start = latest_port + d * (1 + unseen)
    steps = [*range(LANE_WINDOW - 1), -1] if unseen else list(range(LANE_WINDOW))
    ports: list[int] = []
    for k in steps:
        port = wrap_port(start + k * d)
        if port not in ports:
            ports.append(port)
    return Prediction(prediction.ip, tuple(ports), prediction.confidence, prediction.nat)


def new_mappings(dialed: SessionDescription, prediction: Prediction, public_ip: str) -> int:
    """How many new connections a side opens through its NAT dialing the other side (its SDP and prediction).

    The punch dials each predicted endpoint and the punch port (not towards
    a peer without NAT, whose punch address is the public one, nor towards
    a random NAT: client/calls/race.py), the direct attempts each public
    passive candidate; a sequential NAT gives each its own port.  (From the
    server's probes alone a preserving NAT looks like no NAT.)
    """
    direct = len(dialed.of_type("host", "passive")[:MAX_SRFLX])
    punch = dialed.punch_candidate
    if (punch is not None and punch.ip == public_ip) or prediction.nat.allocation == RANDOM:
        return direct
    return direct + len(set(prediction.ports[:LANE_WINDOW])) + 1
