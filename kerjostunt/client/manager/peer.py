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
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from kerjostunt.client.manager.events import DONE_STATES, PeerState, PeerStateChanged
from kerjostunt.client.manager.seams import DirectoryEntry, ManagedConnection, peer_flag
from kerjostunt.client.manager.watching import WatchedProtocol

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


def _build() -> Callable[[TrackedPeer], PeerInputs]:
    builder = TypeMachineBuilder(PeerInputs, TrackedPeer)
    new = builder.state("new")
    pending = builder.state("pending")
    connecting = builder.state("connecting")
    connected = builder.state("connected")
    backoff = builder.state("backoff")
    unreachable = builder.state("unreachable")
    every_state = (new, pending, connecting, connected, backoff, unreachable)
    handled: set[tuple[object, object]] = set()

    def mark(states: tuple[object, ...], an_input: object) -> None:
        handled.update((state, an_input) for state in states)

    new.upon(PeerInputs.listed).to(pending)(lambda inputs, peer, detail: peer.enter(PeerState.PENDING, detail))
    pending.upon(PeerInputs.dial).to(connecting)(
        lambda inputs, peer, detail: peer.enter(PeerState.CONNECTING, detail)
    )
    pending.upon(PeerInputs.courtesy).to(backoff)(
        lambda inputs, peer, detail, delay: peer.wait(detail, delay, f"{peer.peer_id} did not call first")
    )
    connecting.upon(PeerInputs.back_off).to(backoff)(lambda inputs, peer, detail, delay: peer.wait(detail, delay))
    mark((new, pending, connecting), PeerInputs.listed)
    mark((pending,), PeerInputs.dial)
    mark((pending,), PeerInputs.courtesy)
    mark((connecting,), PeerInputs.back_off)

    judging = (pending, connecting, backoff, unreachable)  # connected: an incoming connection came first
    for state in judging:
        state.upon(PeerInputs.dial_failed).loop()(
            lambda inputs, peer, failure: peer.host.judge_failure(peer, failure)
        )
    mark(judging, PeerInputs.dial_failed)
    for state in (pending, connecting, backoff):
        state.upon(PeerInputs.give_up).to(unreachable)(
            lambda inputs, peer, by, detail: peer.mark_unreachable(by, detail)
        )
    mark((pending, connecting, backoff), PeerInputs.give_up)
    for state in (pending, backoff):
        state.upon(PeerInputs.flagged).to(unreachable)(
            lambda inputs, peer: peer.mark_unreachable("server", "flagged unreachable by the server")
        )
    mark((pending, backoff), PeerInputs.flagged)

    @unreachable.upon(PeerInputs.unflagged).to(pending)
    def unflagged(inputs: PeerInputs, peer: TrackedPeer, flag: str) -> None:
        # The server saw it reached since: try it now rather than in an hour.
        peer.cancel_timer()
        peer.failures = 0
        peer.enter(PeerState.PENDING, f"flag now {flag}")

    @backoff.upon(PeerInputs.backoff_over).to(pending)
    def backoff_over(inputs: PeerInputs, peer: TrackedPeer, reason: str) -> None:
        peer.enter(PeerState.PENDING, "back-off over")

    @unreachable.upon(PeerInputs.retry_due).to(pending)
    def retry(inputs: PeerInputs, peer: TrackedPeer) -> None:
        peer.retrying = True
        peer.enter(PeerState.PENDING, "long back-off over, retrying")

    mark((unreachable,), PeerInputs.unflagged)
    mark((backoff,), PeerInputs.backoff_over)
    mark((unreachable,), PeerInputs.retry_due)

    for state in (new, pending, connecting, backoff, unreachable):
        state.upon(PeerInputs.connected).to(connected)(
            lambda inputs, peer, connection, incoming: peer.adopt(connection, incoming)
        )
    connected.upon(PeerInputs.connected).loop()(
        lambda inputs, peer, connection, incoming: peer.host.keep_one(peer, connection, incoming)
    )
    mark(every_state, PeerInputs.connected)
    for state in every_state:
        drop = state.upon(PeerInputs.dropped)
        (drop.loop() if state is pending else drop.to(pending))(
            lambda inputs, peer, detail: peer.enter(PeerState.PENDING, detail)
        )
        redial = state.upon(PeerInputs.dropped_while_dialing)
        (redial.loop() if state is connecting else redial.to(connecting))(
            lambda inputs, peer, detail: peer.enter(PeerState.CONNECTING, f"{detail}; a dial is under way")
        )
    mark(every_state, PeerInputs.dropped)
    mark(every_state, PeerInputs.dropped_while_dialing)

    # Everything else is a stale timer or a late result: nothing happens.
    every_input: list[Callable[..., None]] = [
        PeerInputs.listed, PeerInputs.dial, PeerInputs.courtesy, PeerInputs.dial_failed, PeerInputs.back_off,
        PeerInputs.give_up, PeerInputs.flagged, PeerInputs.unflagged, PeerInputs.backoff_over,
        PeerInputs.retry_due, PeerInputs.connected, PeerInputs.dropped, PeerInputs.dropped_while_dialing,
    ]
    for state in every_state:
        for an_input in every_input:
            if (state, an_input) not in handled:
                state.upon(an_input).loop().returns(None)
    return builder.build()


_MACHINE = _build()
