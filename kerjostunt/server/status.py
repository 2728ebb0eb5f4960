"""What the operators' /status page shows: the last hour of calls, summed up.

Pure (no Twisted, no SQL): ``web.py`` hands in the attempts of the window
(``AsyncStore.attempts_since``) and who is registered now (the registrar),
``summarise`` counts, and ``statuspage.py`` draws. The NAT of each side
comes from the attempt's detail (``calls/detail.py``), i.e. as the server's
probes described it when the call was made.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from kerjostunt.store import AttemptRecord

__all__ = ["StatusStore", "Peer", "Failure", "Summary", "HISTOGRAM_BUCKETS", "short_nat", "summarise", "reason_of"]

#: time-to-connect buckets (upper bounds in ms; the last is open)
HISTOGRAM_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<100 ms", 100.0), ("100-200 ms", 200.0), ("200-500 ms", 500.0), ("0.5-1 s", 1000.0),
    ("1-2 s", 2000.0), ("2-5 s", 5000.0), ("5-10 s", 10000.0), (">10 s", float("inf")),
)
OUTCOMES = ("direct", "stunt", "failed")
SLOWEST = 10
_MAPPINGS = {"endpoint-independent": "EI", "address-dependent": "AD", "address-and-port-dependent": "APD"}


class StatusStore(Protocol):
    """What /status needs of the store (``AsyncStore`` provides it)."""

    def is_operator(self, user_id: str) -> Deferred[bool]: ...

    def attempts_since(self, since: float, limit: int = 20000) -> Deferred[list[AttemptRecord]]: ...


@dataclass(frozen=True)
class Peer:
    user_id: str
    address: str
    registered_at: float


@dataclass(frozen=True)
class Failure:
    when: float
    caller: str
    callee: str
    duration_ms: float | None
    reason: str
    call_id: str


@dataclass
class Summary:
    now: float
    window: float
    peers: list[Peer]
    calls: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    #: technique -> outcome -> count
    by_technique: dict[str, Counter[str]] = field(default_factory=dict)
    #: (caller NAT, callee NAT) -> [connected, total]
    matrix: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    histogram: list[tuple[str, int]] = field(default_factory=list)
    slowest_failures: list[Failure] = field(default_factory=list)

    @property
    def nat_kinds(self) -> list[str]:
        kinds = {k for pair in self.matrix for k in pair}
        return sorted(kinds, key=lambda k: (k == "unknown", k != "public", k))


def short_nat(label: Any) -> str:
    """``address-and-port-dependent/sequential`` -> ``APD sequential``; ``public``, ``unknown`` as they are."""
    if not isinstance(label, str) or "/" not in label:
        return label if label in ("public", "unknown") else "unknown"
    mapping, _, allocation = label.partition("/")
    return f"{_MAPPINGS.get(mapping, mapping)} {allocation}"


def _side(detail: dict[str, Any] | None, side: str) -> dict[str, Any]:
    value = (detail or {}).get(side)
    return value if isinstance(value, dict) else {}


def reason_of(a: AttemptRecord) -> str:
    """Why a failed attempt failed, from its detail: the 488's reason, or what each side tried."""
    detail = a.detail or {}
    if isinstance(detail.get("refused"), str):
        return str(detail["refused"])
    parts = []
    for side in ("caller", "callee"):
        info = _side(detail, side)
        tried = info.get("tried") or []
        if tried:
            parts.append(f"{side}: " + ", ".join(f"{t} {r}" for t, r in tried))
        elif info:
            parts.append(f"{side}: {info.get('outcome', 'no report')}")
    return "; ".join(parts) or "no report from either side"


def _bucket(ms: float) -> str:
    return next(name for name, top in HISTOGRAM_BUCKETS if ms < top)


def summarise(attempts: Iterable[AttemptRecord], peers: Sequence[Peer], now: float, window: float) -> Summary:
    """Count the window's attempts every way the page shows them."""
    summary = Summary(now, window, sorted(peers, key=lambda p: p.user_id))
    buckets: Counter[str] = Counter()
    failures: list[AttemptRecord] = []
    for a in attempts:
        if a.when < now - window:
            continue
        summary.calls += 1
        summary.by_outcome[a.outcome] += 1
        summary.by_technique.setdefault(a.technique or "none", Counter())[a.outcome] += 1
        pair = (short_nat(_side(a.detail, "caller").get("nat")), short_nat(_side(a.detail, "callee").get("nat")))
        cell = summary.matrix.setdefault(pair, [0, 0])
        cell[1] += 1
        if a.outcome == "failed":
            failures.append(a)
        else:
            cell[0] += 1
            if a.duration_ms is not None:
                buckets[_bucket(a.duration_ms)] += 1
    summary.histogram = [(name, buckets[name]) for name, _ in HISTOGRAM_BUCKETS]
    failures.sort(key=lambda a: (-(a.duration_ms or 0.0), -a.when))
    summary.slowest_failures = [Failure(a.when, a.caller, a.callee, a.duration_ms, reason_of(a), a.call_id)
                                for a in failures[:SLOWEST]]
    return summary
