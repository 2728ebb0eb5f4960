"""What the peer manager tells its application: state changes, signaling, the list.

The names of the states are part of the output (``kerjostunt join`` prints
them, tests and the NAT lab read them), so ``PeerState`` is a ``StrEnum``:
each member is the string it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BACKOFF",
    "CONNECTED",
    "CONNECTING",
    "DONE_STATES",
    "Event",
    "PENDING",
    "PeerListLoaded",
    "PeerState",
    "PeerStateChanged",
    "STATES",
    "SignalingChanged",
    "SignalingState",
    "UNREACHABLE",
]


class PeerState(StrEnum):
    """Where one trusted peer stands (docs/peer-manager.rst)."""

    PENDING = "pending"  # waiting for a dial
    CONNECTING = "connecting"  # a dial is under way
    CONNECTED = "connected"
    BACKOFF = "backoff"  # waiting before the next dial
    UNREACHABLE = "unreachable"  # given up on until the long back-off is over


PENDING = PeerState.PENDING
CONNECTING = PeerState.CONNECTING
CONNECTED = PeerState.CONNECTED
BACKOFF = PeerState.BACKOFF
UNREACHABLE = PeerState.UNREACHABLE
STATES = tuple(PeerState)
#: the states in which a peer needs no signaling connection
DONE_STATES = (CONNECTED, UNREACHABLE)


class SignalingState(StrEnum):
    """The manager's view of the agent's signaling connection."""

    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


@dataclass(frozen=True)
class PeerStateChanged:
    """One peer moved from ``old`` to ``new``; ``detail`` says why (human-readable).

    ``new`` is ``"removed"`` for a peer no longer in the list, ``old`` None for a new one.
    """

    peer_id: str
    old: str | None
    new: str
    detail: str = ""
    technique: str | None = None
    incoming: bool = False
    delay: float | None = None


@dataclass(frozen=True)
class SignalingChanged:
    """The signaling connection opened (``is_open``) or closed; ``reason`` says why."""

    is_open: bool
    reason: str


@dataclass(frozen=True)
class PeerListLoaded:
    """A directory fetch finished: the peers now tracked (self excluded)."""

    peers: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]


Event = PeerStateChanged | SignalingChanged | PeerListLoaded
