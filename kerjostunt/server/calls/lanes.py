"""Calls through one sequential, address-dependent NAT take turns (issue 12).

Such a NAT gives every new connection, from any host behind it, the next
port of one counter.  The prediction a call hands to the other side
(``m + d, m + 2d, ...`` from the latest observed port ``m``) holds only if
nothing else behind that NAT opens a connection between the probes and the
punch.  In a group, several hosts behind one sequential NAT call at once,
and their punches took each other's predicted ports (NAT lab: ``punch: no
connection within 10 s``, the four predicted ports all missed).

So the server gives each such NAT (one public address) a *lane*: a call
with a side behind it is forwarded only when the lane is free and holds it
until both predictions are made and the dial moments set (the callee's
answer).  Then it notes how many new mappings that side is going to open
(the other side's endpoints it dials), and its dial moment is put at least
``gap`` seconds after the previous call's through that NAT, so the SYNs
leave in the order the predictions assumed.  The next call's prediction for
that NAT starts from the NAT's newest observed port, from any of its hosts,
plus the mappings of the calls that dial there after that observation
(``shift``).  Calls that cannot interfere (both behind one NAT, on their
LAN; endpoint-independent, preserving, random or no NAT) take no lane and
run in parallel.  A turn whose side behind the NAT is its callee may end
early, once the callee's probe is in (``release``): its prediction is made
at its answer, from the NAT's newest port then; a call whose prediction is
made when its turn begins (a caller's) waits until every earlier call has
its dial moment (``fixed_early``).  docs/decisions.rst has the
measurements.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.logger import Logger

from kerjostunt.server.calls.seams import Clock
from kerjostunt.wire.prediction import AD, APD, SEQUENTIAL, UNKNOWN, NATDescription

__all__ = ["NATLanes", "lane_of"]

log = Logger(namespace="kerjostunt.server.calls")

#: how long a lane remembers the mappings of a call that dialed (seconds)
MEMORY = 120.0


def lane_of(nat: NATDescription | None, public_ip: str) -> str | None:
    """The lane (public address) of a side behind this NAT, or None when its calls cannot interfere.

    Address-dependent mapping with sequential (or not yet known) allocation:
    every connection moves the counter the prediction extrapolates.
    """
    if nat is None or not nat.behind_nat or nat.mapping not in (AD, APD):
        return None
    if nat.allocation not in (SEQUENTIAL, UNKNOWN):
        return None
    return nat.public_ip or public_ip


@dataclass
class _Lane:
    holder: object | None = None
    #: no call may dial through this NAT before this moment (the previous one's dial + gap)
    next_dial: float = 0.0
    #: when the last turn here ended (probes before it were in that turn's predictions)
    released: float = 0.0
    #: (dial moment, new mappings its side opened there), oldest first
    dialed: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass
class _Turn:
    call: object
    keys: tuple[str, ...]
    go: Callable[[], None]
    #: its prediction is made when its turn begins (the caller's, in the forwarded INVITE), not
    #: when its dial moment is set: it waits until every earlier call here has its dial moment
    fixed_early: bool = False


class NATLanes:
    """The lanes of every sequential NAT the server has seen calls through."""

    def __init__(self, clock: Clock, gap: float = 0.1) -> None:
        self.clock = clock
        self.gap = gap
        self._lanes: dict[str, _Lane] = {}
        self._waiting: list[_Turn] = []
        self._holding: dict[object, _Turn] = {}
        #: calls whose turn ended early (``release``) and whose dial moment is still to be set
        self._unscheduled: dict[object, _Turn] = {}

    def busy(self, key: str) -> bool:
        lane = self._lanes.get(key)
        return lane is not None and lane.holder is not None

    def waiting(self) -> int:
        return len(self._waiting)

    def released(self, key: str) -> float:
        """When the last turn at ``key`` ended (0: never)."""
        lane = self._lanes.get(key)
        return 0.0 if lane is None else lane.released

    def is_waiting(self, call: object) -> bool:
        """Is ``call`` waiting for its turn (not holding one, not gone)?"""
        return any(t.call is call for t in self._waiting)

    def calls(self) -> list[object]:
        """The calls holding or waiting for a turn, or released early and not dialing yet."""
        return [*self._holding, *self._unscheduled, *(t.call for t in self._waiting)]

    def holders(self) -> list[object]:
        """The calls holding a turn now."""
        return list(self._holding)

    def enter(self, call: object, keys: tuple[str, ...], go: Callable[[], None], *,
              fixed_early: bool = False) -> bool:
        """Run ``go`` now if every lane of ``keys`` is free (True), else once they are (False)."""
        turn = _Turn(call, tuple(dict.fromkeys(keys)), go, fixed_early)
        if not turn.keys:
            go()
            return True
        if self._free(turn) and not any(set(t.keys) & set(turn.keys) for t in self._waiting):
            self._take(turn)
            return True
        self._waiting.append(turn)
        log.debug("Call waits for its turn at NAT {keys} ({n} waiting)", keys=turn.keys, n=len(self._waiting))
        return False

    def dialing(self, call: object, at: float, mappings: dict[str, int]) -> float:
        """``call`` is to dial at ``at``: the seconds to add so it dials after the previous ones.

        Notes each lane side's new mappings at the (delayed) dial moment and
        frees the call's lanes: the next waiting call goes.
        """
        turn = self._holding.get(call) or self._unscheduled.get(call)
        if turn is None:
            return 0.0
        lanes = [self._lane(key) for key in turn.keys]
        later = max([0.0, *(lane.next_dial - at for lane in lanes)])
        for key, lane in zip(turn.keys, lanes):
            lane.next_dial = at + later + self.gap
            lane.dialed.append((at + later, mappings.get(key, 0)))
        self.leave(call)
        return later

    def release(self, call: object) -> None:
        """``call``'s probes are in, its dial moment is not set yet: the next call may take its turn.

        Its side's prediction is made when its answer comes (the callee's),
        from the NAT's newest port then, so the next call's probes are in it;
        its dial moment is set then too, and counted in the predictions made
        after.  A call whose prediction was made earlier (``fixed_early``)
        still waits for that.  So a slow answer no longer holds the lane
        (NAT lab, 40 peers on two busy cores: answers took 5 to 12 s).
        """
        turn = self._holding.get(call)
        if turn is not None:
            self._unscheduled[call] = turn
            self._free_lanes_of(call)

    def leave(self, call: object) -> None:
        """``call`` ended or has its dial moment: its lanes are free, the next waiting calls go."""
        self._waiting = [t for t in self._waiting if t.call is not call]
        if self._unscheduled.pop(call, None) is not None and call not in self._holding:
            self._wake()
        self._free_lanes_of(call)

    def _free_lanes_of(self, call: object) -> None:
        turn = self._holding.pop(call, None)
        if turn is None:
            return
        for key in turn.keys:
            lane = self._lanes.get(key)
            if lane is not None and lane.holder is call:
                lane.holder = None
                lane.released = self.clock.seconds()
        self._wake()

    def shift(self, key: str, since: float) -> int:
        """New mappings the calls that dialed through ``key`` after ``since`` opened (unseen by probes)."""
        lane = self._lanes.get(key)
        if lane is None:
            return 0
        horizon = self.clock.seconds() - MEMORY
        while lane.dialed and lane.dialed[0][0] < horizon:
            lane.dialed.popleft()
        return sum(count for at, count in lane.dialed if at > since)

    # -- inside ---------------------------------------------------------------------

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        return lane

    def _free(self, turn: _Turn) -> bool:
        if any(self.busy(key) for key in turn.keys):
            return False
        return not turn.fixed_early or not any(set(t.keys) & set(turn.keys) for t in self._unscheduled.values())

    def _take(self, turn: _Turn) -> None:
        for key in turn.keys:
            self._lane(key).holder = turn.call
        self._holding[turn.call] = turn
        turn.go()

    def _wake(self) -> None:
        """The oldest waiting calls whose lanes are all free go, in order; none passes an older
        call that waits for the lanes it needs (a ``fixed_early`` one would wait forever)."""
        blocked: set[str] = set()
        for turn in list(self._waiting):
            if turn not in self._waiting or blocked & set(turn.keys):
                continue
            if self._free(turn):
                self._waiting.remove(turn)
                self._take(turn)
            else:
                blocked |= set(turn.keys)
