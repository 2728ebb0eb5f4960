"""Nothing a peer sends may break the server (architecture, section 7).

``GarbageTests`` generates 1,000 bad inputs (random bytes, mutated REGISTERs,
huge lines/headers/bodies, too many headers, bad Content-Length, non-UTF-8,
half messages then close, byte-at-a-time slow input), sends most of them over
real TLS connections to a real server and drips the slow ones through the
signaling protocol on a ``Clock``, then checks that the server still answers a
well-formed REGISTER with 200 and that nothing was logged as an error.

``SignalingProtocolTests`` pins down each limit on its own with
``StringTransport`` and ``Clock``: timeouts, the per-IP connection limit, the
request token bucket, and the error responses.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

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

from .support import DOMAIN, add_users, connect_client, start_server

log = Logger()

SEED = 20261124
TOTAL_INPUTS = 1000
SLOW_INPUTS = 100          # dripped through the protocol on a Clock
CONCURRENCY = 48           # real TLS connections open at once
DEADLINE = 15.0            # a server that must answer or close has this long

SIP_LIMITS = Limits()


def register_bytes(n: int, user: str = "alice", *, body: bytes = b"", extra: str = "", content_length: str | None = None) -> bytes:
    """A well-formed REGISTER (no credentials) numbered ``n``."""
    cl = str(len(body)) if content_length is None else content_length
    head = (
        f"REGISTER sips:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 192.0.2.1:5061;branch=z9hG4bK{n:08d};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sips:{user}@{DOMAIN}>;tag=t{n}\r\n"
        f"To: <sips:{user}@{DOMAIN}>\r\n"
        f"Call-ID: call-{n}@garbage.test\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sips:{user}@192.0.2.1:5061;transport=tls>\r\n"
        "Expires: 3600\r\n"
        f"{extra}"
        f"Content-Length: {cl}\r\n"
        "\r\n"
    )
    return head.encode() + body


# -- what to send ---------------------------------------------------------------

#: How a real-socket case ends: we hang up right after sending (None), the
#: server must close the connection itself ("closed"), or it must answer with a
#: status line and may keep the connection ("answer").
Expect = str | None


@dataclass
class Case:
    kind: str
    payload: bytes
    expect: Expect = None
    chunk: int = 0          # 0: one write; else write in pieces of this size
    slow_step: float = 0.0  # slow cases: Clock seconds between bytes


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        i = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:                     # flip a byte
            buf[i] = rng.randrange(256)
        elif op == 1 and buf:                   # delete a range
            del buf[i : i + rng.randint(1, 40)]
        elif op == 2 and buf:                   # duplicate a range
            j = i + rng.randint(1, 200)
            buf[i:i] = buf[i:j]
        elif op == 3:                           # insert random bytes
            buf[i:i] = rng.randbytes(rng.randint(1, 30))
        elif op == 4:                           # insert a CRLF / bare LF / CR
            buf[i:i] = rng.choice([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\x00"])
        elif op == 5:                           # swap two lines
            lines = bytes(buf).split(b"\r\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a], lines[b] = lines[b], lines[a]
            buf = bytearray(b"\r\n".join(lines))
        else:                                   # a bogus Content-Length
            buf = bytearray(bytes(buf).replace(b"Content-Length: 0", b"Content-Length: " + str(rng.choice([1, 5, 99, 4000])).encode(), 1))
    return bytes(buf)


def generate_cases(rng: random.Random) -> list[Case]:
    """The 1,000 inputs, in a fixed mix; the seed makes every run the same."""
    cases: list[Case] = []
    n = iter(range(1, 10**6))

    # Random bytes, short and long; sent whole or dribbled in small writes.
    for _ in range(200):
        size = rng.choice([1, 2, 3, 4, 7, 16, 100, 1000, 5000, 20000])
        cases.append(Case("random bytes", rng.randbytes(size), None, chunk=rng.choice([0, 0, 1, 7, 512])))
    # Random printable junk that looks line-based (passes the control-character check).
    for _ in range(40):
        lines = ["".join(rng.choice("ABCDEFGHIJ :;<>@=\t-/.0123456789") for _ in range(rng.randint(0, 80))) for _ in range(rng.randint(1, 20))]
        cases.append(Case("junk lines", ("\r\n".join(lines) + "\r\n\r\n").encode(), None))

    # Mutated valid REGISTERs: byte flips, cut/duplicated ranges, swapped lines, bad lengths.
    for _ in range(260):
        cases.append(Case("mutated REGISTER", _mutate(rng, register_bytes(next(n))), None, chunk=rng.choice([0, 0, 0, 13])))

    # Oversized: the server must answer what it can and close.
    for _ in range(25):
        cases.append(Case("huge request line", b"REGISTER sips:" + b"a" * rng.randint(4200, 70000) + b" SIP/2.0\r\n\r\n", "closed"))
    for _ in range(25):
        cases.append(Case("huge header line", register_bytes(next(n), extra="X-Big: " + "b" * rng.randint(4200, 40000) + "\r\n"), "closed"))
    for _ in range(25):
        many = "".join(f"X-H{i}: {'v' * 700}\r\n" for i in range(rng.randint(25, 50)))
        cases.append(Case("huge header section", register_bytes(next(n), extra=many), "closed"))
    for _ in range(25):
        many = "".join(f"X-N{i}: v\r\n" for i in range(rng.randint(70, 500)))
        cases.append(Case("too many headers", register_bytes(next(n), extra=many), "closed"))
    for _ in range(25):
        size = rng.choice([SIP_LIMITS.max_body_bytes + 1, 100_000, 10**9, 10**30])
        body = rng.randbytes(min(size, rng.choice([0, 1000, 40000])))
        cases.append(Case("huge body", register_bytes(next(n), body=body, content_length=str(size)), "closed", chunk=rng.choice([0, 4096])))
    for _ in range(25):
        cases.append(Case("endless line", rng.choice([b"R", b"\x01", b" "]) * rng.randint(20000, 200000), "closed", chunk=rng.choice([0, 16384])))

    # Bad Content-Length: not a number, signed, conflicting, spaced, hex, empty.
    bad_lengths = ["-1", "+5", "abc", "12abc", "0x10", "1 2", "", "\u0661", "99999999999999999999999", "1.5", "0, 5"]
    for i in range(60):
        value = bad_lengths[i % len(bad_lengths)]
        if i % 5 == 4:  # two Content-Length headers that disagree
            payload = register_bytes(next(n), extra="Content-Length: 7\r\n")
        else:
            payload = register_bytes(next(n), content_length=value)
        cases.append(Case("bad Content-Length", payload, "closed"))

    # Not UTF-8: in the header section (fatal) and in a body (just bytes).
    for _ in range(30):
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])
        payload = register_bytes(next(n)).replace(b"Expires: 3600", b"Expires: 36" + bad, 1)
        cases.append(Case("non-UTF-8 header", payload, "closed"))
    for _ in range(30):
        cases.append(Case("non-UTF-8 body", register_bytes(next(n), body=b"\xff\xfe\x00" + rng.randbytes(40)), "answer"))

    # Well framed, wrong inside: answered (400/404/505...), the stream goes on.
    semantic: list[Callable[[int], bytes]] = [
        lambda k: register_bytes(k).replace(b"CSeq: 1 REGISTER", b"CSeq: 1 INVITE"),
        lambda k: register_bytes(k).replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1),
        lambda k: register_bytes(k).replace(b"sips:kerjo.test SIP", b"nonsense SIP", 1),
        lambda k: register_bytes(k).replace(b"Call-ID:", b"X-Not-Call-ID:"),
        lambda k: register_bytes(k, extra="To: <sips:bob@kerjo.test>\r\n"),
        lambda k: register_bytes(k).replace(b"kerjo.test>\r\nCall", b"elsewhere.test>\r\nCall"),
        lambda k: register_bytes(k, extra="Authorization: Digest garbage\r\n"),
        lambda k: register_bytes(k, extra='Authorization: Digest username="alice", realm="kerjo.test", nonce="x", uri="sips:kerjo.test", response="00", algorithm=ROT13\r\n'),
        lambda k: register_bytes(k).replace(b"Expires: 3600", b"Expires: -5"),
        lambda k: register_bytes(k).replace(b"Contact: <sips", b"Contact: <<<sips"),
    ]
    for i in range(40):
        cases.append(Case("wrong inside", semantic[i % len(semantic)](next(n)), "answer"))

    # Half messages, then the client hangs up.
    for _ in range(90):
        whole = register_bytes(next(n), body=b"hello", content_length="5")
        cases.append(Case("half message then close", whole[: rng.randint(1, len(whole) - 1)], None))

    # Slow input, one byte per step on a Clock: fast enough to finish, or too slow.
    for i in range(SLOW_INPUTS):
        whole = register_bytes(next(n))
        if i % 2:
            step = SignalingProtocolTests.limits.partial_message_timeout / len(whole) / 2  # finishes in time
        else:
            step = 1.0  # ~400 s for the message: the partial-message timer fires first
            whole = whole[: rng.randint(30, len(whole))] if i % 4 == 0 else whole
        cases.append(Case("slow input", whole, "answer" if i % 2 else "closed", slow_step=step))

    assert len(cases) == TOTAL_INPUTS, len(cases)
    rng.shuffle(cases)
    return cases


#: Small, well-framed inputs whose answer is certain (big ones may lose the
#: answer to a reset while we are still sending).
EXPECTED_CODES = {
    "bad Content-Length": {400, 413},
    "non-UTF-8 body": {401},
    "wrong inside": {400, 401, 404, 505},
    "slow input": {401, None},  # None: too slow, dropped before it was complete
}


def _echoes_call_id(outcome: Outcome) -> bool:
    if outcome.status is None:
        return True
    expected = re.search(rb"^Call-ID: (.*)\r$", outcome.case.payload, re.M)
    return expected is None or (b"Call-ID: " + expected.group(1) + b"\r\n") in outcome.received


# -- sending over real TLS ------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    received: bytes = b""
    server_closed: bool = False
    deadline_hit: bool = False
    error: str = ""

    @property
    def status(self) -> int | None:
        if self.received.startswith(b"SIP/2.0 ") and len(self.received) >= 11 and self.received[8:11].isdigit():
            return int(self.received[8:11])
        return None


@implementer(IHandshakeListener)
class GarbageSender(Protocol):
    """Sends one case after the TLS handshake and sees how the server reacts."""

    def __init__(self, case: Case) -> None:
        self.outcome = Outcome(case)
        self.done: defer.Deferred[Outcome] = defer.Deferred()
        self._we_closed = False
        self._deadline: Any = None

    def handshakeCompleted(self) -> None:
        case = self.outcome.case
        data = case.payload
        if case.chunk:
            self.transport.writeSequence([data[i : i + case.chunk] for i in range(0, len(data), case.chunk)])
        else:
            self.transport.write(data)
        if case.expect is None:
            self._hang_up()
        else:
            self._deadline = reactor.callLater(DEADLINE, self._too_late)

    def dataReceived(self, data: bytes) -> None:
        self.outcome.received += data
        if self.outcome.case.expect == "answer" and b"\r\n\r\n" in self.outcome.received:
            self._hang_up()

    def _hang_up(self) -> None:
        self._we_closed = True
        self.transport.loseConnection()

    def _too_late(self) -> None:
        self._deadline = None
        self.outcome.deadline_hit = True
        self._we_closed = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.outcome.server_closed = not self._we_closed
        if not self.done.called:
            self.done.callback(self.outcome)


def send_case(host: str, port: int, options: Any, case: Case) -> defer.Deferred[Outcome]:
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, host, port, timeout=DEADLINE))
    sender = GarbageSender(case)
    d = endpoint.connect(Factory.forProtocol(lambda: sender))

    def failed(f: Failure) -> Outcome:
        sender.outcome.error = f.getErrorMessage()
        return sender.outcome

    return d.addCallbacks(lambda _: sender.done, failed)


# -- dripping through the protocol on a Clock -----------------------------------


def drip(factory: SignalingFactory, clock: Clock, case: Case, index: int) -> Outcome:
    """Feed a slow case one byte per ``slow_step`` Clock seconds."""
    proto = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000 + index))
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    for byte in case.payload:
        if transport.disconnecting:
            break
        proto.dataReceived(bytes([byte]))
        clock.advance(case.slow_step)
    # Give the partial-message timer its chance, whatever was sent.
    clock.advance(factory.limits.partial_message_timeout + 1)
    outcome = Outcome(case, transport.value(), server_closed=transport.disconnecting)
    proto.connectionLost(Failure(ConnectionError("test over")))
    return outcome


# -- the tests ------------------------------------------------------------------


class GarbageTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland"})

    @defer.inlineCallbacks
    def test_thousand_bad_inputs_leave_the_server_serving(self):  # type: ignore[no-untyped-def]
        rng = random.Random(SEED)
        cases = generate_cases(rng)
        started = time.monotonic()

        # Slow cases: through the server's own router, on a Clock.
        clock = Clock()
        slow_factory = SignalingFactory(self.running.server.router, clock, SignalingProtocolTests.limits, tls=False)
        slow = [drip(slow_factory, clock, c, i) for i, c in enumerate(cases) if c.slow_step]
        self.assertEqual(slow_factory.connections, set())

        # The rest: real TLS connections, CONCURRENCY at a time.
        options = tls.client_options(self.running.ca, "localhost")
        gate = defer.DeferredSemaphore(CONCURRENCY)
        real = yield defer.gatherResults(
            [gate.run(send_case, self.running.host, self.running.port, options, c) for c in cases if not c.slow_step],
            consumeErrors=True,
        )
        elapsed = time.monotonic() - started
        outcomes = slow + list(real)
        self.assertEqual(len(outcomes), TOTAL_INPUTS)

        # Every connection we made got through TLS; the server honoured every expectation.
        problems = [o for o in outcomes if o.error or o.deadline_hit]
        problems += [o for o in outcomes if o.case.expect == "closed" and not o.server_closed]
        problems += [o for o in outcomes if o.case.expect == "answer" and o.status is None]
        # Where the answer is known, it is the right one (with the request's Call-ID).
        for kind, codes in EXPECTED_CODES.items():
            problems += [o for o in outcomes if o.case.kind == kind and (o.status not in codes or not _echoes_call_id(o))]
        self.assertEqual(problems, [], f"seed {SEED}: {len(problems)} cases misbehaved")

        # Every connection is gone on the server side too (no leak, per-IP count back to zero).
        yield self.settled()
        self.assertEqual(self.running.server.signaling.connections, set())

        # And it still serves a well-formed REGISTER.
        client = yield connect_client(self, self.running, "alice", "wonderland")
        registration = yield client.register()
        self.assertEqual(registration.public_ip, "127.0.0.1")

        statuses: dict[int | None, int] = {}
        for o in outcomes:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        log.info(
            "{n} bad inputs in {elapsed:.1f}s; first status seen: {statuses}; server counters: {counters}",
            n=len(outcomes), elapsed=elapsed, statuses=sorted(statuses.items(), key=repr), counters=dict(self.running.server.counters),
        )
        self.assertEqual(self.running.server.counters["internal_errors"], 0)
        self.assertGreater(self.running.server.counters["parse_errors"], 300)
        self.assertTrue(any("Bad input" in str(e.get("log_format")) for e in self.events))  # the observer sees the server
        self.assertNoErrorsLogged()

    @defer.inlineCallbacks
    def settled(self, attempts: int = 200):  # type: ignore[no-untyped-def]
        """Connections the server still has (closing ones) go within a few reactor turns."""
        for _ in range(attempts):
            if not self.running.server.signaling.connections:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)

    def assertNoErrorsLogged(self) -> None:
        failures = [e for e in self.events if "log_failure" in e]
        unhandled = [
            e for e in self.events
            if e.get("isError") or "Unhandled" in str(e.get("log_format", "")) or "Unhandled" in str(e.get("message", ""))
        ]
        self.assertEqual(failures + unhandled, [], "errors were logged")
        self.assertEqual(self.flushLoggedErrors(), [])


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
    limits = ConnectionLimits(
        handshake_timeout=10.0,
        register_timeout=30.0,
        idle_timeout=900.0,
        partial_message_timeout=20.0,
        max_per_ip=3,
        requests_per_second=1.0,
        request_burst=3.0,
    )

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
        self.assertIs(type(proto), TLSMemoryBIOProtocol)
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

    def test_fatal_close_still_times_out_a_peer_that_never_reads(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(register_bytes(38, content_length="-1"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(self.limits.handshake_timeout + 0.1)
        self.assertTrue(transport.disconnected)
