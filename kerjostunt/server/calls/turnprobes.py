"""A caller behind a NAT lane probes at its turn, not before its INVITE (issue 12).

A sequential, address-dependent NAT gives every new connection, from any of
its hosts, the next port; the server predicts a side behind it from the
NAT's newest observed port (natview.py) and orders the calls through it
(lanes.py).  Probes are connections too.  A caller used to probe its punch
port before it sent its INVITE, at any moment: in a group, hosts behind one
such NAT call several peers at once, and their bursts of probes took the
ports the server had just predicted for another call's punch (NAT lab
group: 21 probes within 0.1 s of two dial moments, both punches missed and
waited out their 10 s deadline).  And a probe made before a call waits its
turn is stale by the time it goes.

So a client that knows its NAT is such a one calls without probing, and
the server, at the call's turn, asks it for one probe (``183 Session
Progress`` with ``X-Kerjo-Probes: 1``), waits for that probe to arrive at
the probe port (at most ``wait`` seconds), and only then forwards the
INVITE.  Every probe through the NAT then happens inside a turn, where the
prediction expects it, and the newest port is fresh.  A caller that did
probe (an older client, a prepared port) is forwarded at once, as before.

A turn whose only side behind the lane is the callee, asked for one probe,
ends when that probe arrives (``NATLanes.release``), not at its answer: its
prediction is made at the answer from the NAT's newest port then, so the
next turn's probes may come first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from kerjostunt.server.calls.lanes import NATLanes
from kerjostunt.server.calls.machine import CALLEE, CALLER, Call, Phase
from kerjostunt.server.calls.seams import Clock, Observations, Timer
from kerjostunt.wire import kerjo
from kerjostunt.wire.sip.message import make_response

__all__ = ["TurnProbes", "PROBE_WAIT"]

log = Logger(namespace="kerjostunt.server.calls")

#: seconds the server waits for the probe it asked a caller for before forwarding anyway
PROBE_WAIT = 2.0


@dataclass
class _Waiting:
    call: Call
    go: Callable[[], None]
    timer: Timer


class TurnProbes:
    """The calls whose turn waits for the caller's probe, keyed by (caller, punch port)."""

    def __init__(self, clock: Clock, observations: Observations, lanes: NATLanes, wait: float = PROBE_WAIT) -> None:
        self.clock = clock
        self.observations = observations
        self.lanes = lanes
        self.wait = wait
        self._waiting: dict[tuple[str, int], _Waiting] = {}
        # calls whose turn at a NAT waits for it to go quiet: the timer, and since when
        self._quiet: dict[Call, Timer] = {}
        self._quiet_since: dict[Call, float] = {}

    def when_quiet(self, call: Call, quiet: float, go: Callable[[], None]) -> None:
        """The call's turn: on once its NATs have been quiet for ``quiet`` seconds, then ``then``.

        A probe through the NAT moments ago by another host is often one of a
        burst (a host probing its next punch port, one probe per server
        endpoint); a prediction made in its middle is short by the rest of it.
        The caller's own probes do not hold it (a caller behind a sequential
        NAT would otherwise wait a quiet period on every call).
        """
        self._quiet.pop(call, None)
        now = self.clock.seconds()
        since = self._quiet_since.setdefault(call, now)
        # Probes before the previous turn ended were in its predictions already (its callee's, mostly).
        # The caller's own are no burst in progress. (The callee's may be: an idle agent probes its
        # next punch port in the background.)
        own = (call.caller_id,)
        recent = [t for key in call.lanes.values()
                  if (t := self.observations.last_probe_behind(key, own)) is not None and t > self.lanes.released(key)]
        wait = max([0.0, *(t + quiet - now for t in recent)])
        # A NAT that never goes quiet does not hold the call for more than a few quiet periods.
        if wait > 0 and now - since < 5 * quiet and call.machine.phase() is Phase.CHECKING:
            self._quiet[call] = self.clock.callLater(wait, self.when_quiet, call, quiet, go)
            return
        self._quiet_since.pop(call, None)
        self.then(call, go)  # the caller's probe, at its turn

    def then(self, call: Call, go: Callable[[], None]) -> None:
        """``go`` (forward the call) now, or once the caller's probe asked for here arrived."""
        port = call.caller_sdp.punch_port
        if CALLER not in call.lanes or port is None or self._probed(call.caller_id, port):
            go()
            return
        key = (call.caller_id, port)
        self.drop(call)
        timer = self.clock.callLater(self.wait, self._late, key)
        self._waiting[key] = _Waiting(call, go, timer)
        response = make_response(call.invite, 183, "Session Progress: probe now")
        response.headers.add(kerjo.PROBES, "1")
        call.answer(response)
        log.debug("Call {caller} -> {callee}: asked the caller for its probe", caller=call.caller_id,
                  callee=call.callee_id)

    def observed(self, user_id: str, local_port: int | None) -> None:
        """A probe arrived (the observation log's listener): the call waiting for it goes on,
        and the turn of a call whose callee it was asked of ends."""
        for call in self.lanes.holders():
            assert isinstance(call, Call)
            if call.callee_id == user_id and list(call.lanes) == [CALLEE] and call.callee_probes == 1 \
                    and call.forwarded is not None:
                self.lanes.release(call)
        if local_port is None:
            return
        waiting = self._waiting.pop((user_id, local_port), None)
        if waiting is not None:
            waiting.timer.cancel()
            waiting.go()

    def drop(self, call: Call) -> None:
        """``call`` ended: it waits for nothing any more."""
        self._quiet_since.pop(call, None)
        timer = self._quiet.pop(call, None)
        if timer is not None and timer.active():
            timer.cancel()
        for key, waiting in list(self._waiting.items()):
            if waiting.call is call:
                del self._waiting[key]
                if waiting.timer.active():
                    waiting.timer.cancel()

    def _probed(self, user_id: str, port: int) -> bool:
        return any(s.local_port == port for s in self.observations.samples(user_id))

    def _late(self, key: tuple[str, int]) -> None:
        """No probe in time: forward anyway (the prediction falls back to the NAT's newest port)."""
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            log.info("Call {caller} -> {callee}: no probe from the caller within {s} s, forwarding anyway",
                     caller=waiting.call.caller_id, callee=waiting.call.callee_id, s=self.wait)
            waiting.go()
