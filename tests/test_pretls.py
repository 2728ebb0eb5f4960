"""Issue 13: a connection that never starts TLS costs no OpenSSL state (``limits.LazyTLSProtocol``).

7,000 connections that never sent a ClientHello cost the server 48 KiB each:
``TLSMemoryBIOProtocol`` made its ``SSL`` object and ran a first handshake
step at accept. Now both wait for the first byte. These tests also hold the
Twisted internals the class relies on to their meaning.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.server.limits import ConnectionLimits, LazyTLSProtocol
from kerjostunt.server.signaling import AdmittingTLSFactory, SignalingFactory

from .support import DOMAIN, add_users, connect_client, start_server

PEER = IPv4Address("TCP", "203.0.113.7", 6000)


class _Router:
    def handle_request(self, *args: Any) -> None: ...

    def handle_response(self, *args: Any) -> None: ...

    def connection_lost(self, *args: Any) -> None: ...


class LazyUnitTests(unittest.TestCase):
    def setUp(self) -> None:
        from pathlib import Path

        self.clock = Clock()
        self.signaling = SignalingFactory(_Router(), self.clock, ConnectionLimits())
        certs = tls.ensure_certificates(Path(self.mktemp()), DOMAIN)
        self.factory = AdmittingTLSFactory(tls.server_options(certs), False, self.signaling)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(PEER)
        self.assertIsInstance(proto, LazyTLSProtocol)
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport

    def test_nothing_of_openssl_until_the_first_byte(self) -> None:
        proto, transport = self.connect()
        self.assertIsNone(proto._tlsConnection)
        self.assertEqual(len(self.signaling.connections), 1)  # counted and timed from accept all the same
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"\x16\x03\x01")  # the start of a ClientHello
        self.assertIsNotNone(proto._tlsConnection)
        self.assertFalse(transport.disconnecting)

    def test_handshake_timeout_before_any_byte(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(ConnectionLimits().handshake_timeout + 0.1)
        self.assertTrue(transport.disconnecting)  # aborted, nothing to shut down
        proto.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.signaling.connections, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lose_and_lost_before_any_byte(self) -> None:
        proto, transport = self.connect()
        proto.loseConnection()
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionError()))
        proto.dataReceived(b"\x16")  # after the loss: ignored, nothing created
        self.assertIsNone(proto._tlsConnection)
        self.assertEqual(self.signaling.connections, set())

    def test_stalled_handshakes_past_the_limit_close_the_oldest(self) -> None:
        counts: list[str] = []
        self.signaling._counter = counts.append
        self.factory.pending_handshakes.limit = 3
        conns = [self.connect() for _ in range(5)]
        for proto, _ in conns:
            proto.dataReceived(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, then nothing
        self.assertEqual([t.disconnecting for _, t in conns], [True, True, False, False, False])
        self.assertEqual(counts.count("evicted_handshakes"), 2)
        self.assertEqual(len(self.factory.pending_handshakes), 3)
        conns[4][0].connectionLost(Failure(ConnectionError()))
        self.assertEqual(len(self.factory.pending_handshakes), 2)
        self.clock.advance(60)  # handshake timeouts, and the refusals' one summary: no timer left
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_write_before_the_handshake_waits_for_it(self) -> None:
        proto, transport = self.connect()
        proto.write(b"hello")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(proto._appSendBuffer, [b"hello"])


class LazyOnSocketsTests(unittest.TestCase):
    """A real server: silent TCP connections hold no TLS object; a real client still registers."""

    @defer.inlineCallbacks
    def test_silent_connections_and_a_real_client(self):  # type: ignore[no-untyped-def]
        running = yield start_server(self)
        add_users(running, {"alice": "wonderland"})
        creator = protocol.ClientCreator(reactor, protocol.Protocol)
        silent = []
        for _ in range(20):
            silent.append((yield creator.connectTCP(running.host, running.port)))
        self.addCleanup(lambda: [p.transport.abortConnection() for p in silent])
        client = yield connect_client(self, running, "alice", "wonderland")
        yield client.register()
        conns = running.server.signaling.connections
        pending = [c for c in conns if c.transport._tlsConnection is None]
        done = [c for c in conns if c.transport._tlsConnection is not None]
        self.assertEqual(len(done), 1)       # alice's
        self.assertEqual(len(pending), 20)  # accepted in order: all before alice
        self.assertEqual(len(pending) + len(done), len(conns))
        # alice's handshake is done: not pending; the silent ones never started one.
        self.assertEqual(len(running.server.signaling_tls.pending_handshakes), 0)
