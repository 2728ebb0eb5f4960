"""The peer manager: connect to every trusted peer, hold signaling only while needed.

- core.py: ``PeerManager`` and ``ManagerConfig``, the rules;
- peer.py: one peer's life (pending, connecting, connected, backoff, unreachable) as a machine;
- rule.py: the signaling connection as the manager sees it (closed, opening, open, closing);
- events.py: what the application hears (``PeerStateChanged``, ``SignalingChanged``, ``PeerListLoaded``);
- seams.py: what the manager needs of the agent, the directory and connections (typing.Protocol);
- watching.py: the application's protocols wrapped so a lost connection is noticed;
- restarting.py: ``RestartingAgent``, one ``PeerAgent`` per signaling opening.

See docs/peer-manager.rst.
"""

from kerjostunt.client.manager.core import OFFLINE_CODES, ManagerConfig, PeerManager
from kerjostunt.client.manager.events import (
    BACKOFF,
    CONNECTED,
    CONNECTING,
    DONE_STATES,
    PENDING,
    STATES,
    UNREACHABLE,
    Event,
    PeerListLoaded,
    PeerState,
    PeerStateChanged,
    SignalingChanged,
    SignalingState,
)
from kerjostunt.client.manager.restarting import RestartingAgent
from kerjostunt.client.manager.seams import DirectoryEntry, ManagedAgent, ManagedConnection, peer_flag

__all__ = [
    "BACKOFF",
    "CONNECTED",
    "CONNECTING",
    "DONE_STATES",
    "OFFLINE_CODES",
    "PENDING",
    "STATES",
    "UNREACHABLE",
    "DirectoryEntry",
    "Event",
    "ManagedAgent",
    "ManagedConnection",
    "ManagerConfig",
    "PeerListLoaded",
    "PeerManager",
    "PeerState",
    "PeerStateChanged",
    "RestartingAgent",
    "SignalingChanged",
    "SignalingState",
    "peer_flag",
]
