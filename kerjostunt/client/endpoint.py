"""``IStreamClientEndpoint`` for "user X": code that speaks endpoints gets peers for free."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

if TYPE_CHECKING:
    from kerjostunt.client.agent import PeerAgent, PeerConnection


@implementer(IStreamClientEndpoint)
class PeerEndpoint:
    """Connects through ``agent`` to ``peer_id``; fires with the protocol, like any endpoint.

    Failures are ``ConnectFailed`` (its ``reason`` says why: 404, 480, 403,
    408, or every technique failed).  The technique used is in the log; use
    ``PeerAgent.connect`` directly to get it as a ``PeerConnection``.
    """

    def __init__(self, agent: PeerAgent, peer_id: str, *, timeout: float = 20.0) -> None:
        self.agent = agent
        self.peer_id = peer_id
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def protocol_of(connection: PeerConnection) -> IProtocol:
            return IProtocol(connection.protocol)  # the application's protocol, as the factory built it

        d = self.agent.connect(self.peer_id, protocolFactory, timeout=self.timeout)
        return d.addCallback(protocol_of)
