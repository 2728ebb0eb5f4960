"""The signaling connection's limits, one at a time (``kerjostunt.server.signaling``).

``StringTransport`` and ``Clock``: timeouts, the per-IP connection limit, the
request token bucket, the error responses, and the RTT from TCP_INFO or
keepalive pings. ``tests.test_robustness`` throws garbage at a real server.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.server.signaling import (
    QUICK_PING_INTERVAL,
    RTT_SAMPLES,
    TCPI_MIN_RTT_OFFSET,
    TCPI_RTT_OFFSET,
    AdmittingTLSFactory,
    ConnectionLimits,
    SignalingFactory,
    SignalingProtocol,
    kernel_rtt,
    rtt_from_tcp_info,
)
from kerjostunt.wire.sip.message import Request, Response
from kerjostunt.wire.sip.parser import Limits, StreamParser

from .support import DOMAIN
from .test_robustness import LIMITS, SIP_LIMITS, register_bytes


class FakeRouter:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        self.lost: list[SignalingProtocol] = []

    def handle_request(self, connection: SignalingProtocol, request: Request) -> None:
        self.requests.append(request)

    def handle_response(self, connection: SignalingProtocol, response: Response) -> None:
        self.responses.append(response)

    def connection_lost(self, connection: SignalingProtocol) -> None:
        self.lost.append(connection)


def options_bytes(n: int) -> bytes:
    return register_bytes(n).replace(b"REGISTER", b"OPTIONS")


class SocketStringTransport(StringTransport):
    """A StringTransport whose handle is a real socket, as tcp.Server's is."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def getHandle(self) -> socket.socket:
        return self._sock


def tcp_info(*, rtt_us: int, min_rtt_us: int | None, size: int = 232) -> bytes:
    """A packed Linux struct tcp_info with only the RTT fields set."""
    info = bytearray(size)
    struct.pack_into("=I", info, TCPI_RTT_OFFSET, rtt_us)
    if min_rtt_us is not None:
        struct.pack_into("=I", info, TCPI_MIN_RTT_OFFSET, min_rtt_us)
    return bytes(info)


class TcpInfoTests(unittest.TestCase):
    def test_min_rtt_preferred(self) -> None:
        self.assertAlmostEqual(rtt_from_tcp_info(tcp_info(rtt_us=45_000, min_rtt_us=40_123)), 0.040123)

    def test_old_kernel_without_min_rtt_uses_smoothed(self) -> None:
        self.assertAlmostEqual(rtt_from_tcp_info(tcp_info(rtt_us=45_000, min_rtt_us=None, size=104)), 0.045)

    def test_no_min_rtt_sample_yet(self) -> None:
        self.assertAlmostEqual(rtt_from_tcp_info(tcp_info(rtt_us=7_000, min_rtt_us=0xFFFFFFFF)), 0.007)
        self.assertIsNone(rtt_from_tcp_info(tcp_info(rtt_us=0, min_rtt_us=0)))
        self.assertIsNone(rtt_from_tcp_info(b"\x01" * 20))

    def test_this_kernel_on_loopback(self) -> None:
        """The offsets hold on the running kernel: state ESTABLISHED, RTT small and positive."""
        if not hasattr(socket, "TCP_INFO"):
            raise unittest.SkipTest("no TCP_INFO here")
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        for sock in (listener, client, accepted):
            self.addCleanup(sock.close)
        info = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        self.assertEqual(info[0], 1)  # tcpi_state TCP_ESTABLISHED: the struct starts where we think
        (mss,) = struct.unpack_from("=I", info, 16)  # tcpi_snd_mss, a sanity anchor between the fields
        self.assertGreater(mss, 500)
        rtt = rtt_from_tcp_info(info)
        self.assertIsNotNone(rtt)
        self.assertTrue(0 < rtt < 0.5, rtt)


class SignalingProtocolTests(unittest.TestCase):
    limits = LIMITS

    def setUp(self) -> None:
        self.clock = Clock()
        self.router = FakeRouter()

    def connect(self, *, tls_: bool = False, host: str = "203.0.113.5", limits: ConnectionLimits | None = None, factory: SignalingFactory | None = None, transport: StringTransport | None = None):  # type: ignore[no-untyped-def]
        factory = factory or SignalingFactory(self.router, self.clock, limits or self.limits, tls=tls_)
        proto = factory.buildProtocol(IPv4Address("TCP", host, 5555))
        if proto is None:
            return None, None
        transport = transport or StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def responses(self, transport: StringTransport) -> list[Response]:
        parser = StreamParser()
        return [m for m in parser.feed(transport.value()) if isinstance(m, Response)]

    # -- timeouts ---------------------------------------------------------------

    def test_tls_handshake_timeout(self) -> None:
        proto, transport = self.connect(tls_=True)
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)  # aborted, not a polite close

    def test_handshake_in_time_starts_register_timer(self) -> None:
        proto, transport = self.connect(tls_=True)
        self.clock.advance(9.0)
        proto.handshakeCompleted()
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)

    def test_register_timeout(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(options_bytes(1))  # requests that do not register do not count
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)

    def test_idle_timeout_after_registering(self) -> None:
        proto, transport = self.connect()
        proto.bound("alice")
        self.clock.advance(600)
        transport.clear()  # the server's own keepalive pings
        proto.dataReceived(b"\r\n\r\n")  # a keepalive is activity
        self.assertEqual(transport.value(), b"\r\n")  # pong
        self.clock.advance(899)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnected)

    def test_registered_connection_has_one_timer_for_pings_and_idle(self) -> None:
        """Keepalive pings every rtt_interval and the idle limit share one timer;
        activity does not re-arm it (memory and CPU per held peer)."""
        proto, transport = self.connect()
        proto.bound("alice")
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"\r\n\r\n")  # the first ping measures the RTT
        for _ in range(RTT_SAMPLES - 1):  # and a few quick ones after it
            transport.clear()
            self.clock.advance(QUICK_PING_INTERVAL)
            self.assertEqual(transport.value(), b"\r\n\r\n")
        transport.clear()
        self.clock.advance(self.limits.rtt_interval - 1)
        for _ in range(5):
            proto.dataReceived(b"\r\n\r\n")  # activity: pongs, no new timer
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        transport.clear()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"\r\n\r\n")  # the next ping, on time
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.dataReceived(b"\r\n")  # pong: an RTT sample
        self.assertIsNotNone(proto.rtt)

    def test_rtt_is_the_smallest_recent_sample(self) -> None:
        proto, transport = self.connect()
        proto.bound("alice")
        self.assertIsNone(proto.rtt)
        for delay in (0.120, 0.040, 0.300):  # a queueing spike must not count
            self.clock.advance(0 if proto._ping_sent_at is not None else QUICK_PING_INTERVAL)
            self.clock.advance(delay)
            proto.dataReceived(b"\r\n")
        self.assertAlmostEqual(proto.rtt, 0.040)
        for _ in range(RTT_SAMPLES):  # old samples age out
            self.clock.advance(self.limits.rtt_interval)
            self.clock.advance(0.080)
            proto.dataReceived(b"\r\n")
        self.assertAlmostEqual(proto.rtt, 0.080)

    def test_kernel_rtt_replaces_the_quick_pings(self) -> None:
        """Over a real TCP socket the kernel's RTT is there at once: no quick
        pings, only the liveness ping per rtt_interval."""
        server_side = self.tcp_pair()
        proto, transport = self.connect(transport=SocketStringTransport(server_side))
        proto.bound("alice")
        self.clock.advance(0)
        self.clock.advance(QUICK_PING_INTERVAL * RTT_SAMPLES)
        self.assertEqual(transport.value(), b"")  # no pings to measure anything
        rtt = proto.rtt
        self.assertIsNotNone(rtt)
        self.assertTrue(0 < rtt < 1.0, rtt)  # loopback: microseconds
        self.clock.advance(self.limits.rtt_interval - QUICK_PING_INTERVAL * RTT_SAMPLES)
        self.assertEqual(transport.value(), b"\r\n\r\n")  # liveness, on time
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_rtt_falls_back_to_pings_without_a_tcp_socket(self) -> None:
        a, b = socket.socketpair()  # AF_UNIX: TCP_INFO fails
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        proto, transport = self.connect(transport=SocketStringTransport(a))
        proto.bound("alice")
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"\r\n\r\n")  # the quick pings measure it
        self.assertIsNone(proto.rtt)
        self.clock.advance(0.025)
        proto.dataReceived(b"\r\n")
        self.assertAlmostEqual(proto.rtt, 0.025)

    def test_kernel_rtt_through_the_tls_wrapper(self) -> None:
        """TLSMemoryBIOProtocol.getHandle is the OpenSSL connection: the socket is one level down."""
        server_side = self.tcp_pair()

        class Wrapper:
            def __init__(self) -> None:
                self.transport = SocketStringTransport(server_side)

            def getHandle(self) -> object:
                return object()

        self.assertIsNotNone(kernel_rtt(Wrapper()))
        self.assertIsNone(kernel_rtt(StringTransport()))

    def tcp_pair(self) -> socket.socket:
        """The accepted end of a real TCP connection on 127.0.0.1 that has carried data."""
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        for sock in (listener, client, accepted):
            self.addCleanup(sock.close)
        accepted.sendall(b"x")
        client.recv(1)
        return accepted

    def test_partial_message_timeout(self) -> None:
        proto, transport = self.connect()
        proto.bound("alice")  # registered: only the partial-message timer is short
        whole = options_bytes(2)
        proto.dataReceived(whole[:40])
        self.clock.advance(10)
        proto.dataReceived(whole[40:80])  # more bytes do not restart it
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.router.requests, [])

    def test_partial_timeout_leaves_no_timer_behind(self) -> None:
        """The connection's other timer must go too, or it fires on a dead connection later."""
        counted: list[str] = []
        factory = SignalingFactory(self.router, self.clock, self.limits, tls=False, counter=counted.append)
        proto, transport = self.connect(factory=factory)
        proto.dataReceived(options_bytes(4)[:40])
        self.clock.advance(self.limits.partial_message_timeout + 0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(self.limits.register_timeout)
        self.assertEqual(counted.count("timeouts"), 1)

    def test_completed_message_cancels_partial_timer(self) -> None:
        proto, transport = self.connect()
        proto.bound("alice")
        whole = options_bytes(3)
        proto.dataReceived(whole[:40])
        self.clock.advance(19)
        proto.dataReceived(whole[40:])
        self.clock.advance(19)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.router.requests), 1)

    # -- per-IP limit -----------------------------------------------------------

    def test_per_ip_connection_limit(self) -> None:
        factory = SignalingFactory(self.router, self.clock, self.limits, tls=False)
        opened = [self.connect(factory=factory)[0] for _ in range(3)]
        self.assertNotIn(None, opened)
        # Registered: a full table of unregistered ones would make room instead (tests.test_abuse).
        for index, conn in enumerate(opened):
            conn.bound(f"user{index}")
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "203.0.113.5", 6000)))
        # The TLS wrapper refuses before any handshake work.
        wrapper = AdmittingTLSFactory(tls.server_options(self._certs()), False, factory)
        self.assertIsNone(wrapper.buildProtocol(IPv4Address("TCP", "203.0.113.5", 6001)))
        # Other addresses are not affected; closing one makes room again.
        self.assertIsNotNone(self.connect(factory=factory, host="203.0.113.6")[0])
        opened[0].connectionLost(Failure(ConnectionError()))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "203.0.113.5", 6002)))

    def test_tls_writes_are_not_deferred_to_a_timer(self) -> None:
        """Each SIP message is one write: no per-write aggregation timer (Twisted's default wrapper has one)."""
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        factory = SignalingFactory(self.router, self.clock, self.limits, tls=True)
        wrapper = AdmittingTLSFactory(tls.server_options(self._certs()), False, factory)
        proto = wrapper.buildProtocol(IPv4Address("TCP", "203.0.113.7", 6000))
        self.assertIsInstance(proto, TLSMemoryBIOProtocol)  # LazyTLSProtocol: a plain one, made lazily
        self.assertFalse(hasattr(proto, "_aggregator"))

    def _certs(self):  # type: ignore[no-untyped-def]
        from pathlib import Path

        base = Path(self.mktemp())
        return tls.ensure_certificates(base, DOMAIN)

    # -- token bucket -----------------------------------------------------------

    def test_token_bucket_answers_503_with_retry_after(self) -> None:
        proto, transport = self.connect()
        for k in range(4):
            proto.dataReceived(options_bytes(10 + k))
        self.assertEqual(len(self.router.requests), 3)  # the burst
        [refused] = self.responses(transport)
        self.assertEqual(refused.code, 503)
        self.assertEqual(refused.headers.get("Retry-After"), "1")
        self.assertEqual(refused.headers.get("Call-ID"), "call-13@garbage.test")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)  # one token back
        proto.dataReceived(options_bytes(20))
        self.assertEqual(len(self.router.requests), 4)

    # -- error responses --------------------------------------------------------

    def assertAnswers(self, response: Response, code: int, n: int, cseq: str = "1 REGISTER") -> None:
        self.assertEqual(response.code, code)
        self.assertEqual(response.headers.get("Call-ID"), f"call-{n}@garbage.test")
        self.assertEqual(response.headers.get("CSeq"), cseq)

    def test_400_keeps_the_connection(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(30).replace(b"CSeq: 1 REGISTER", b"CSeq: 1 INVITE"))
        [response] = self.responses(transport)
        self.assertAnswers(response, 400, 30, "1 INVITE")
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(options_bytes(31))  # the stream goes on
        self.assertEqual(len(self.router.requests), 1)

    def test_bad_content_length_is_400_and_fatal(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(32, content_length="12abc"))
        [response] = self.responses(transport)
        self.assertAnswers(response, 400, 32)
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(options_bytes(33))  # nothing more is processed
        self.assertEqual(self.router.requests, [])

    def test_413_for_a_body_over_the_limit(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(34, content_length=str(SIP_LIMITS.max_body_bytes + 1)))
        [response] = self.responses(transport)
        self.assertAnswers(response, 413, 34)
        self.assertTrue(transport.disconnecting)

    def test_513_for_a_message_over_the_limit(self) -> None:
        small = ConnectionLimits(sip=Limits(max_message_bytes=2000, max_body_bytes=32768))
        proto, transport = self.connect(limits=small)
        proto.dataReceived(register_bytes(35, content_length="5000"))
        [response] = self.responses(transport)
        self.assertAnswers(response, 513, 35)
        self.assertTrue(transport.disconnecting)

    def test_513_limits_without_a_message_close(self) -> None:
        for payload in (
            b"R" * (SIP_LIMITS.max_line_bytes + 10),
            register_bytes(36, extra="".join(f"X-N{i}: v\r\n" for i in range(SIP_LIMITS.max_headers + 1))),
        ):
            proto, transport = self.connect()
            proto.dataReceived(payload)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(self.responses(transport), [])  # no Call-ID to answer with

    def test_non_utf8_header_is_fatal(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(37).replace(b"Expires: 3600", b"Expires: \xff"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.router.requests, [])

    def test_input_after_a_fatal_error_is_not_handled_or_logged(self) -> None:
        """A TLS close waits for the peer's close_notify, and the records it
        sends meanwhile still arrive: each used to make the parser raise its
        fatal error again, one log line and one count per read (74 lines in
        3 s from one connection on a real server)."""
        counted: list[str] = []
        factory = SignalingFactory(self.router, self.clock, self.limits, tls=False, counter=counted.append)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proto, transport = self.connect(factory=factory)
        proto.dataReceived(register_bytes(39, content_length=str(SIP_LIMITS.max_body_bytes + 1)))
        self.assertTrue(transport.disconnecting)
        answered = transport.value()
        for _ in range(20):
            proto.dataReceived(b"x" * 1000)
        proto.dataReceived(options_bytes(40))
        self.assertEqual(counted, ["parse_errors"])
        self.assertEqual(len([e for e in events if "Bad input" in str(e.get("log_format"))]), 1)
        self.assertEqual(transport.value(), answered)  # nothing more was sent
        self.assertEqual(self.router.requests, [])

    def test_input_after_close_is_not_handled(self) -> None:
        """A connection the server closes (its user registered elsewhere, a
        cluster takeover) handles nothing its peer sends while the close is
        under way."""
        proto, transport = self.connect()
        proto.close()
        proto.dataReceived(options_bytes(41))
        self.assertEqual(self.router.requests, [])
        self.assertEqual(transport.value(), b"")

    def test_fatal_close_still_times_out_a_peer_that_never_reads(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(38, content_length="-1"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(self.limits.handshake_timeout + 0.1)
        self.assertTrue(transport.disconnected)
