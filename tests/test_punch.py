"""
punch() on loopback: real sockets on 127.0.0.1, ports picked by the kernel.

Where the deadline matters, time comes from a Clock while the sockets are
served by the real reactor (SplitReactor), so no test waits for wall-clock
time to pass.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from kerjostunt.client.handshake import HandshakeFactory, compute_mac
from kerjostunt.client.nat.punch import PunchFailed, PunchPlan, PunchResult, punch
from kerjostunt.client.nat.sockets import listen_reusable, reusable_socket

from .loopback import WaitsForData

LOOP = "127.0.0.1"


class App(WaitsForData):
    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred = Deferred()
        self.is_lost = False

    def connectionLost(self, reason=None) -> None:
        self.is_lost = True
        self.lost.callback(None)


class AppFactory(Factory):
    def __init__(self) -> None:
        self.built: list[App] = []

    def buildProtocol(self, addr):
        p = App()
        p.factory = self
        self.built.append(p)
        return p


class HeldInitiator(Protocol):
    """A peer's initiator whose proof (``KJ1 I``) leaves only when the test says so.

    ``proved`` fires with the responder's R line; ``lost`` when the connection closed.
    """

    nonce_i = b"4" * 32

    def __init__(self) -> None:
        self.buffer = b""
        self.proved: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"KJ1 HELLO " + self.nonce_i + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.proved.called:
            self.proved.callback(self.buffer.split(b"\n")[0])

    def send_proof(self, secret: bytes, call_id: str) -> None:
        nonce_r = self.buffer.split(b"\n")[0].split()[2]
        mac = compute_mac(secret, "initiator", call_id, self.nonce_i, nonce_r)
        self.transport.write(b"KJ1 I " + mac + b"\n")

    def connectionLost(self, reason: object = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


class HeldInitiators(Factory):
    def __init__(self) -> None:
        self.built: list[HeldInitiator] = []
        self.first: Deferred[HeldInitiator] = Deferred()

    def buildProtocol(self, addr):
        p = HeldInitiator()
        self.built.append(p)
        if not self.first.called:
            self.first.callback(p)
        return p


class SplitReactor:
    """Real sockets, Clock time."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def callLater(self, *a, **kw):
        return self._clock.callLater(*a, **kw)

    def seconds(self) -> float:
        return self._clock.seconds()

    def __getattr__(self, name):
        return getattr(reactor, name)


def reserve_port(test: unittest.TestCase) -> int:
    """
    A local port for a punch.  The reserving socket stays bound (not
    listening) until the test ends; being reusable it does not get in the way.
    """
    s = reusable_socket((LOOP, 0))
    test.addCleanup(s.close)
    return s.getsockname()[1]


def closed_port(test: unittest.TestCase) -> int:
    """A port where a connect gets RST: bound by a socket that never listens."""
    s = socket.socket()
    test.addCleanup(s.close)
    s.bind((LOOP, 0))
    return s.getsockname()[1]


def turns(n: int = 5) -> Deferred:
    """Let the real reactor run ``n`` iterations (I/O included), no sleeping."""
    d = deferLater(reactor, 0, lambda: None)
    for _ in range(n - 1):
        d.addCallback(lambda _: deferLater(reactor, 0, lambda: None))
    return d


def close(test: unittest.TestCase, result: PunchResult) -> None:
    def go():
        result.protocol.transport.abortConnection()
        return result.protocol.lost

    test.addCleanup(go)


class PairTests(unittest.TestCase):
    """Two punch() calls against each other, as two peers would."""

    @inlineCallbacks
    def punch_pair(self, factory_a, factory_b, **plan):
        pa, pb = reserve_port(self), reserve_port(self)
        plan.setdefault("deadline", 10.0)
        da = punch(reactor, PunchPlan((LOOP, pa), ((LOOP, pb),), **plan), factory_a)
        db = punch(reactor, PunchPlan((LOOP, pb), ((LOOP, pa),), **plan), factory_b)
        ra, rb = yield gatherResults([da, db])
        close(self, ra)
        close(self, rb)
        return pa, pb, ra, rb

    @inlineCallbacks
    def test_simultaneous_pair_one_connection_each_side(self):
        fa, fb = AppFactory(), AppFactory()
        pa, pb, ra, rb = yield self.punch_pair(fa, fb)
        # The two winners are the two ends of one TCP connection.
        ta, tb = ra.protocol.transport, rb.protocol.transport
        self.assertEqual((ta.getHost().port, ta.getPeer().port), (pa, pb))
        self.assertEqual((tb.getHost().port, tb.getPeer().port), (pb, pa))
        self.assertEqual(ra.remote, (LOOP, pb))
        self.assertEqual(rb.remote, (LOOP, pa))
        allowed = {"simultaneous-open", "accepted"}
        self.assertIn(ra.technique, allowed)
        self.assertIn(rb.technique, allowed)
        self.assertGreaterEqual(ra.attempts, 1)
        # Exactly one working connection: every other protocol was closed.
        for f, winner in ((fa, ra.protocol), (fb, rb.protocol)):
            others = [p for p in f.built if p is not winner]
            yield gatherResults([p.lost for p in others])
            self.assertFalse(winner.is_lost)
        ra.protocol.transport.write(b"from a\n")
        rb.protocol.transport.write(b"from b\n")
        yield rb.protocol.wait_for(b"from a\n")
        yield ra.protocol.wait_for(b"from b\n")

    @inlineCallbacks
    def test_pair_with_handshake(self):
        apps_a, apps_b = AppFactory(), AppFactory()
        fa = HandshakeFactory(b"k", "c1", "initiator", apps_a, reactor)
        fb = HandshakeFactory(b"k", "c1", "responder", apps_b, reactor)
        pa, pb, ra, rb = yield self.punch_pair(fa, fb, low_ttl=1)
        self.assertIs(ra.protocol, fa.chosen)
        self.assertIs(rb.protocol, fb.chosen)
        self.assertEqual(len(apps_a.built), 1)
        self.assertEqual(len(apps_b.built), 1)
        ra.protocol.transport.write(b"ping\n")
        yield rb.protocol.wait_for(b"ping\n")
        rb.protocol.transport.write(b"pong\n")
        yield ra.protocol.wait_for(b"pong\n")

    @inlineCallbacks
    def test_low_ttl_first_syn_still_delivered_on_loopback(self):
        server = AppFactory()
        port = listen_reusable(reactor, (LOOP, 0), server)
        self.addCleanup(port.stopListening)
        plan = PunchPlan(
            (LOOP, reserve_port(self)), ((LOOP, port.getHost().port),), deadline=10, low_ttl=1
        )
        result = yield punch(reactor, plan, AppFactory())
        close(self, result)
        self.assertEqual(result.technique, "low-ttl")
        self.assertEqual(result.attempts, 1)
        sock = result.protocol.transport.getHandle()
        self.assertGreater(sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), 1)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in server.built])

    @inlineCallbacks
    def test_candidate_window_only_one_answers(self):
        server = AppFactory()
        port = listen_reusable(reactor, (LOOP, 0), server)
        self.addCleanup(port.stopListening)
        good = (LOOP, port.getHost().port)
        window = ((LOOP, closed_port(self)), good, (LOOP, closed_port(self)))
        result = yield punch(reactor, PunchPlan((LOOP, reserve_port(self)), window, 10), AppFactory())
        close(self, result)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in server.built])
        self.assertEqual(result.remote, good)
        self.assertEqual(result.technique, "simultaneous-open")
        self.assertEqual(result.attempts, 3)

    @inlineCallbacks
    def test_wrong_host_in_window_is_dropped(self):
        # A device at a predicted port that accepts but knows no secret.
        impostor = HandshakeFactory(b"other", "c1", "responder", AppFactory(), reactor)
        bad = listen_reusable(reactor, (LOOP, 0), impostor)
        self.addCleanup(bad.stopListening)
        pa, pb = reserve_port(self), reserve_port(self)
        apps_a, apps_b = AppFactory(), AppFactory()
        fa = HandshakeFactory(b"k", "c1", "initiator", apps_a, reactor)
        fb = HandshakeFactory(b"k", "c1", "responder", apps_b, reactor)
        window = ((LOOP, bad.getHost().port), (LOOP, pb))
        da = punch(reactor, PunchPlan((LOOP, pa), window, 10), fa)
        db = punch(reactor, PunchPlan((LOOP, pb), ((LOOP, pa),), 10), fb)
        ra, rb = yield gatherResults([da, db])
        close(self, ra)
        close(self, rb)
        self.assertEqual(ra.remote, (LOOP, pb))
        ra.protocol.transport.write(b"hi\n")
        yield rb.protocol.wait_for(b"hi\n")


    @inlineCallbacks
    def test_two_connections_to_the_peer_both_sides_pick_the_same(self):
        """
        The corner where more than one connection reaches the genuine peer
        (here: the peer is reachable at two candidates).  Both pass the
        secret check; the initiator's choice must be the responder's too.
        """
        apps_b = AppFactory()
        fb = HandshakeFactory(b"k", "c2", "responder", apps_b, reactor)
        built: list = []
        real = fb.buildProtocol
        fb.buildProtocol = lambda addr: built.append(real(addr)) or built[-1]
        l1 = listen_reusable(reactor, (LOOP, 0), fb)
        l2 = listen_reusable(reactor, (LOOP, 0), fb)
        self.addCleanup(l1.stopListening)
        self.addCleanup(l2.stopListening)
        apps_a = AppFactory()
        fa = HandshakeFactory(b"k", "c2", "initiator", apps_a, reactor)
        window = ((LOOP, l1.getHost().port), (LOOP, l2.getHost().port))
        ra = yield punch(reactor, PunchPlan((LOOP, reserve_port(self)), window, 10), fa)
        close(self, ra)
        self.assertEqual(len(built), 2)
        outcomes = yield gatherResults(
            [p.handshake_done.addErrback(lambda f: f.trap(Exception)) for p in built]
        )
        self.assertEqual(len(apps_a.built), 1)
        self.assertEqual(len(apps_b.built), 1)
        b_side = fb.chosen
        self.assertIn(b_side, outcomes)
        self.assertEqual(
            b_side.transport.getPeer().port, ra.protocol.transport.getHost().port
        )
        self.assertEqual(b_side.transport.getHost().port, ra.remote[1])
        # The other connection was dropped on the responder's side too.
        self.assertEqual(len([p for p in built if p.app is None]), 1)
        ra.protocol.transport.write(b"same\n")
        yield b_side.wait_for(b"same\n")


class DeadlineTests(unittest.TestCase):
    """Real sockets, Clock time."""

    def setUp(self):
        self.clock = Clock()
        self.reactor = SplitReactor(self.clock)

    @inlineCallbacks
    def advance_until(self, d: Deferred, step: float, limit: int = 200):
        for _ in range(limit):
            if d.called:
                return
            yield turns(3)
            self.clock.advance(step)
        yield turns(3)

    @inlineCallbacks
    def test_closed_port_retries_until_the_deadline(self):
        plan = PunchPlan(
            (LOOP, reserve_port(self)),
            ((LOOP, closed_port(self)),),
            deadline=2.0,
            retry_interval=0.2,
        )
        d = punch(self.reactor, plan, AppFactory())
        failures = []
        d.addErrback(failures.append)
        yield turns(3)
        self.assertFalse(d.called)
        yield self.advance_until(d, 0.1)
        self.assertEqual(len(failures), 1)
        failure = failures[0]
        failure.trap(PunchFailed)
        reason = failure.value.reason
        self.assertIn("refused", reason)
        self.assertIn("2 s", reason)
        # RST every time, retried every 0.2 s: about ten attempts in 2 s.
        attempts = int(reason.split(" attempts")[0].rsplit(" ", 1)[1])
        self.assertGreaterEqual(attempts, 8)
        self.assertLessEqual(attempts, 12)
        self.assertEqual(self.clock.seconds() >= 2.0, True)

    @inlineCallbacks
    def test_start_at_waits(self):
        server = AppFactory()
        port = listen_reusable(reactor, (LOOP, 0), server)
        self.addCleanup(port.stopListening)
        plan = PunchPlan(
            (LOOP, reserve_port(self)), ((LOOP, port.getHost().port),), deadline=5, start_at=3.0
        )
        d = punch(self.reactor, plan, AppFactory())
        yield turns(3)
        self.clock.advance(2.9)
        yield turns(3)
        self.assertFalse(d.called)
        self.assertEqual(server.built, [])
        self.clock.advance(0.1)
        yield self.advance_until(d, 0.0)
        result = self.successResultOf(d)
        close(self, result)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in server.built])
        self.assertEqual(result.elapsed, 0.0)

    @inlineCallbacks
    def test_handshake_never_passes_fails_at_deadline(self):
        # Only a wrong host answers: keep trying it until the deadline.
        impostor = HandshakeFactory(b"other", "c", "responder", AppFactory(), reactor)
        bad = listen_reusable(reactor, (LOOP, 0), impostor)
        self.addCleanup(bad.stopListening)
        mine = HandshakeFactory(b"k", "c", "initiator", AppFactory(), self.reactor, timeout=1)
        plan = PunchPlan(
            (LOOP, reserve_port(self)), ((LOOP, bad.getHost().port),), deadline=2.0
        )
        d = punch(self.reactor, plan, mine)
        failures = []
        d.addErrback(failures.append)
        yield self.advance_until(d, 0.1)
        failures[0].trap(PunchFailed)
        self.assertIn("handshake", failures[0].value.reason)
        self.assertIsNone(mine.chosen)

    @inlineCallbacks
    def test_deadline_between_r_and_i_keeps_the_connection(self):
        """The NAT lab's window: we (the responder) proved ourselves, then our deadline passed
        before the initiator's proof arrived.  The initiator committed when it sent it, so the
        connection is kept and wins: both sides end connected, on the same connection."""
        peer = HeldInitiators()
        listener = listen_reusable(reactor, (LOOP, 0), peer)
        self.addCleanup(listener.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in peer.built])
        mine = HandshakeFactory(b"k", "c", "responder", AppFactory(), self.reactor)
        plan = PunchPlan((LOOP, reserve_port(self)), ((LOOP, listener.getHost().port),), deadline=2.0)
        d = punch(self.reactor, plan, mine)
        held = yield peer.first
        line = yield held.proved
        self.assertTrue(line.startswith(b"KJ1 R "))
        self.clock.advance(2.5)  # the deadline passes while our R awaits its answer
        yield turns(3)
        self.assertNoResult(d)
        self.assertFalse(held.lost.called)
        held.send_proof(b"k", "c")
        yield self.advance_until(d, 0.0, limit=50)
        result = self.successResultOf(d)
        self.assertIs(result.protocol, mine.chosen)
        self.assertFalse(held.lost.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_deadline_before_hello_drops_the_connection(self):
        """A connection whose peer has sent nothing yet promised nothing: dropped at the deadline."""
        silent = AppFactory()  # accepts and never speaks
        listener = listen_reusable(reactor, (LOOP, 0), silent)
        self.addCleanup(listener.stopListening)
        mine = HandshakeFactory(b"k", "c", "responder", AppFactory(), self.reactor)
        plan = PunchPlan((LOOP, reserve_port(self)), ((LOOP, listener.getHost().port),), deadline=2.0)
        d = punch(self.reactor, plan, mine)
        failures = []
        d.addErrback(failures.append)
        yield turns(5)
        self.assertEqual(len(silent.built), 1)
        self.clock.advance(2.5)
        yield self.advance_until(d, 0.0, limit=50)
        failures[0].trap(PunchFailed)
        yield silent.built[0].lost  # our abort reached the peer
        self.assertTrue(silent.built[0].is_lost)

    @inlineCallbacks
    def test_cancel_closes_everything(self):
        plan = PunchPlan((LOOP, reserve_port(self)), ((LOOP, closed_port(self)),), deadline=5)
        d = punch(self.reactor, plan, AppFactory())
        yield turns(3)
        d.cancel()
        self.failureResultOf(d)
        yield turns(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The punch's listener is gone: a connect to its port is refused.
        s = socket.socket()
        self.addCleanup(s.close)
        self.assertNotEqual(s.connect_ex(plan.local), 0)

    def test_listen_failure_is_a_punch_failure(self):
        # A plain socket holds the port without SO_REUSEPORT.
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind((LOOP, 0))
        s.listen(1)
        plan = PunchPlan(s.getsockname(), ((LOOP, 9),), deadline=1)
        d = punch(self.reactor, plan, AppFactory())
        f = self.failureResultOf(d, PunchFailed)
        self.assertIn("cannot listen", f.value.reason)

    def test_plan_validation(self):
        self.assertRaises(ValueError, PunchPlan, (LOOP, 1), (), 1.0)
        self.assertRaises(ValueError, PunchPlan, (LOOP, 1), ((LOOP, 2),), 0)


class PrimedRedialTests(unittest.TestCase):
    """A primed SYN that dies (EHOSTUNREACH) is followed at once by a normal one."""

    def test_primed_failure_redials_without_waiting(self):
        from twisted.internet import error
        from twisted.internet.testing import MemoryReactorClock

        import kerjostunt.client.nat.punch as punch_module

        calls: list = []

        def fake_connect_from(reactor, local, remote, factory, *, timeout, ttl=None):
            d = Deferred()
            calls.append((ttl, timeout, d))
            return d

        self.patch(punch_module, "connect_from", fake_connect_from)
        self.patch(punch_module, "listen_reusable", lambda r, local, f: _FakePort())
        clock = MemoryReactorClock()
        plan = PunchPlan((LOOP, 1000), ((LOOP, 2000),), deadline=5, low_ttl=2)
        d = punch(clock, plan, AppFactory())
        self.assertEqual([(c[0], c[1]) for c in calls], [(2, 0.2)])
        calls[0][2].errback(error.NoRouteError())
        clock.advance(0)
        self.assertEqual([(c[0], c[1]) for c in calls], [(2, 0.2), (None, 1.0)])
        # A refused normal attempt waits retry_interval.
        calls[1][2].errback(error.ConnectionRefusedError())
        clock.advance(0.1)
        self.assertEqual(len(calls), 2)
        clock.advance(0.1)
        self.assertEqual(len(calls), 3)
        d.cancel()
        self.failureResultOf(d)


class _FakePort:
    stopped = False

    def stopListening(self):
        self.stopped = True
        return None


class HalfOpenListenerTests(unittest.TestCase):
    """EADDRNOTAVAIL on a redial: the listener holds a half-open connection for
    that 4-tuple; the listener is closed for good and the candidate redialed at once."""

    def test_eaddrnotavail_closes_the_listener_and_redials(self):
        import errno

        from twisted.internet import error
        from twisted.internet.testing import MemoryReactorClock

        import kerjostunt.client.nat.punch as punch_module

        calls: list = []
        ports: list = []

        def fake_connect_from(reactor, local, remote, factory, *, timeout, ttl=None):
            d = Deferred()
            calls.append(d)
            return d

        def fake_listen(r, local, factory):
            ports.append(_FakePort())
            return ports[-1]

        self.patch(punch_module, "connect_from", fake_connect_from)
        self.patch(punch_module, "listen_reusable", fake_listen)
        clock = MemoryReactorClock()
        plan = PunchPlan((LOOP, 1000), ((LOOP, 2000),), deadline=5, low_ttl=None, retry_interval=0.2)
        d = punch(clock, plan, AppFactory())
        self.assertEqual(len(ports), 1)
        calls[0].errback(error.getConnectError((errno.EADDRNOTAVAIL, "EADDRNOTAVAIL")))
        self.assertTrue(ports[0].stopped)
        clock.advance(0)
        self.assertEqual(len(calls), 2)  # redialed without waiting for retry_interval
        # Not reopened, whatever follows.
        calls[-1].errback(error.getConnectError((errno.EADDRNOTAVAIL, "EADDRNOTAVAIL")))
        calls[-1].errback(error.ConnectionRefusedError()) if not calls[-1].called else None
        clock.advance(1)
        self.assertEqual(len(ports), 1)
        d.cancel()
        self.failureResultOf(d)
