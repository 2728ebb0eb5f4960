"""One trusted peer's life in the manager, as a state machine.

::

    (listed) -> pending --dial--> connecting --connected--> connected
                 ^  |                 |   \\                     |
                 |  +--courtesy--+    |    +--back_off--> backoff |
                 |               v    v                    |      |
                 +-- backoff_over -- backoff <-------------+      |
                 +-- retry_due / unflagged -- unreachable <-- give_up / flagged
                 +------------------------------- dropped --------+

``connected`` is reachable from every state (a peer may call us at any
time); a second connection while ``connected`` is a duplicate, and the
manager keeps one of the two. The rules that pick the next state (how many
failures, offline or not) are the manager's; this machine says which input
counts in which state, keeps the counters and timers of one peer, and tells
the manager every change (``PeerStateChanged``).

Every input returns None (Automat postpones an input made from an output of
the same machine); what the manager reads back is ``TrackedPeer.state``,
which only the machine's outputs set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from kerjostunt.client.manager.events import DONE_STATES, PeerState, PeerStateChanged
from kerjostunt.client.manager.seams import DirectoryEntry, ManagedConnection, peer_flag
from kerjostunt.client.manager.watching import WatchedProtocol

if TYPE_CHECKING:
    from automat._typed import TypedState  # automat exports the builder, not its state type

__all__ = ["PeerHost", "PeerInputs", "TrackedPeer"]


class PeerInputs(Protocol):
    """What can happen to one peer."""

    def listed(self, detail: str) -> None:
        """It appeared in the list (or called us before it did)."""

    def dial(self, detail: str) -> None:
        """The manager dials it now."""

    def courtesy(self, detail: str, delay: float) -> None:
        """A lower user ID gets ``delay`` seconds to call us first."""

    def dial_failed(self, failure: Failure) -> None:
        """The current dial failed."""

    def back_off(self, detail: str, delay: float) -> None:
        """Wait ``delay`` seconds before dialing again."""

    def give_up(self, by: str, detail: str) -> None:
        """Unreachable (``by`` "server" or "local") until the long back-off is over."""

    def flagged(self) -> None:
        """The server's flag now says unreachable."""

    def unflagged(self, flag: str) -> None:
        """The server's flag went from unreachable to ``flag``, and it was the server that said so."""

    def backoff_over(self, reason: str) -> None:
        """The back-off (or courtesy) timer fired."""

    def retry_due(self) -> None:
        """The long back-off of an unreachable peer is over."""

    def connected(self, connection: ManagedConnection, incoming: bool) -> None:
        """A verified connection with it, dialed (``incoming`` False) or accepted."""

    def dropped(self, detail: str) -> None:
        """Its connection closed (or closed at once) and no dial is under way."""

    def dropped_while_dialing(self, detail: str) -> None:
        """Its connection closed while a dial to it is under way."""


class PeerHost(Protocol):
    """What a peer's machine has the manager do."""

    @property
    def unreachable_retry(self) -> float: ...

    def later(self, delay: float, f: Callable[..., object], *args: object) -> IDelayedCall: ...

    def emit_change(self, event: PeerStateChanged) -> None: ...

    def judge_failure(self, peer: TrackedPeer, failure: Failure) -> None: ...

    def keep_one(self, peer: TrackedPeer, connection: ManagedConnection, incoming: bool) -> None: ...

    def reopen_for(self, reason: str) -> None: ...


@dataclass(eq=False)
class TrackedPeer:
    """One peer: its machine, and the data the manager's rules read."""

    peer_id: str
    entry: DirectoryEntry | None
    host: PeerHost
    #: the machine's record of its state (only its outputs set it); None before ``listed``
    state: PeerState | None = None
    failures: int = 0
    absences: int = 0
    timer: IDelayedCall | None = None
    dialing: defer.Deferred[Any] | None = None
    connection: ManagedConnection | None = None  # the PeerConnection in use
    protocol: WatchedProtocol | None = None
    incoming: bool = False
    retrying: bool = False  # this attempt is the long back-off's retry
    marked_by: str | None = None  # "server" or "local" when unreachable
    extras: list[WatchedProtocol] = field(default_factory=list)
    life: PeerInputs = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.life = _MACHINE(self)

    @property
    def flag(self) -> str:
        return peer_flag(self.entry) if self.entry is not None else "unknown"

    @property
    def done(self) -> bool:
        """Connected or unreachable: this peer needs no signaling connection."""
        return self.state in DONE_STATES

    @property
    def dialable(self) -> bool:
        """Waiting for a dial, and none under way."""
        return self.state is PeerState.PENDING and self.dialing is None

    def enter(self, state: PeerState, detail: str = "", **extra: Any) -> None:
        """Record ``state`` and tell the manager (from the machine's outputs only)."""
        old, self.state = self.state, state
        self.host.emit_change(PeerStateChanged(self.peer_id, old, state, detail, **extra))

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def wait(self, detail: str, delay: float, over: str | None = None) -> None:
        """Back off for ``delay`` seconds, then ``backoff_over``; ``over`` is the reason to reopen signaling."""
        self.enter(PeerState.BACKOFF, detail, delay=delay)
        self.timer = self.host.later(delay, self._backoff_over, over or f"back-off of {self.peer_id} over")

    def _backoff_over(self, reason: str) -> None:
        self.timer = None
        self.life.backoff_over(reason)
        self.host.reopen_for(reason)

    def _retry_due(self) -> None:
        self.timer = None
        self.life.retry_due()
        self.host.reopen_for(f"retrying {self.peer_id}")

    def mark_unreachable(self, by: str, detail: str) -> None:
        self.cancel_timer()
        self.marked_by = by
        self.retrying = False
        delay = self.host.unreachable_retry
        self.enter(PeerState.UNREACHABLE, f"{detail}; retry in {delay:.0f}s", delay=delay)
        self.timer = self.host.later(delay, self._retry_due)

    def adopt(self, connection: ManagedConnection, incoming: bool) -> None:
        """The first connection with this peer: connected, every count reset."""
        self.cancel_timer()
        self.failures = self.absences = 0
        self.retrying = False
        self.marked_by = None
        self.connection, self.incoming = connection, incoming
        proto = connection.protocol
        self.protocol = proto if isinstance(proto, WatchedProtocol) else None
        technique = connection.technique or None
        detail = f"via {technique}" if technique else ""
        if incoming:
            detail = f"incoming, {detail}" if detail else "incoming"
        self.enter(PeerState.CONNECTED, detail, technique=technique, incoming=incoming)


# -- the machine -----------------------------------------------------------------------

_State: TypeAlias = "TypedState[PeerInputs, TrackedPeer]"


@dataclass(frozen=True)
class _States:
    new: _State
    pending: _State
    connecting: _State
    connected: _State
    backoff: _State
    unreachable: _State
    #: (state, input) pairs given a transition so far; the rest are ignored
    handled: set[tuple[object, object]] = field(default_factory=set)

    @property
    def every(self) -> tuple[_State, ...]:
        return (self.new, self.pending, self.connecting, self.connected, self.backoff, self.unreachable)

    def mark(self, states: tuple[_State, ...], an_input: object) -> None:
        self.handled.update((state, an_input) for state in states)


def _dialing(s: _States) -> None:
    """Listed, dialed, the dial's outcome: back off or give up."""
    s.new.upon(PeerInputs.listed).to(s.pending)(lambda inputs, peer, detail: peer.enter(PeerState.PENDING, detail))
    s.pending.upon(PeerInputs.dial).to(s.connecting)(
        lambda inputs, peer, detail: peer.enter(PeerState.CONNECTING, detail)
    )
    s.pending.upon(PeerInputs.courtesy).to(s.backoff)(
        lambda inputs, peer, detail, delay: peer.wait(detail, delay, f"{peer.peer_id} did not call first")
    )
    s.connecting.upon(PeerInputs.back_off).to(s.backoff)(
        lambda inputs, peer, detail, delay: peer.wait(detail, delay)
    )
    s.mark((s.new,), PeerInputs.listed)
    s.mark((s.pending,), PeerInputs.dial)
    s.mark((s.pending,), PeerInputs.courtesy)
    s.mark((s.connecting,), PeerInputs.back_off)
    judging = (s.pending, s.connecting, s.backoff, s.unreachable)  # connected: an incoming connection came first
    for state in judging:
        state.upon(PeerInputs.dial_failed).loop()(
            lambda inputs, peer, failure: peer.host.judge_failure(peer, failure)
        )
    s.mark(judging, PeerInputs.dial_failed)
    for state in (s.pending, s.connecting, s.backoff):
        state.upon(PeerInputs.give_up).to(s.unreachable)(
            lambda inputs, peer, by, detail: peer.mark_unreachable(by, detail)
        )
    s.mark((s.pending, s.connecting, s.backoff), PeerInputs.give_up)


def _waiting(s: _States) -> None:
    """The server's flag, and the timers that end a back-off."""
    for state in (s.pending, s.backoff):
        state.upon(PeerInputs.flagged).to(s.unreachable)(
            lambda inputs, peer: peer.mark_unreachable("server", "flagged unreachable by the server")
        )
    s.mark((s.pending, s.backoff), PeerInputs.flagged)

    @s.unreachable.upon(PeerInputs.unflagged).to(s.pending)
    def unflagged(inputs: PeerInputs, peer: TrackedPeer, flag: str) -> None:
        # The server saw it reached since: try it now rather than in an hour.
        peer.cancel_timer()
        peer.failures = 0
        peer.enter(PeerState.PENDING, f"flag now {flag}")

    @s.backoff.upon(PeerInputs.backoff_over).to(s.pending)
    def backoff_over(inputs: PeerInputs, peer: TrackedPeer, reason: str) -> None:
        peer.enter(PeerState.PENDING, "back-off over")

    @s.unreachable.upon(PeerInputs.retry_due).to(s.pending)
    def retry(inputs: PeerInputs, peer: TrackedPeer) -> None:
        peer.retrying = True
        peer.enter(PeerState.PENDING, "long back-off over, retrying")

    s.mark((s.unreachable,), PeerInputs.unflagged)
    s.mark((s.backoff,), PeerInputs.backoff_over)
    s.mark((s.unreachable,), PeerInputs.retry_due)


def _connections(s: _States) -> None:
    """A connection (from any state; a second one is a duplicate), and its loss."""
    for state in (s.new, s.pending, s.connecting, s.backoff, s.unreachable):
        state.upon(PeerInputs.connected).to(s.connected)(
            lambda inputs, peer, connection, incoming: peer.adopt(connection, incoming)
        )
    s.connected.upon(PeerInputs.connected).loop()(
        lambda inputs, peer, connection, incoming: peer.host.keep_one(peer, connection, incoming)
    )
    s.mark(s.every, PeerInputs.connected)
    for state in s.every:
        drop = state.upon(PeerInputs.dropped)
        (drop.loop() if state is s.pending else drop.to(s.pending))(
            lambda inputs, peer, detail: peer.enter(PeerState.PENDING, detail)
        )
        redial = state.upon(PeerInputs.dropped_while_dialing)
        (redial.loop() if state is s.connecting else redial.to(s.connecting))(
            lambda inputs, peer, detail: peer.enter(PeerState.CONNECTING, f"{detail}; a dial is under way")
        )
    s.mark(s.every, PeerInputs.dropped)
    s.mark(s.every, PeerInputs.dropped_while_dialing)


def _build() -> Callable[[TrackedPeer], PeerInputs]:
    builder = TypeMachineBuilder(PeerInputs, TrackedPeer)
    state = builder.state
    s = _States(
        state("new"), state("pending"), state("connecting"), state("connected"), state("backoff"), state("unreachable")
    )
    _dialing(s)
    _waiting(s)
    _connections(s)
    # Everything else is a stale timer or a late result: nothing happens.
    every_input: list[Callable[..., None]] = [
        PeerInputs.listed, PeerInputs.dial, PeerInputs.courtesy, PeerInputs.dial_failed, PeerInputs.back_off,
        PeerInputs.give_up, PeerInputs.flagged, PeerInputs.unflagged, PeerInputs.backoff_over,
        PeerInputs.retry_due, PeerInputs.connected, PeerInputs.dropped, PeerInputs.dropped_while_dialing,
    ]
    for each in s.every:
        for an_input in every_input:
            if (each, an_input) not in s.handled:
                each.upon(an_input).loop().returns(None)
    return builder.build()


_MACHINE = _build()
