"""NAT classification and port prediction from probe observations.

Pure and deterministic: no Twisted, no I/O, no clock.  The server feeds it
the recent observations of one user (oldest first or not; they are ordered
by ``time`` here) and gets back a :class:`NATDescription` to store and a
:class:`Prediction` to hand to peers.

How the samples come about (docs/probes.rst): for each call the client binds
one fresh local port, probes from it to two (or more) server endpoints, then
dials the peer from that same port.  So

- samples sharing a local port but reaching different server endpoints show
  the *mapping* behaviour (RFC 4787 terms: endpoint-independent,
  address-dependent, address-and-port-dependent);
- the sequence of *new mappings* over time (one per local port for an
  endpoint-independent NAT, one per sample otherwise) shows the *allocation*
  behaviour: preserving (public port == local port), sequential with a delta
  d (which may be > 1 or negative), or random.

Other hosts behind the same NAT take ports between our mappings, so the
observed steps are multiples of d, not always d: the delta is the most
common step, and a series is sequential when most steps are small positive
multiples of it.  The prediction is therefore a window ``m+d, m+2d, ...``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from math import gcd
from typing import Any

__all__ = ["Sample", "NATDescription", "Prediction", "classify", "predict",
           "EI", "AD", "APD", "UNKNOWN", "PRESERVING", "SEQUENTIAL", "RANDOM",
           "MAX_DELTA", "MAX_MULTIPLE", "wrap_port", "no_technique"]

EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"
UNKNOWN = "unknown"
PRESERVING = "preserving"
SEQUENTIAL = "sequential"
RANDOM = "random"

#: larger steps are not believed to be a NAT's allocation delta
MAX_DELTA = 128
#: a step of k*d with 1 <= k <= MAX_MULTIPLE counts as d plus other hosts' ports.  In a group
#: (issue 12) a dozen hosts behind one sequential NAT probe and punch between one host's probes:
#: steps of 10-40 d were seen, and with 8 the NAT was taken for a random one (and the birthday
#: search then sprayed 2,560 connections through it).  A random NAT's step is a positive multiple
#: of d below 64 d about once in a thousand.
MAX_MULTIPLE = 64
#: NATs wrap their port range; predictions past 1..65535 wrap into [PORT_MIN, 65535]
PORT_MIN = 1024


@dataclass(frozen=True)
class Sample:
    local_port: int
    mapped_ip: str
    mapped_port: int
    server_ip: str
    server_port: int
    time: float
    #: the client's own address when known; lets us tell "no NAT" from a
    #: port-preserving NAT (both predict the local port, so it only matters
    #: for the stored description)
    local_ip: str | None = None


@dataclass(frozen=True)
class NATDescription:
    behind_nat: bool
    mapping: str
    allocation: str
    delta: int | None
    public_ip: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NATDescription:
        delta = d.get("delta")
        return cls(behind_nat=bool(d.get("behind_nat", True)),
                   mapping=str(d.get("mapping", UNKNOWN)),
                   allocation=str(d.get("allocation", UNKNOWN)),
                   delta=None if delta is None else int(delta),
                   public_ip=d.get("public_ip"))


@dataclass(frozen=True)
class Prediction:
    ip: str
    ports: tuple[int, ...]
    confidence: float
    nat: NATDescription

    def endpoints(self) -> list[tuple[str, int]]:
        return [(self.ip, p) for p in self.ports]


# --- analysis -------------------------------------------------------------

def _ordered(samples: Sequence[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: s.time)  # stable: ties keep input order


def _group_mapping(group: list[Sample]) -> str | None:
    """The mapping behaviour one local port shows, or None without evidence."""
    by_endpoint: dict[tuple[str, int], tuple[str, int]] = {}
    for s in group:
        by_endpoint.setdefault((s.server_ip, s.server_port), (s.mapped_ip, s.mapped_port))
    if len(by_endpoint) < 2:
        return None
    if len(set(by_endpoint.values())) == 1:
        return EI
    # Different mappings: does the port alone change it (same server IP)?
    by_ip: dict[str, set[tuple[str, int]]] = {}
    for (ip, _), mapped in by_endpoint.items():
        by_ip.setdefault(ip, set()).add(mapped)
    if any(len(m) > 1 for m in by_ip.values()):
        return APD
    return AD


def _mapping(ordered: list[Sample]) -> str:
    groups: dict[int, list[Sample]] = {}
    for s in ordered:
        groups.setdefault(s.local_port, []).append(s)
    votes: list[str] = []
    for group in groups.values():  # dicts keep first-seen (time) order
        verdict = _group_mapping(group)
        if verdict is not None:
            votes.append(verdict)
    if not votes:
        return UNKNOWN
    counts = Counter(votes)
    best = max(counts.values())
    # ties go to the most recent evidence
    return next(v for v in reversed(votes) if counts[v] == best)


def _new_mappings(ordered: list[Sample], mapping: str) -> list[Sample]:
    """The samples that each created a mapping, in time order."""
    seen: set[tuple[int, str, int]] = set()
    out = []
    for s in ordered:
        key = (s.local_port, s.mapped_ip, s.mapped_port)
        if mapping == EI:
            key = (s.local_port, "", 0)
        if key in seen:
            continue
        seen.add(key)
        out.append(s)
    return out


def _steps(mappings: list[Sample]) -> list[int]:
    steps = []
    for a, b in zip(mappings, mappings[1:]):
        if a.mapped_ip == b.mapped_ip and b.mapped_port != a.mapped_port:
            steps.append(b.mapped_port - a.mapped_port)
    return steps


def _consistent(step: int, d: int) -> bool:
    return step % d == 0 and 1 <= step // d <= MAX_MULTIPLE


def _delta(steps: list[int]) -> tuple[int | None, float]:
    """The allocation delta and the share of steps it explains."""
    candidates = [s for s in steps if 0 < abs(s) <= MAX_DELTA]
    if not candidates:
        return None, 0.0
    counts = Counter(candidates)

    def rank(d: int) -> tuple[int, int, int, int]:
        explained = sum(_consistent(s, d) for s in steps)
        return (counts[d], explained, -abs(d), d > 0)

    d = max(sorted(counts), key=rank)
    share = sum(_consistent(s, d) for s in steps) / len(steps)
    # Other hosts' connections between ours make every step a different
    # multiple of d (16, 24 for d=4): their common divisor is the delta then.
    g = gcd(*candidates)
    if g != d and share < 1.0:
        g_share = sum(_consistent(s, g) for s in steps) / len(steps)
        if g_share > share:
            return g, g_share
    return d, share


def _is_preserving(mappings: list[Sample]) -> bool:
    """Most mappings through the newest public address kept their local port.

    A crowded preserving NAT gives another port now and then: two of its
    hosts probed the same server endpoint from the same local port (the
    NAT lab's 20-host site: a few collisions in a run, and with the newest
    mapping required to keep its port the NAT was taken for a random one).
    A random or sequential NAT keeps a port about once in 60,000.
    """
    latest = mappings[-1].mapped_ip
    preserved = [s.mapped_port == s.local_port for s in mappings if s.mapped_ip == latest]
    kept = sum(preserved)
    return 2 * kept > len(preserved) or (preserved[-1] and 2 * kept >= len(preserved))


def _behind_nat(ordered: list[Sample], preserving: bool) -> bool:
    known = [s for s in ordered if s.local_ip is not None]
    if known:
        return any(s.local_ip != s.mapped_ip or s.local_port != s.mapped_port for s in known)
    # Without the local address, "every mapping keeps the port and the
    # public IP never changed" is the best hint that there is no NAT.
    same_ip = len({s.mapped_ip for s in ordered}) == 1
    return not (same_ip and all(s.mapped_port == s.local_port for s in ordered)
                and preserving)


def _analyse(samples: Sequence[Sample]) -> tuple[NATDescription, list[Sample], float]:
    ordered = _ordered(samples)
    if not ordered:
        return NATDescription(True, UNKNOWN, UNKNOWN, None, None), [], 0.0
    mapping = _mapping(ordered)
    mappings = _new_mappings(ordered, mapping)
    steps = _steps(mappings)
    delta, share = _delta(steps)
    if _is_preserving(mappings):
        allocation, delta = PRESERVING, None
    elif delta is not None and share >= 0.5 and (len(steps) == 1 or share * len(steps) >= 2):
        # One short step among several is chance: a random NAT gives a step
        # of at most MAX_DELTA about once in 250 (a lab run took one such
        # NAT for sequential, delta 120, from three probes).
        allocation = SEQUENTIAL
    elif len(mappings) >= 2 and steps:
        allocation, delta = RANDOM, None
    else:
        allocation, delta = UNKNOWN, None
    behind = _behind_nat(ordered, allocation == PRESERVING)
    if not behind:
        mapping = EI
    nat = NATDescription(behind, mapping, allocation, delta, ordered[-1].mapped_ip)
    quality = share * min(1.0, len(steps) / 3) if allocation == SEQUENTIAL else 0.0
    return nat, mappings, quality


def classify(samples: Sequence[Sample]) -> NATDescription:
    return _analyse(samples)[0]


def wrap_port(port: int) -> int:
    """A port counted past 1..65535 wrapped into [PORT_MIN, 65535], as NATs wrap their range."""
    if 1 <= port <= 65535:
        return port
    span = 65536 - PORT_MIN
    return (port - PORT_MIN) % span + PORT_MIN


_wrap = wrap_port


def _dedupe(ports: list[int], window: int) -> tuple[int, ...]:
    out: list[int] = []
    for p in ports:
        if 1 <= p <= 65535 and p not in out:
            out.append(p)
    return tuple(out[:max(1, window)])


def predict(samples: Sequence[Sample], local_port: int | None = None,
            window: int = 4) -> Prediction:
    """The mapped endpoint(s) the next connection from ``local_port`` to a new destination gets.

    ``local_port`` defaults to the local port of the latest sample (the
    port the client probed from for this call).
    """
    ordered = _ordered(samples)
    if not ordered:
        raise ValueError("no samples to predict from")
    nat, mappings, quality = _analyse(ordered)
    last = ordered[-1]
    if local_port is None:
        local_port = last.local_port
    ip = nat.public_ip or last.mapped_ip
    own = [s for s in ordered if s.local_port == local_port]
    observed = own[-1].mapped_port if own else None
    m = mappings[-1].mapped_port

    def sequence() -> list[int]:
        assert nat.delta is not None
        return [_wrap(m + k * nat.delta) for k in range(1, max(1, window) + 1)]

    if not nat.behind_nat:
        return Prediction(ip, (local_port,), 0.95, nat)
    if nat.allocation == PRESERVING:
        ports = [local_port] + ([observed] if observed is not None else [])
        conf = 0.95 if nat.mapping == EI and observed == local_port else 0.85
        return Prediction(ip, _dedupe(ports, window), conf, nat)
    if nat.mapping == EI and observed is not None:
        # The probes' mapping is reused; should the NAT have dropped it
        # meanwhile, a fresh allocation follows the usual pattern.
        tail = sequence() if nat.allocation == SEQUENTIAL else []
        return Prediction(ip, _dedupe([observed] + tail, window), 0.9, nat)
    if nat.allocation == SEQUENTIAL:
        ports = sequence()
        if nat.mapping == UNKNOWN and observed is not None:
            ports = [observed] + ports
        return Prediction(ip, _dedupe(ports, window), round(0.3 + 0.5 * quality, 3), nat)
    if nat.allocation == RANDOM:
        return Prediction(ip, (observed if observed is not None else m,), 0.05, nat)
    # Unknown allocation (a single mapping seen): the observed port if this
    # local port was probed, then its neighbours.
    base = observed if observed is not None else m
    ports = [base] + [_wrap(base + k) for k in range(1, max(1, window))]
    return Prediction(ip, _dedupe(ports, window), 0.3, nat)


def no_technique(a: NATDescription | None, b: NATDescription | None) -> str:
    """Why no NAT traversal technique can join peers behind these two NATs, or "" (unknown: try).

    A random NAT's mapping cannot be predicted; a SYN can only match it if
    the other side's NAT maps endpoint-independently (the birthday search).
    Both random, or random facing an address-dependent (e.g. sequential)
    NAT: a punch would only wait out its deadline.  A direct connection to
    a public endpoint is another matter (the callers still try theirs).
    """
    if a is None or b is None or not a.behind_nat or not b.behind_nat:
        return ""
    if a.allocation == b.allocation == RANDOM:
        return "both NATs allocate ports at random"
    for random_side, other in ((a, b), (b, a)):
        if random_side.allocation == RANDOM and other.mapping in (AD, APD):
            return "a random NAT facing an address-dependent one (no port to predict on either side)"
    return ""
