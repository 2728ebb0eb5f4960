"""An in-memory kerjostunt network for applications' own tests.

An application built on :class:`~kerjostunt.client.endpoint.PeerEndpoint` or
:class:`~kerjostunt.client.manager.PeerManager` wants to test its own
protocol: what it sends when a peer arrives, what it does when one goes.
Real agents need a server, certificates, sockets and, for anything
interesting, NATs. :class:`MemoryNetwork` stands in for all of it, as
``treq.testing`` stands in for HTTP: agents register by user ID, groups say
who may call whom, and a call joins the two application protocols with
in-memory transports whose bytes are delivered through the clock you pass
(a ``Clock`` in tests: ``clock.advance(0)`` delivers everything pending).

The agents answer the way real ones fail (``ConnectFailed`` with the SIP
code: 404 unknown user, 480 not online, 403 no shared group) and a test can
make a pair unreachable or a user drop off, to drive the application's
error paths::

    clock = Clock()
    network = MemoryNetwork(clock)
    network.add_group("friends", "alice", "bob")
    bob = network.agent("bob", accept_factory=EchoFactory())
    alice = network.agent("alice")
    d = PeerEndpoint(alice, "bob").connect(ClientFactory())
    clock.advance(0)

A ``PeerManager`` takes a ``MemoryAgent`` as its agent and
``network.directory(group, user)`` as its directory; give the agent the
manager's ``accept_factory`` and ``peer_arrived`` (tests/test_testing.py
runs a whole group that way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.client.calls import ConnectFailed, PeerConnection
from kerjostunt.client.directory import PeerEntry

#: the technique a memory connection reports (no real technique was used)
TECHNIQUE = "memory"


@implementer(ITransport)
class MemoryTransport:
    """One end of an in-memory TCP connection; bytes arrive through the clock, in order."""

    def __init__(self, clock: IReactorTime, host: IPv4Address, peer: IPv4Address) -> None:
        self._clock = clock
        self._host = host
        self._peer = peer
        self.other: MemoryTransport | None = None
        self.protocol: IProtocol | None = None
        self.connected = True
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if not self.disconnecting and self.other is not None:
            self._clock.callLater(0, self.other.deliver, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def deliver(self, data: bytes) -> None:
        if self.connected and self.protocol is not None:
            self.protocol.dataReceived(data)

    def loseConnection(self) -> None:
        """Closes both ends once the bytes written before it are delivered."""
        if not self.disconnecting:
            self.disconnecting = True
            self._clock.callLater(0, self._close, Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._close(Failure(ConnectionLost()))

    def _close(self, reason: Failure) -> None:
        for end in (self, self.other):
            if end is not None and end.connected:
                end.connected = False
                end.disconnecting = True
                if end.protocol is not None:
                    end.protocol.connectionLost(reason)

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host


def connect_pair(clock: IReactorTime, client: IProtocol, server: IProtocol,
                 client_address: IPv4Address, server_address: IPv4Address) -> None:
    """Joins two protocols: each gets ``makeConnection`` with its end's transport."""
    client_end = MemoryTransport(clock, client_address, server_address)
    server_end = MemoryTransport(clock, server_address, client_address)
    client_end.other, server_end.other = server_end, client_end
    client_end.protocol, server_end.protocol = client, server
    server.makeConnection(server_end)
    client.makeConnection(client_end)


@dataclass
class _Member:
    user_id: str
    address: IPv4Address
    agent: MemoryAgent | None = None
    groups: set[str] = field(default_factory=set)


class MemoryNetwork:
    """The users, their groups and who is online: the server's view, in memory."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._members: dict[str, _Member] = {}
        self._unreachable: set[frozenset[str]] = set()
        #: every call the network joined, in order: (caller, callee)
        self.calls: list[tuple[str, str]] = []

    def add_user(self, user_id: str) -> None:
        if user_id not in self._members:
            index = len(self._members) + 1
            self._members[user_id] = _Member(user_id, IPv4Address("TCP", f"198.51.100.{index % 250 + 1}", 40000))

    def add_group(self, group: str, *user_ids: str) -> None:
        for user_id in user_ids:
            self.add_user(user_id)
            self._members[user_id].groups.add(group)

    def agent(self, user_id: str, *, accept_factory: IProtocolFactory | None = None,
              on_peer: Callable[[PeerConnection], None] | None = None) -> MemoryAgent:
        """A new agent for ``user_id`` (not yet started: call ``start``)."""
        self.add_user(user_id)
        return MemoryAgent(self, user_id, accept_factory, on_peer)

    def make_unreachable(self, a: str, b: str) -> None:
        """Calls between ``a`` and ``b`` fail as when no technique joins their NATs."""
        self._unreachable.add(frozenset((a, b)))

    def directory(self, group: str, user_id: str) -> Callable[[], defer.Deferred[list[PeerEntry]]]:
        """What ``PeerManager`` takes as ``directory``: the group's other members."""
        def fetch() -> defer.Deferred[list[PeerEntry]]:
            if group not in self._member(user_id).groups:
                return defer.fail(ConnectFailed(f"{user_id} is not in group {group}", 403))
            return defer.succeed([self._entry(m) for m in self._members.values()
                                  if group in m.groups and m.user_id != user_id])
        return fetch

    def _entry(self, member: _Member) -> PeerEntry:
        online = member.agent is not None and member.agent.signaling_up
        return PeerEntry(user_id=member.user_id, use_stunt="direct", ip=member.address.host,
                         port=member.address.port, nat=None, online=online)

    def _member(self, user_id: str) -> _Member:
        return self._members[user_id]

    def _registered(self, agent: MemoryAgent) -> None:
        old = self._member(agent.user_id).agent
        self._member(agent.user_id).agent = agent
        if old is not None and old is not agent:
            old.replaced()

    def _unregistered(self, agent: MemoryAgent) -> None:
        if self._member(agent.user_id).agent is agent:
            self._member(agent.user_id).agent = None

    def call(self, caller: MemoryAgent, callee_id: str, factory: IProtocolFactory) -> PeerConnection:
        """Joins ``caller`` to ``callee_id`` or raises ConnectFailed as the server and NATs would."""
        if callee_id not in self._members:
            raise ConnectFailed("404 Not Found", 404)
        callee = self._member(callee_id)
        if callee.agent is None or callee.agent.accept_factory is None:
            raise ConnectFailed("480 Temporarily Unavailable", 480)
        if not callee.groups & self._member(caller.user_id).groups:
            raise ConnectFailed("403 Forbidden", 403)
        if frozenset((caller.user_id, callee_id)) in self._unreachable:
            raise ConnectFailed("all techniques failed: unreachable in the memory network")
        return self._join(caller, callee.agent, factory)

    def _join(self, caller: MemoryAgent, callee: MemoryAgent, factory: IProtocolFactory) -> PeerConnection:
        caller_address, callee_address = self._member(caller.user_id).address, self._member(callee.user_id).address
        assert callee.accept_factory is not None
        client = factory.buildProtocol(callee_address)
        server = callee.accept_factory.buildProtocol(caller_address)
        if client is None or server is None:
            raise ConnectFailed("the application refused the connection")
        connect_pair(self.clock, client, server, caller_address, callee_address)
        self.calls.append((caller.user_id, callee.user_id))
        remote_of_callee = (callee_address.host, callee_address.port)
        callee.accepted(PeerConnection(caller.user_id, server, TECHNIQUE, "direct",
                                       (caller_address.host, caller_address.port), 0.0))
        return PeerConnection(callee.user_id, client, TECHNIQUE, "direct", remote_of_callee, 0.0)


class MemoryAgent:
    """What PeerEndpoint and PeerManager use of a ``PeerAgent``, over a MemoryNetwork."""

    def __init__(self, network: MemoryNetwork, user_id: str, accept_factory: IProtocolFactory | None,
                 on_peer: Callable[[PeerConnection], None] | None) -> None:
        self.network = network
        self.user_id = user_id
        self.accept_factory = accept_factory
        self.on_peer = on_peer
        self.signaling_up = False
        self.public_ip: str | None = None
        #: how many times the signaling connection was opened and closed
        self.starts = 0
        self.stops = 0

    def start(self) -> defer.Deferred[None]:
        self.signaling_up = True
        self.starts += 1
        self.network._registered(self)
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        if self.signaling_up:
            self.signaling_up = False
            self.stops += 1
            self.network._unregistered(self)
        return defer.succeed(None)

    def replaced(self) -> None:
        """Another agent registered as the same user: this one's binding is gone."""
        self.signaling_up = False

    def connect(self, peer_id: str, protocol_factory: IProtocolFactory, *, timeout: float = 20.0,
                prefer_stunt: bool = False) -> defer.Deferred[PeerConnection]:
        if peer_id == self.user_id:
            return defer.fail(ConnectFailed("cannot connect to ourselves"))
        if not self.signaling_up:
            return defer.fail(ConnectFailed("not connected to the server"))
        try:
            return defer.succeed(self.network.call(self, peer_id, protocol_factory))
        except ConnectFailed as failed:
            return defer.fail(failed)

    def accepted(self, connection: PeerConnection) -> None:
        if self.on_peer is not None:
            self.on_peer(connection)


__all__ = ["TECHNIQUE", "MemoryAgent", "MemoryNetwork", "MemoryTransport", "connect_pair"]
