"""Nothing a peer sends may break the server (architecture, section 7).

``GarbageTests`` generates 1,000 bad inputs (random bytes, mutated REGISTERs,
huge lines/headers/bodies, too many headers, bad Content-Length, non-UTF-8,
half messages then close, byte-at-a-time slow input), sends most of them over
real TLS connections to a real server and drips the slow ones through the
signaling protocol on a ``Clock``, then checks that the server still answers a
well-formed REGISTER with 200 and that nothing was logged as an error.

``tests.test_signaling`` pins down each limit on its own.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
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
    ConnectionLimits,
    SignalingFactory,
)
from kerjostunt.wire.sip.parser import Limits

from .support import DOMAIN, add_users, connect_client, start_server

log = Logger()

SEED = 20261124
TOTAL_INPUTS = 1000
SLOW_INPUTS = 100          # dripped through the protocol on a Clock
CONCURRENCY = 48           # real TLS connections open at once
DEADLINE = 15.0            # a server that must answer or close has this long

SIP_LIMITS = Limits()
# The signaling limits of the slow cases here and of tests.test_signaling.
LIMITS = ConnectionLimits(
    handshake_timeout=10.0,
    register_timeout=30.0,
    idle_timeout=900.0,
    partial_message_timeout=20.0,
    max_per_ip=3,
    requests_per_second=1.0,
    request_burst=3.0,
)


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
    n = iter(range(1, 10**6))
    cases = [
        *_junk_cases(rng),
        *_mutated_cases(rng, n),
        *_oversized_cases(rng, n),
        *_bad_framing_cases(rng, n),
        *_wrong_inside_cases(n),
        *_half_and_slow_cases(rng, n),
    ]
    assert len(cases) == TOTAL_INPUTS, len(cases)
    rng.shuffle(cases)
    return cases


def _junk_cases(rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    # Random bytes, short and long; sent whole or dribbled in small writes.
    for _ in range(200):
        size = rng.choice([1, 2, 3, 4, 7, 16, 100, 1000, 5000, 20000])
        cases.append(Case("random bytes", rng.randbytes(size), None, chunk=rng.choice([0, 0, 1, 7, 512])))
    # Random printable junk that looks line-based (passes the control-character check).
    for _ in range(40):
        lines = ["".join(rng.choice("ABCDEFGHIJ :;<>@=\t-/.0123456789") for _ in range(rng.randint(0, 80))) for _ in range(rng.randint(1, 20))]
        cases.append(Case("junk lines", ("\r\n".join(lines) + "\r\n\r\n").encode(), None))
    return cases


def _mutated_cases(rng: random.Random, n: Iterator[int]) -> list[Case]:
    cases: list[Case] = []
    # Mutated valid REGISTERs: byte flips, cut/duplicated ranges, swapped lines, bad lengths.
    for _ in range(260):
        cases.append(Case("mutated REGISTER", _mutate(rng, register_bytes(next(n))), None, chunk=rng.choice([0, 0, 0, 13])))
    return cases


def _oversized_cases(rng: random.Random, n: Iterator[int]) -> list[Case]:
    cases: list[Case] = []
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
    return cases


def _bad_framing_cases(rng: random.Random, n: Iterator[int]) -> list[Case]:
    cases: list[Case] = []
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
    return cases


def _wrong_inside_cases(n: Iterator[int]) -> list[Case]:
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
    return [Case("wrong inside", semantic[i % len(semantic)](next(n)), "answer") for i in range(40)]


def _half_and_slow_cases(rng: random.Random, n: Iterator[int]) -> list[Case]:
    cases: list[Case] = []
    # Half messages, then the client hangs up.
    for _ in range(90):
        whole = register_bytes(next(n), body=b"hello", content_length="5")
        cases.append(Case("half message then close", whole[: rng.randint(1, len(whole) - 1)], None))

    # Slow input, one byte per step on a Clock: fast enough to finish, or too slow.
    for i in range(SLOW_INPUTS):
        whole = register_bytes(next(n))
        if i % 2:
            step = LIMITS.partial_message_timeout / len(whole) / 2  # finishes in time
        else:
            step = 1.0  # ~400 s for the message: the partial-message timer fires first
            whole = whole[: rng.randint(30, len(whole))] if i % 4 == 0 else whole
        cases.append(Case("slow input", whole, "answer" if i % 2 else "closed", slow_step=step))
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
        slow_factory = SignalingFactory(self.running.server.router, clock, LIMITS, tls=False)
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
