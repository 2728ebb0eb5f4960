"""The server under abuse on real loopback sockets (issue 13): bounded buffers, floods, limits.

Each attack runs against a real server; the limits that end it are
reactor-driven deadlines shortened for the test (the defaults are in
docs/security.rst), so no test sleeps.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from kerjostunt import tls
from kerjostunt.server.limits import (
    TRIM_AFTER_CLOSES,
    TRIM_DELAY,
    TRIM_MIN_INTERVAL,
    ConnectionLimits,
    HeapTrimmer,
    RefusalLog,
    WebLimits,
    buffered_bytes,
)
from kerjostunt.server.signaling import SignalingProtocol
from kerjostunt.server.webchannel import LimitedChannel, WebSite

from .abusers import NonReader, Trickler, options_request, shrink_buffers, socket_of
from .support import add_users, connect_client, start_loopback_server, start_server

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

        sampler = task.LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
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


def metrics_request(n: int) -> bytes:
    return b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"


WEB_LIMITS = WebLimits(max_connections=4, max_output_buffer=256 * 1024, write_stall_timeout=2.0, header_timeout=1.0)


class WebFloodTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running, ports = yield start_loopback_server(
            self, web_endpoint="tcp:0:interface=127.0.0.1", web_limits=WEB_LIMITS
        )
        self.web_port = ports["web"].getHost().port
        add_users(self.running, {"alice": "wonderland"})
        self.site: WebSite = self.running.server.getServiceNamed("web").factory.wrappedFactory
        self.addCleanup(self.site.when_idle)

    def connect(self, proto: Protocol) -> defer.Deferred[Protocol]:
        options = tls.client_options(self.running.ca, "localhost")
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.web_port))
        return connectProtocol(endpoint, proto)

    @defer.inlineCallbacks
    def test_pipelining_non_reader_is_bounded_and_closed(self):  # type: ignore[no-untyped-def]
        attacker = NonReader(reactor, metrics_request, 20_000)
        yield self.connect(attacker)
        yield attacker.ready
        local_port = socket_of(attacker.transport).getsockname()[1]  # type: ignore[union-attr]
        [channel] = [c for c in _web_channels(self.site) if c.transport.getPeer().port == local_port]
        shrink_buffers(socket_of(channel.transport))
        peak = [0]

        def sample() -> None:
            if channel.transport is not None and not channel._guard.aborted and not attacker.gone:
                peak[0] = max(peak[0], buffered_bytes(channel.transport))

        sampler = task.LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        client = yield connect_client(self, self.running, "alice", "wonderland")
        registration = yield client.register()
        self.assertEqual(registration.public_ip, "127.0.0.1")
        yield attacker.lost
        # Paused, the channel neither reads nor answers what it has read: the
        # buffer stays near the transport's 64 KiB and the stall timeout closes it.
        self.assertLessEqual(max(peak[0], channel._guard.peak), WEB_LIMITS.max_output_buffer)
        self.assertEqual(self.running.server.counters["web_output_overflows"], 1)
        self.assertLess(self.running.server.counters["web_requests"], attacker.sent)

    @defer.inlineCallbacks
    def test_slowloris_headers_are_cut_off(self):  # type: ignore[no-untyped-def]
        # One byte per 0.3 s resets the 30 s idle timer every time; the header deadline does not move.
        trickler = Trickler(reactor, metrics_request(0) * 10, 0.3)
        yield self.connect(trickler)
        lived = yield trickler.lost
        self.assertLess(lived, WEB_LIMITS.header_timeout + 2.0)
        self.assertEqual(self.running.server.counters["web_timeouts"], 1)

    @defer.inlineCallbacks
    def test_global_cap_refuses_and_logs_once_per_source(self):  # type: ignore[no-untyped-def]
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        holders = [Trickler(reactor, b"", 60.0) for _ in range(WEB_LIMITS.max_connections)]
        for holder in holders:
            yield self.connect(holder)
        extra = [Trickler(reactor, b"", 60.0) for _ in range(5)]
        for proto in extra:
            yield self.connect(proto)
            yield proto.lost  # refused: closed without a handshake
        self.assertEqual(self.running.server.counters["web_refused"], 5)
        self.assertEqual(self.site.open, WEB_LIMITS.max_connections)
        self.site.refusals.flush()
        lines = [e for e in events if "Refused {n}" in str(e.get("log_format"))]
        self.assertEqual([(e["n"], e["host"]) for e in lines], [(5, "127.0.0.1")])
        for holder in holders:
            holder.transport.loseConnection()  # type: ignore[union-attr]
            yield holder.lost


def _web_channels(site: WebSite) -> list[LimitedChannel]:
    return [o for o in gc.get_objects() if isinstance(o, LimitedChannel) and o.factory is site and o.transport]


@implementer(IHandshakeListener)
class _Collector(Protocol):
    """A raw TLS signaling client: writes ``data`` once TLS is up, keeps what comes back."""

    def __init__(self, data: bytes = b"", until: bytes = b"SIP/2.0 ") -> None:
        self.data, self.until = data, until
        self.received = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.answered: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        if self.data:
            self.transport.write(self.data)  # type: ignore[union-attr]
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.until in self.received and not self.answered.called:
            self.answered.callback(self.received)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost.callback(None)


class _SignalingCase(unittest.TestCase):
    timeout = 30
    limits = ConnectionLimits()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self, self.limits)
        add_users(self.running, {"alice": "wonderland"})

    def connect(self, proto: Protocol) -> defer.Deferred[Protocol]:
        options = tls.client_options(self.running.ca, "localhost")
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.running.port))
        return connectProtocol(endpoint, proto)

    def close(self, proto: _Collector) -> defer.Deferred[None]:
        proto.transport.loseConnection()  # type: ignore[union-attr]
        return proto.lost



class SignalingLimitTests(_SignalingCase):
    limits = ConnectionLimits(max_unregistered=3, max_per_ip=10, ping_burst=10.0, pings_per_second=1.0)

    @defer.inlineCallbacks
    def test_ping_flood_gets_its_burst_answered(self):  # type: ignore[no-untyped-def]
        proto = _Collector(b"\r\n\r\n" * 100 + options_request(1))
        yield self.connect(proto)
        received = yield proto.answered
        pongs = received[: received.index(b"SIP/2.0 ")]
        self.assertEqual(set(pongs.split(b"\r\n")), {b""})
        self.assertLessEqual(pongs.count(b"\r\n"), self.limits.ping_burst + 1)
        self.assertGreaterEqual(self.running.server.counters["pings_dropped"], 89)
        yield self.close(proto)

    @defer.inlineCallbacks
    def test_unregistered_connections_are_capped(self):  # type: ignore[no-untyped-def]
        # The cap over all addresses refuses (a reconnect storm's oldest are nearly done).
        holders = [_Collector() for _ in range(self.limits.max_unregistered)]
        for proto in holders:
            yield self.connect(proto)
            yield proto.ready
        refused = _Collector()
        yield self.connect(refused)
        yield refused.lost  # closed before any handshake
        self.assertFalse(refused.ready.called)
        self.assertEqual(self.running.server.counters["refused_unregistered"], 1)
        # A registered connection no longer counts against the cap.
        yield self.close(holders.pop())
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        admitted = _Collector()
        yield self.connect(admitted)
        yield admitted.ready
        for proto in [*holders, admitted]:
            yield self.close(proto)


class PerIPEvictionTests(_SignalingCase):
    limits = ConnectionLimits(max_per_ip=4)

    @defer.inlineCallbacks
    def test_idle_connections_do_not_lock_out_their_ip(self):  # type: ignore[no-untyped-def]
        # max_per_ip idle connections from 127.0.0.1 used to refuse every other user there.
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        holders = [_Collector() for _ in range(self.limits.max_per_ip - 1)]
        for proto in holders:
            yield self.connect(proto)
            yield proto.ready
        late = yield connect_client(self, self.running, "alice", "wonderland")
        yield holders[0].lost  # the oldest idle one made room
        registration = yield late.register()
        self.assertEqual(registration.public_ip, "127.0.0.1")
        self.assertFalse(client.disconnected.called)  # registered connections are never evicted
        self.assertEqual(self.running.server.counters["evicted"], 1)
        self.assertEqual(self.running.server.counters["refused_per_ip"], 0)
        for proto in holders:
            if not proto.lost.called:
                yield self.close(proto)


class RefusalLogTests(unittest.TestCase):
    def test_one_line_per_source_per_interval(self) -> None:
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        refusals = RefusalLog(clock, "signaling", interval=60.0)
        for _ in range(1000):
            refusals.refused("192.0.2.1", "1000 open from this IP")
        refusals.refused("198.51.100.2", "10000 unregistered open")
        lines = lambda: [e for e in events if "Refused {n}" in str(e.get("log_format"))]  # noqa: E731
        self.assertEqual(lines(), [])
        clock.advance(60.0)
        self.assertEqual(sorted((e["host"], e["n"]) for e in lines()), [("192.0.2.1", 1000), ("198.51.100.2", 1)])
        self.assertEqual(clock.getDelayedCalls(), [])  # no refusal, no timer


class HeapTrimmerTests(unittest.TestCase):
    def test_a_flood_of_closes_makes_one_trim(self) -> None:
        clock = Clock()
        calls: list[int] = []
        trimmer = HeapTrimmer(clock, lambda pad: calls.append(pad) or 1)
        for _ in range(TRIM_AFTER_CLOSES - 1):
            trimmer.closed()
        self.assertEqual(clock.getDelayedCalls(), [])  # a few closes: nothing to give back
        for _ in range(5000):
            trimmer.closed()
        clock.advance(TRIM_DELAY)
        self.assertEqual(calls, [0])
        self.assertEqual(clock.getDelayedCalls(), [])
        # Steady churn: the next trim waits for the interval.
        for _ in range(TRIM_AFTER_CLOSES):
            trimmer.closed()
        clock.advance(TRIM_DELAY)
        self.assertEqual(calls, [0])
        clock.advance(TRIM_MIN_INTERVAL)
        self.assertEqual(calls, [0, 0])


class PromptCloseTests(unittest.TestCase):
    """A producer on the transport must not delay a clean close (TLS waits for none to be registered)."""

    timeout = 20
    limits = ConnectionLimits(handshake_timeout=30.0)  # the "closing" fallback would take 30 s

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running, ports = yield start_loopback_server(
            self, web_endpoint="tcp:0:interface=127.0.0.1", limits=self.limits
        )
        self.web_port = ports["web"].getHost().port

    def connect(self, port: int, proto: Protocol) -> defer.Deferred[Protocol]:
        options = tls.client_options(self.running.ca, "localhost")
        return connectProtocol(wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port)), proto)

    @defer.inlineCallbacks
    def test_fatal_sip_error_closes_at_once(self):  # type: ignore[no-untyped-def]
        bad = options_request(1).replace(b"Content-Length: 0", b"Content-Length: 12abc")
        proto = _Collector(bad)
        yield self.connect(self.running.port, proto)
        started = reactor.seconds()
        yield proto.lost
        self.assertIn(b"SIP/2.0 400", proto.received)
        self.assertLess(reactor.seconds() - started, 5.0)

    @defer.inlineCallbacks
    def test_refused_web_request_closes_at_once(self):  # type: ignore[no-untyped-def]
        proto = _Collector(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", until=b"HTTP/1.1 414")
        yield self.connect(self.web_port, proto)
        started = reactor.seconds()
        yield proto.lost
        self.assertIn(b"HTTP/1.1 414", proto.received)
        self.assertLess(reactor.seconds() - started, 5.0)
