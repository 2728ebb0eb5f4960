"""The application's protocols, wrapped so the manager sees each connection's loss."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["WatchedProtocol", "WatchingFactory", "close_protocol"]

LostCallback = Callable[["WatchedProtocol", Failure], None]


class WatchedProtocol(Protocol):
    """Wraps the application's protocol so the manager sees ``connectionLost``.

    The application protocol gets the real transport; only the three
    protocol callbacks pass through here.
    """

    def __init__(self, inner: IProtocol, on_lost: LostCallback) -> None:
        self.inner = inner
        self._on_lost = on_lost
        self.lost = False

    def makeConnection(self, transport: ITransport) -> None:
        self.connected = 1
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = 0
        self.lost = True
        try:
            self.inner.connectionLost(reason)
        finally:
            self._on_lost(self, reason)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()


@implementer(IProtocolFactory)
class WatchingFactory(Factory[WatchedProtocol]):
    """A factory whose protocols report their loss to the manager."""
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, app_factory: IProtocolFactory, on_lost: LostCallback) -> None:
        self.app_factory = app_factory
        self._on_lost = on_lost

    def doStart(self) -> None:
        self.app_factory.doStart()

    def doStop(self) -> None:
        self.app_factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> WatchedProtocol | None:
        inner = self.app_factory.buildProtocol(addr)  # type: ignore[arg-type]  # None only from tests
        if inner is None:
            return None
        return WatchedProtocol(inner, self._on_lost)


def close_protocol(proto: object) -> None:
    """Close the connection of ``proto`` (any protocol a connection reported), if it has one."""
    if isinstance(proto, Protocol) and proto.transport is not None:
        proto.transport.loseConnection()
