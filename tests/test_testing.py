"""kerjostunt.testing: an application's own test, written the way its users would."""

from __future__ import annotations

from random import Random

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import Clock
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.client.calls import ConnectFailed
from kerjostunt.client.endpoint import PeerEndpoint
from kerjostunt.client.manager import PeerManager
from kerjostunt.testing import TECHNIQUE, MemoryNetwork


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class EndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.network.add_group("friends", "alice", "bob")
        self.arrived: list[str] = []
        self.bob = self.network.agent("bob", accept_factory=Factory.forProtocol(Echo),
                                      on_peer=lambda c: self.arrived.append(c.peer_id))
        self.alice = self.network.agent("alice")
        self.bob.start()
        self.alice.start()

    def connect(self, peer: str) -> Collect:
        d = PeerEndpoint(self.alice, peer).connect(Factory.forProtocol(Collect))
        return self.successResultOf(d)

    def test_bytes_flow_both_ways_through_the_clock(self) -> None:
        proto = self.connect("bob")
        proto.transport.write(b"hello")
        self.assertEqual(proto.received, b"")  # nothing moves until time does
        self.clock.advance(0)
        self.assertEqual(proto.received, b"hello")
        self.assertEqual(self.arrived, ["alice"])
        self.assertEqual(self.network.calls, [("alice", "bob")])

    def test_close_reaches_both_sides_after_pending_bytes(self) -> None:
        self.network.add_group("friends", "carol")
        accepted: list[Collect] = []
        self.network.agent("carol", accept_factory=Factory.forProtocol(Collect),
                           on_peer=lambda c: accepted.append(c.protocol)).start()  # type: ignore[arg-type]
        proto = self.connect("carol")
        proto.transport.write(b"last words")
        proto.transport.loseConnection()
        self.clock.advance(0)
        self.assertEqual(accepted[0].received, b"last words")
        self.assertTrue(accepted[0].lost)
        self.assertTrue(proto.lost)

    def test_failures_carry_the_server_codes(self) -> None:
        self.network.add_group("others", "carol")
        self.network.agent("carol", accept_factory=Factory.forProtocol(Echo)).start()
        self.network.add_user("dave")
        for peer, code in (("nobody", 404), ("dave", 480), ("carol", 403)):
            failure = self.failureResultOf(PeerEndpoint(self.alice, peer).connect(Factory.forProtocol(Collect)),
                                           ConnectFailed)
            self.assertEqual(failure.value.code, code, peer)

    def test_unreachable_pair_and_stopped_agent(self) -> None:
        self.network.make_unreachable("alice", "bob")
        self.failureResultOf(PeerEndpoint(self.alice, "bob").connect(Factory.forProtocol(Collect)), ConnectFailed)
        self.bob.stop()
        failure = self.failureResultOf(self.alice.connect("bob", Factory.forProtocol(Collect)), ConnectFailed)
        self.assertEqual(failure.value.code, 480)

    def test_connection_names_the_technique(self) -> None:
        connection = self.successResultOf(self.alice.connect("bob", Factory.forProtocol(Collect)))
        self.assertEqual((connection.peer_id, connection.technique, connection.outcome), ("bob", TECHNIQUE, "direct"))

    def test_directory_lists_the_other_members(self) -> None:
        entries = self.successResultOf(self.network.directory("friends", "alice")())
        self.assertEqual([(e.user_id, e.online) for e in entries], [("bob", True)])


class ManagerTests(SynchronousTestCase):
    """A group of PeerManagers over one MemoryNetwork: the seed's signaling rule, without sockets.

    Each manager gets its own seeded random source, so the jittered back-offs
    (and so every run) are the same.
    """

    MEMBERS = ("alice", "bob", "carol")

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.network.add_group("friends", *self.MEMBERS)
        self.agents = {}
        self.managers = {}
        for user in self.MEMBERS:
            agent = self.network.agent(user)
            manager = PeerManager(self.clock, group="friends", user_id=user,
                                  directory=self.network.directory("friends", user), agent=agent,
                                  app_factory_for=lambda peer: Factory.forProtocol(Echo),
                                  random=Random(user).random)
            agent.accept_factory, agent.on_peer = manager.accept_factory, manager.peer_arrived
            self.agents[user], self.managers[user] = agent, manager
        for manager in self.managers.values():
            manager.start()

    def run_for(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)

    def test_everyone_connects_then_hangs_up(self) -> None:
        self.run_for(30)
        for user, manager in self.managers.items():
            self.assertTrue(manager.all_done(), (user, manager.states()))
            self.assertEqual({str(s) for s in manager.states().values()}, {"connected"}, user)
            self.assertFalse(self.agents[user].signaling_up, user)
        self.assertEqual(len({frozenset(pair) for pair in self.network.calls}), 3)

    def test_a_lost_connection_reopens_signaling(self) -> None:
        self.run_for(30)
        connection = self.managers["alice"].connection_of("bob")
        assert connection is not None
        connection.protocol.transport.loseConnection()  # type: ignore[attr-defined]
        self.run_for(1)
        self.assertEqual(self.agents["alice"].starts, 2)  # signaling reopened for the dropped peer
        self.run_for(30)
        self.assertTrue(self.managers["alice"].all_done())
        self.assertFalse(self.agents["alice"].signaling_up)
        self.assertEqual(self.agents["alice"].starts, 2)
