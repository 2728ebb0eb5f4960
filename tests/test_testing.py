"""kerjostunt.testing: an application's own test, written the way its users would."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import Clock
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.client.calls import ConnectFailed
from kerjostunt.client.endpoint import PeerEndpoint
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
