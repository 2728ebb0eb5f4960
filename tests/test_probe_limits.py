"""Issue 13: the probe ports' own bounds (a deadline trickled bytes do not move; a per-IP cap).

9,000 connections from one address, each sending a byte now and then,
stayed open 27 s although the idle timeout was 10 s: every byte restarted
it. Now only a whole request answered moves the deadline, never past
``max_lifetime``, and one address may hold ``max_per_ip`` probe connections
over all probe ports.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from kerjostunt.server.limits import PerSourceCap
from kerjostunt.server.probe import ObservationLog, ProbeFactory, ProbeTokens
from kerjostunt.wire import stun

HOST = IPv4Address("TCP", "198.51.100.1", 3478)


def peer(ip: str = "203.0.113.7", port: int = 40123) -> IPv4Address:
    return IPv4Address("TCP", ip, port)


class DeadlineTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = ProbeFactory(self.clock, ProbeTokens(self.clock), ObservationLog(), idle_timeout=10,
                                    max_lifetime=30)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(peer())
        transport = StringTransport(hostAddress=HOST, peerAddress=peer())
        proto.makeConnection(transport)
        return proto, transport

    def test_trickled_bytes_are_closed_at_the_deadline(self) -> None:
        proto, tr = self.connect()
        request = stun.binding_request()[0]
        for n in range(3):  # one byte every 3 s
            self.clock.advance(3)
            proto.dataReceived(request[n:n + 1])
            self.assertFalse(tr.disconnecting)
        self.clock.advance(0.99)
        self.assertFalse(tr.disconnecting)
        self.clock.advance(0.02)  # 10 s after connecting, whatever trickled in
        self.assertTrue(tr.disconnecting)
        self.assertEqual(tr.value(), b"")

    def test_a_whole_request_gives_the_next_one_its_time(self) -> None:
        proto, tr = self.connect()
        self.clock.advance(9)
        proto.dataReceived(stun.binding_request()[0])
        self.assertNotEqual(tr.value(), b"")
        self.clock.advance(9.9)
        self.assertFalse(tr.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(tr.disconnecting)

    def test_no_connection_outlives_max_lifetime(self) -> None:
        proto, tr = self.connect()
        for _ in range(3):  # a request every 9 s: each alone would be in time
            self.clock.advance(9)
            proto.dataReceived(stun.binding_request()[0])
            self.assertFalse(tr.disconnecting)
        self.clock.advance(2.9)  # 29.9 s
        self.assertFalse(tr.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(tr.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PerIPTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counts: dict[str, int] = {}
        self.cap = PerSourceCap(self.clock, "probe", 2, counter=lambda w: self.counts.__setitem__(
            w, self.counts.get(w, 0) + 1))
        tokens, log = ProbeTokens(self.clock), ObservationLog()
        # Two probe ports, one table.
        self.factories = [ProbeFactory(self.clock, tokens, log, per_ip=self.cap) for _ in range(2)]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_cap_over_all_probe_ports_and_freed_on_close(self) -> None:
        a = self.factories[0].buildProtocol(peer(port=1))
        b = self.factories[1].buildProtocol(peer("::ffff:203.0.113.7", 2))  # the same address, mapped
        self.assertIsNotNone(a)
        self.assertIsNotNone(b)
        for n in range(5):
            self.assertIsNone(self.factories[n % 2].buildProtocol(peer(port=10 + n)))
        self.assertIsNotNone(self.factories[0].buildProtocol(peer("203.0.113.8")))  # another address
        self.assertEqual(self.counts, {"refused_probe_per_ip": 5})
        a.makeConnection(StringTransport(hostAddress=HOST, peerAddress=peer(port=1)))
        a.connectionLost(None)
        self.assertIsNotNone(self.factories[1].buildProtocol(peer(port=20)))

    def test_refusals_are_one_line_per_source(self) -> None:
        for n in range(2 + 100):
            self.factories[0].buildProtocol(peer(port=n))
        self.assertEqual([e for e in self.events if "Refused" in str(e.get("log_format"))], [])
        self.clock.advance(60)
        lines = [e for e in self.events if "Refused" in str(e.get("log_format"))]
        self.assertEqual(len(lines), 1)
        self.assertEqual((lines[0]["n"], lines[0]["what"], lines[0]["host"]), (100, "probe", "203.0.113.7"))


class _Held(protocol.Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.made: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class PerIPSocketTests(TestCase):
    """Real sockets: the connections over the cap are closed by the server at once."""

    @defer.inlineCallbacks
    def test_over_the_cap_closed(self):  # type: ignore[no-untyped-def]
        cap = PerSourceCap(reactor, "probe", 3)
        factory = ProbeFactory(reactor, ProbeTokens(reactor), ObservationLog(), per_ip=cap)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        held = [_Held() for _ in range(5)]
        creator = protocol.ClientCreator(reactor, lambda: held.pop(0))
        clients = []
        for _ in range(5):
            clients.append((yield creator.connectTCP("127.0.0.1", port.getHost().port)))
        # The last two are refused: the server closes them without a byte.
        yield defer.DeferredList([c.lost for c in clients[3:]])
        self.assertEqual(cap.open_from("127.0.0.1"), 3)
        self.assertFalse(any(c.lost.called for c in clients[:3]))
        for c in clients[:3]:
            c.transport.loseConnection()
        yield defer.DeferredList([c.lost for c in clients[:3]])
        cap.stop()

    @defer.inlineCallbacks
    def test_the_server_shares_one_cap_over_its_probe_ports(self):  # type: ignore[no-untyped-def]
        from .support import start_loopback_server

        running, ports = yield start_loopback_server(self, web_endpoint=None, probe_max_per_ip=2)
        self.assertEqual(running.server.probe_cap.max_per_ip, 2)
        held = [_Held() for _ in range(3)]
        creator = protocol.ClientCreator(reactor, lambda: held.pop(0))
        clients = []
        for name in ("probe0", "probe1", "probe0"):
            clients.append((yield creator.connectTCP("127.0.0.1", ports[name].getHost().port)))
        yield clients[2].lost  # the third from 127.0.0.1, on either port: closed at once
        self.assertFalse(clients[0].lost.called or clients[1].lost.called)
        for c in clients[:2]:
            c.transport.loseConnection()
        yield defer.DeferredList([c.lost for c in clients[:2]])
