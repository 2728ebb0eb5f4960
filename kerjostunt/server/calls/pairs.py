"""What the server remembers of each pair of peers: whether their calls failed since the last success.

A group needs it where a single call does not (issue 12): a peer that
marked another unreachable closes its signaling; the other then got ``480``
for every call and, counting an offline peer as merely absent, kept its own
signaling open forever.  When the pair's calls failed since its last
success, the ``480`` says so (``kerjo.PAIR_FAILED_REASON``) and the caller
counts it as the pair given up.  The memory is in-process: a restart
forgets it, and a success, a new public address of the caller or
``memory`` seconds clear it.  (Crossing calls are the clients' to avoid:
the lower user ID calls, docs/peer-manager.rst.)
"""

from __future__ import annotations

from dataclasses import dataclass

from kerjostunt.server.calls.seams import Clock

__all__ = ["PairBook"]

Pair = frozenset[str]


@dataclass
class _Failures:
    count: int
    since: float
    #: user -> the public address it called or answered from
    addresses: dict[str, str]


class PairBook:
    """Recent failures, per pair of user IDs."""

    def __init__(self, clock: Clock, memory: float = 3600.0) -> None:
        self.clock = clock
        self.memory = memory
        self._failures: dict[Pair, _Failures] = {}

    def recorded(self, caller: str, callee: str, success: bool, addresses: dict[str, str]) -> None:
        """A call's outcome, with each side's public address then."""
        pair = frozenset((caller, callee))
        if success:
            self._failures.pop(pair, None)
            return
        old = self._failures.get(pair)
        if old is None or old.addresses != addresses:
            self._failures[pair] = _Failures(1, self.clock.seconds(), dict(addresses))
        else:
            old.count += 1

    def failed(self, caller: str, callee: str, caller_address: str) -> int:
        """Failed calls of the pair since its last success (0: none, forgotten, or the caller moved)."""
        pair = frozenset((caller, callee))
        entry = self._failures.get(pair)
        if entry is None:
            return 0
        if self.clock.seconds() - entry.since > self.memory:
            del self._failures[pair]
            return 0
        return entry.count if entry.addresses.get(caller) == caller_address else 0
