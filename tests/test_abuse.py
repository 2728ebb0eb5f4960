"""The server under abuse on real loopback sockets (issue 13): bounded buffers, floods, limits.

Each attack runs against a real server; the limits that end it are
reactor-driven deadlines shortened for the test (the defaults are in
docs/security.rst), so no test sleeps.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.server.limits import ConnectionLimits, buffered_bytes
from kerjostunt.server.signaling import SignalingProtocol

from .abusers import NonReader, options_request, shrink_buffers, socket_of
from .support import add_users, connect_client, start_server

FLOOD_LIMITS = ConnectionLimits(max_output_buffer=256 * 1024, write_stall_timeout=2.0)
FLOOD_REQUESTS = 40_000  # about 9 MB of requests; their answers would be about 14 MB


def _server_side(factory_connections: set[SignalingProtocol], local_port: int) -> SignalingProtocol:
    [conn] = [c for c in factory_connections if c.peer[1] == local_port]
    return conn


class SignalingFloodTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self, FLOOD_LIMITS)
        add_users(self.running, {"alice": "wonderland"})

    @defer.inlineCallbacks
    def flood(self):  # type: ignore[no-untyped-def]
        options = tls.client_options(self.running.ca, "localhost")
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.running.port))
        attacker = NonReader(reactor, options_request, FLOOD_REQUESTS)
        yield connectProtocol(endpoint, attacker)
        yield attacker.ready
        local_port = socket_of(attacker.transport).getsockname()[1]  # type: ignore[union-attr]
        conn = _server_side(self.running.server.signaling.connections, local_port)
        shrink_buffers(socket_of(conn.transport))
        return attacker, conn

    @defer.inlineCallbacks
    def test_non_reading_client_is_bounded_and_closed(self):  # type: ignore[no-untyped-def]
        attacker, conn = yield self.flood()
        peak = [0]
        watched = weakref.ref(conn)

        def sample() -> None:
            live = watched()
            if live is not None and not live.closed:
                peak[0] = max(peak[0], buffered_bytes(live.transport))
                reactor.callLater(0.01, sample)

        sample()
        # Meanwhile a legitimate peer registers on its own connection.
        client = yield connect_client(self, self.running, "alice", "wonderland")
        registration = yield client.register()
        self.assertEqual(registration.public_ip, "127.0.0.1")

        sent = yield attacker.lost  # the server closed it
        self.assertTrue(conn.closed)
        self.assertGreater(attacker.bytes_sent, 2 * FLOOD_LIMITS.max_output_buffer)
        self.assertLessEqual(max(peak[0], conn._guard.peak), FLOOD_LIMITS.max_output_buffer)  # type: ignore[union-attr]
        self.assertEqual(self.running.server.counters["output_overflows"], 1)
        self.assertLess(sent, FLOOD_REQUESTS + 1)
        # The connection and its buffers are freed, not kept.
        del conn
        yield deferLater0()
        gc.collect()
        self.assertIsNone(watched())


def deferLater0() -> defer.Deferred[None]:
    """One reactor turn: Twisted drops its last references to a lost connection."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d
