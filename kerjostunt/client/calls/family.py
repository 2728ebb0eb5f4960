"""
The family race of one call (RFC 8305): the IPv6 punch first, the IPv4 techniques later or never.

At the dial moment the Dialer (``race.py``) starts the IPv6 punch; the IPv4
techniques -- the punch through the NAT, the birthday search, the direct
connects leaving through it -- each take NAT ports, so they wait
``FAMILY_STAGGER``.  Both sides wait the same, so their IPv4 SYNs still
cross.  What happens then depends on the IPv6 punch:

- it already won: IPv4 never starts (the race's timers are cancelled);
- a connection of it is in its per-call handshake (TCP connected: the path
  through both firewalls works and the handshake needs one more round trip,
  two SYNs crossing at 80 ms of RTT connect at about 80 ms, before the
  100 ms stagger, and pass at 160 to 200 ms): IPv4 is *held*, and starts
  only if every such connection fails its handshake, the IPv6 punch gives
  up, or ``FAMILY_HOLD`` passes without a verdict;
- nothing of it connected yet: IPv4 starts, and both families race.

So where both families work, IPv4 costs neither a NAT port nor time; where
IPv6 fails, IPv4 starts at the stagger (or as soon as the handshake that
held it failed).  On a path whose round trip is longer than the stagger the
IPv6 connection is not up at the stagger and IPv4 starts as before: it then
costs NAT ports, not connect time.

The life is a state machine: ``waiting`` (for the stagger) -> ``holding``
(an IPv6 connection in handshake) -> ``released`` (IPv4 started); a race
that ends first simply never releases it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.client.nat.contest import Contest, has_handshake

__all__ = ["FAMILY_HOLD", "FAMILY_STAGGER", "FamilyRace"]

log = Logger()

#: RFC 8305's "connection attempt delay": the IPv4 techniques start this long after the
#: IPv6 punch; 100 ms is inside its 50 to 250 ms
FAMILY_STAGGER = 0.1
#: how long an IPv6 connection in handshake may hold the IPv4 start past the stagger (a
#: handshake takes one to one and a half round trips; its own timeout is 5 s)
FAMILY_HOLD = 0.5


class _Inputs(Protocol):
    """What happens to the family race."""

    def due(self) -> None:
        "The stagger passed; nothing of IPv6 connected."

    def due_busy(self) -> None:
        "The stagger passed while an IPv6 connection was in handshake (or verified)."

    def settled(self) -> None:
        "Every IPv6 connection in handshake failed, none verified; or the IPv6 punch gave up."

    def hold_over(self) -> None:
        "The hold ran out without a verdict."

    def phase(self) -> str:
        "The state's name (logs, tests)."


@implementer(IProtocolFactory)
class _Watching:
    """The IPv6 punch's factory: each connection it builds is connected, and in handshake."""

    def __init__(self, inner: IProtocolFactory, built: Callable[[IProtocol], None]) -> None:
        self.inner = inner
        self.built = built

    def doStart(self) -> None:
        self.inner.doStart()

    def doStop(self) -> None:
        self.inner.doStop()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        protocol = self.inner.buildProtocol(addr)
        if protocol is not None:
            self.built(protocol)
        return protocol


class FamilyRace:
    """When the IPv4 techniques of a call with an IPv6 path start: ``start_ipv4`` is called once, or never.

    ``wrap`` the factory the IPv6 punch builds its connections with, ``arm`` at
    the dial moment, ``ipv6_failed`` when the IPv6 punch gave up.  Timers are
    the race's ``contest``'s, so a race that ended cancels them.
    """

    def __init__(self, contest: Contest[Any], start_ipv4: Callable[[], None], *,
                 stagger: float = FAMILY_STAGGER, hold: float = FAMILY_HOLD) -> None:
        self.contest = contest
        self.start_ipv4 = start_ipv4
        self.stagger = stagger
        self.hold = hold
        self.in_handshake = 0  # IPv6 connections whose handshake has not ended
        self.verified = False  # one passed: the race's win is on its way
        self._life = _FamilyMachine(self)

    def phase(self) -> str:
        return self._life.phase()

    def wrap(self, factory: IProtocolFactory) -> IProtocolFactory:
        return _Watching(factory, self._connected)

    def arm(self) -> None:
        self.contest.later(self.stagger, self._after_ready_io)

    def ipv6_failed(self) -> None:
        self._life.settled()

    # inside ---------------------------------------------------------------------

    def _after_ready_io(self) -> None:
        """Look one turn later: the reactor runs its due timers before it polls, so an IPv6
        connection that came up just before the stagger, on a busy reactor, is seen only then."""
        self.contest.later(0, self._stagger_passed)

    def _stagger_passed(self) -> None:
        if self.in_handshake or self.verified:
            self._life.due_busy()
        else:
            self._life.due()

    def _connected(self, protocol: Any) -> None:
        if not has_handshake(protocol):
            return
        self.in_handshake += 1
        protocol.handshake_done.addCallbacks(self._passed, self._failed)

    def _passed(self, app: object) -> None:
        self.in_handshake -= 1
        self.verified = True

    def _failed(self, reason: Failure) -> None:
        self.in_handshake -= 1
        if not self.in_handshake and not self.verified:
            self._life.settled()

    def _hold(self) -> None:
        log.debug("IPv4 held: an IPv6 connection is in handshake")
        self.contest.later(self.hold, self._life.hold_over)

    def _release(self, why: str) -> None:
        if self.contest.over:
            return  # the race ended (won, stopped): its IPv6 connections' handshakes fail as they are dropped
        log.debug("IPv4 starts: {why}", why=why)
        self.start_ipv4()


_family = TypeMachineBuilder(_Inputs, FamilyRace)
_waiting = _family.state("waiting")
_holding = _family.state("holding")
_released = _family.state("released")


@_waiting.upon(_Inputs.due).to(_released)
def _due(inputs: _Inputs, race: FamilyRace) -> None:
    race._release("the stagger passed")


@_waiting.upon(_Inputs.due_busy).to(_holding)
def _busy(inputs: _Inputs, race: FamilyRace) -> None:
    race._hold()


@_holding.upon(_Inputs.settled).to(_released)
def _settled(inputs: _Inputs, race: FamilyRace) -> None:
    race._release("IPv6 failed")


@_holding.upon(_Inputs.hold_over).to(_released)
def _over(inputs: _Inputs, race: FamilyRace) -> None:
    race._release("no IPv6 verdict in time")


# Before the stagger an IPv6 failure changes nothing (both sides start IPv4 together);
# once released, nothing more happens.
_waiting.upon(_Inputs.settled).loop().returns(None)
_waiting.upon(_Inputs.hold_over).loop().returns(None)
_holding.upon(_Inputs.due).loop().returns(None)
_holding.upon(_Inputs.due_busy).loop().returns(None)
for _input in (_Inputs.due, _Inputs.due_busy, _Inputs.settled, _Inputs.hold_over):
    _released.upon(_input).loop().returns(None)
for _state in (_waiting, _holding, _released):
    _state.upon(_Inputs.phase).loop().returns(_state.name)

_FamilyMachine = _family.build()
