"""What the peer manager needs of its collaborators, as typing.Protocols.

The manager does no networking itself (tests run it on a ``Clock`` with
fakes), so these are the whole contract: ``PeerAgent`` (through
``RestartingAgent``) is the agent, ``directory.PeerEntry`` an entry,
``calls.PeerConnection`` a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory

__all__ = ["DirectoryEntry", "ManagedAgent", "ManagedConnection", "ManagerClock", "peer_flag"]


class ManagerClock(Protocol):
    """IReactorTime, as much of it as the manager uses."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall: ...


class ManagedConnection(Protocol):
    """A verified peer connection (``calls.PeerConnection``)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def protocol(self) -> object: ...

    @property
    def technique(self) -> str: ...


class ManagedAgent(Protocol):
    """The signaling side: ``start``/``stop`` signaling, ``connect`` dials a peer (direct first, then STUNT)."""

    @property
    def signaling_up(self) -> bool: ...

    @property
    def public_ip(self) -> str | None:
        """Our public address as the server saw it at REGISTER (None: not registered)."""
        ...

    def start(self) -> Deferred[Any]: ...

    def stop(self) -> Deferred[None]: ...

    def connect(
        self, peer_id: str, protocol_factory: IProtocolFactory, *, timeout: float = 20.0, prefer_stunt: bool = False
    ) -> Deferred[Any]: ...


class DirectoryEntry(Protocol):
    """One trusted peer as the directory lists it (``directory.PeerEntry``)."""

    @property
    def user_id(self) -> str: ...

    @property
    def use_stunt(self) -> object: ...

    @property
    def ip(self) -> str | None:
        """Its public address as the server last saw it."""
        ...


def peer_flag(entry: DirectoryEntry) -> str:
    """The server's "use STUNT" flag of a directory entry as a string.

    The directory carries ``unknown`` / ``direct`` / ``stunt`` / ``unreachable``;
    a bare boolean (True: needs STUNT) is accepted too.
    """
    value = entry.use_stunt
    if value is True:
        return "stunt"
    if value is False or value is None:
        return "unknown"
    return str(value).lower()
