"""The manager's view of the signaling connection, as a state machine.

::

    closed --open--> opening --opened--> open --settle/shut--> closing --closed--> closed
      ^                 |  \\               |
      +---open_failed---+   +----lost------+--> closed

The seed's rule (architecture section 1) decides *when* to open and close
(PeerManager._reconcile); this machine makes sure each decision is taken in
a state where it means something: a second ``open`` while opening is
nothing, a ``settle`` while opening waits for the open, a late
``opened`` after ``lost`` is ignored. Dials go out only while ``open``.

Every input returns None; ``RuleCore.state`` is the machine's record of its
state for ``PeerManager.signaling``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.python.failure import Failure

from kerjostunt.client.manager.events import SignalingState

if TYPE_CHECKING:
    from automat._typed import TypedState  # automat exports the builder, not its state type

__all__ = ["RuleCore", "RuleHost", "SignalingRule", "new_rule"]


class SignalingRule(Protocol):
    def open(self, reason: str) -> None:
        """Peers wait: open signaling (agent.start)."""

    def opened(self, reason: str) -> None:
        """agent.start succeeded."""

    def open_failed(self, failure: Failure, reason: str) -> None:
        """agent.start failed."""

    def settle(self, reason: str) -> None:
        """Every peer is done: close signaling (agent.stop)."""

    def shut(self, reason: str, done: defer.Deferred[None]) -> None:
        """The manager stops: close signaling if open or opening; ``done`` fires once closed."""

    def closed(self, reason: str) -> None:
        """agent.stop finished."""

    def lost(self, reason: str) -> None:
        """The agent's signaling connection went away under us."""

    def dial_waiting(self) -> None:
        """Dial the peers that wait, if signaling is open."""


class RuleHost(Protocol):
    """What the machine has the manager do."""

    def start_agent(self, reason: str) -> None: ...

    def signaling_opened(self, reason: str) -> None: ...

    def signaling_failed(self, failure: Failure, reason: str) -> None: ...

    def stop_agent(self, reason: str, done: defer.Deferred[None] | None) -> None: ...

    def signaling_closed(self, reason: str) -> None: ...

    def signaling_dropped(self, reason: str) -> None: ...

    def dial_waiting(self) -> None: ...


@dataclass
class RuleCore:
    host: RuleHost
    state: SignalingState = SignalingState.CLOSED


_State: TypeAlias = "TypedState[SignalingRule, RuleCore]"


def _already_closed(rule: SignalingRule, core: RuleCore, reason: str, done: defer.Deferred[None]) -> None:
    done.callback(None)


def _build() -> Callable[[RuleCore], SignalingRule]:
    builder = TypeMachineBuilder(SignalingRule, RuleCore)
    closed = builder.state("closed")
    opening = builder.state("opening")
    open_ = builder.state("open")
    closing = builder.state("closing")

    @closed.upon(SignalingRule.open).to(opening)
    def start(rule: SignalingRule, core: RuleCore, reason: str) -> None:
        core.state = SignalingState.OPENING
        core.host.start_agent(reason)

    @opening.upon(SignalingRule.opened).to(open_)
    def opened(rule: SignalingRule, core: RuleCore, reason: str) -> None:
        core.state = SignalingState.OPEN
        core.host.signaling_opened(reason)

    @opening.upon(SignalingRule.open_failed).to(closed)
    def failed(rule: SignalingRule, core: RuleCore, failure: Failure, reason: str) -> None:
        core.state = SignalingState.CLOSED
        core.host.signaling_failed(failure, reason)

    @open_.upon(SignalingRule.settle).to(closing)
    def settle(rule: SignalingRule, core: RuleCore, reason: str) -> None:
        core.state = SignalingState.CLOSING
        core.host.stop_agent(reason, None)

    for state in (opening, open_):

        @state.upon(SignalingRule.shut).to(closing)
        def shut(rule: SignalingRule, core: RuleCore, reason: str, done: defer.Deferred[None]) -> None:
            core.state = SignalingState.CLOSING
            core.host.stop_agent(reason, done)

        @state.upon(SignalingRule.lost).to(closed)
        def lost(rule: SignalingRule, core: RuleCore, reason: str) -> None:
            core.state = SignalingState.CLOSED
            core.host.signaling_dropped(reason)

    for state in (closed, closing):
        state.upon(SignalingRule.shut).loop()(_already_closed)

    @closing.upon(SignalingRule.closed).to(closed)
    def stopped(rule: SignalingRule, core: RuleCore, reason: str) -> None:
        core.state = SignalingState.CLOSED
        core.host.signaling_closed(reason)

    @open_.upon(SignalingRule.dial_waiting).loop()
    def dial(rule: SignalingRule, core: RuleCore) -> None:
        core.host.dial_waiting()

    _ignore_the_rest(closed, opening, open_, closing)
    return builder.build()


def _ignore_the_rest(closed: _State, opening: _State, open_: _State, closing: _State) -> None:
    """Everything else means nothing in that state (a second open, a late result)."""
    nothing: list[tuple[Callable[..., None], tuple[_State, ...]]] = [
        (SignalingRule.open, (opening, open_, closing)),
        (SignalingRule.opened, (closed, open_, closing)),
        (SignalingRule.open_failed, (closed, open_, closing)),
        (SignalingRule.settle, (closed, opening, closing)),
        (SignalingRule.closed, (closed, opening, open_)),
        (SignalingRule.lost, (closed, closing)),
        (SignalingRule.dial_waiting, (closed, opening, closing)),
    ]
    for an_input, states in nothing:
        for state in states:
            state.upon(an_input).loop().returns(None)


_RULE = _build()


def new_rule(host: RuleHost) -> tuple[SignalingRule, RuleCore]:
    """A machine in ``closed`` for ``host``, and its core (``core.state`` for the public view)."""
    core = RuleCore(host)
    return _RULE(core), core
