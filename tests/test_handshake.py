"""
The per-call handshake: over StringTransport (wire exactness, Clock for the
time limit) and over real loopback sockets.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from kerjostunt.client.handshake import (
    HandshakeFactory,
    HandshakeFailed,
    compute_mac,
)

from .loopback import WaitsForData

SECRET = b"s3cret-per-call"
CALL = "call-42"


class App(WaitsForData):
    def __init__(self) -> None:
        super().__init__()
        self.made = False
        self.lost = None

    def connectionMade(self) -> None:
        self.made = True

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class AppFactory(Factory):
    protocol = App


def wire(factory, peer=None):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def pump(a, ta, b, tb):
    """Move bytes between two StringTransports until both are quiet."""
    while True:
        moved = False
        for src, dst in ((ta, b), (tb, a)):
            data = src.value()
            if data:
                src.clear()
                dst.dataReceived(data)
                moved = True
        if not moved:
            return


class StringTransportTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()

    def factory(self, role, secret=SECRET, call=CALL, timeout=5.0):
        return HandshakeFactory(secret, call, role, AppFactory(), self.clock, timeout)

    def test_right_secret_both_sides_done(self):
        i, ti = wire(self.factory("initiator"))
        r, tr = wire(self.factory("responder"))
        pump(i, ti, r, tr)
        app_i = self.successResultOf(i.handshake_done)
        app_r = self.successResultOf(r.handshake_done)
        self.assertTrue(app_i.made and app_r.made)
        self.assertIs(app_i.transport, ti)
        self.assertFalse(ti.disconnecting or tr.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # After the handshake, bytes go straight to the application.
        app_i.transport.write(b"hello\n")
        pump(i, ti, r, tr)
        self.assertEqual(app_r.data, b"hello\n")

    def test_wire_format(self):
        i, ti = wire(self.factory("initiator"))
        hello = ti.value()
        self.assertRegex(hello, rb"^KJ1 HELLO [0-9a-f]{32}\n$")
        nonce_i = hello.split()[2]
        nonce_r = b"0" * 32
        mac_r = compute_mac(SECRET, "responder", CALL, nonce_i, nonce_r)
        ti.clear()
        i.dataReceived(b"KJ1 R " + nonce_r + b" " + mac_r + b"\n")
        mac_i = compute_mac(SECRET, "initiator", CALL, nonce_i, nonce_r)
        self.assertEqual(ti.value(), b"KJ1 I " + mac_i + b"\n")
        self.successResultOf(i.handshake_done)

    def test_bytes_after_the_handshake_reach_the_app(self):
        r, tr = wire(self.factory("responder"))
        nonce_i = b"1" * 32
        r.dataReceived(b"KJ1 HELLO " + nonce_i + b"\n")
        nonce_r = tr.value().split()[2]
        mac_i = compute_mac(SECRET, "initiator", CALL, nonce_i, nonce_r)
        # The proof and the first application bytes in one segment.
        r.dataReceived(b"KJ1 I " + mac_i + b"\nearly data")
        app = self.successResultOf(r.handshake_done)
        self.assertEqual(app.data, b"early data")

    def test_one_byte_at_a_time(self):
        """Lines split anywhere are put together; the app still gets only what follows."""
        r, tr = wire(self.factory("responder"))
        nonce_i = b"2" * 32
        for byte in b"KJ1 HELLO " + nonce_i + b"\n":
            r.dataReceived(bytes([byte]))
        nonce_r = tr.value().split()[2]
        mac_i = compute_mac(SECRET, "initiator", CALL, nonce_i, nonce_r)
        for byte in b"KJ1 I " + mac_i + b"\nxy":
            r.dataReceived(bytes([byte]))
        app = self.successResultOf(r.handshake_done)
        self.assertEqual(app.data, b"xy")

    def test_nothing_after_a_failure_counts(self):
        """A bad line and a good one in one segment: the connection failed at the first."""
        r, tr = wire(self.factory("responder"))
        r.dataReceived(b"GET / HTTP/1.1\nKJ1 HELLO " + b"3" * 32 + b"\n")
        self.failureResultOf(r.handshake_done, HandshakeFailed)
        self.assertEqual(tr.value(), b"")
        self.assertTrue(tr.disconnecting or tr.disconnected)

    def test_wrong_secret_rejected_by_initiator(self):
        i, ti = wire(self.factory("initiator"))
        r, tr = wire(self.factory("responder", secret=b"another secret"))
        pump(i, ti, r, tr)
        self.failureResultOf(i.handshake_done, HandshakeFailed)
        self.assertTrue(ti.disconnecting)
        # The responder never got the initiator's proof.
        pending = r.handshake_done
        self.assertNoResult(pending)
        r.connectionLost(None)
        self.failureResultOf(pending, HandshakeFailed)

    def test_wrong_secret_rejected_by_responder(self):
        r, tr = wire(self.factory("responder"))
        nonce_i = b"2" * 32
        r.dataReceived(b"KJ1 HELLO " + nonce_i + b"\n")
        nonce_r = tr.value().split()[2]
        forged = compute_mac(b"guess", "initiator", CALL, nonce_i, nonce_r)
        r.dataReceived(b"KJ1 I " + forged + b"\n")
        f = self.failureResultOf(r.handshake_done, HandshakeFailed)
        self.assertIn("initiator", f.getErrorMessage())
        self.assertTrue(tr.disconnecting)

    def test_wrong_call_id_rejected(self):
        i, ti = wire(self.factory("initiator"))
        r, tr = wire(self.factory("responder", call="call-43"))
        pump(i, ti, r, tr)
        self.failureResultOf(i.handshake_done, HandshakeFailed)

    def test_replayed_responder_mac_rejected(self):
        # A proof recorded on one connection is useless on another: nonces.
        i1, t1 = wire(self.factory("initiator"))
        r1, tr1 = wire(self.factory("responder"))
        t1_hello = t1.value()
        t1.clear()
        r1.dataReceived(t1_hello)
        recorded = tr1.value()
        i2, t2 = wire(self.factory("initiator"))
        i2.dataReceived(recorded)
        self.failureResultOf(i2.handshake_done, HandshakeFailed)

    def test_not_our_protocol(self):
        r, tr = wire(self.factory("responder"))
        r.dataReceived(b"GET / HTTP/1.1\r\n")
        self.failureResultOf(r.handshake_done, HandshakeFailed)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(tr.value(), b"")

    def test_line_too_long(self):
        r, tr = wire(self.factory("responder"))
        r.dataReceived(b"K" * 500)
        self.failureResultOf(r.handshake_done, HandshakeFailed)

    def test_timeout(self):
        r, tr = wire(self.factory("responder", timeout=2.0))
        self.clock.advance(1.9)
        pending = r.handshake_done
        self.assertNoResult(pending)
        self.clock.advance(0.2)
        f = self.failureResultOf(pending, HandshakeFailed)
        self.assertIn("2.0", f.getErrorMessage())
        self.assertTrue(tr.disconnecting)

    def test_the_responder_waits_proof_wait_for_i_after_its_r(self):
        """The initiator commits when its I leaves: a HELLO that came late (or a slow path)
        must not let the responder's clock run out between its R and that I."""
        factory = self.factory("responder", timeout=2.0)
        self.assertEqual(factory.proof_wait, 4.0)
        r, tr = wire(factory)
        self.clock.advance(1.9)
        r.dataReceived(b"KJ1 HELLO " + b"3" * 32 + b"\n")
        self.clock.advance(3.9)  # 5.8 s after the connect, 3.9 s after the R
        pending = r.handshake_done
        self.assertNoResult(pending)
        self.assertFalse(tr.disconnecting)
        self.clock.advance(0.2)
        f = self.failureResultOf(pending, HandshakeFailed)
        self.assertIn("no initiator proof within 4.0 s", f.getErrorMessage())
        self.assertTrue(tr.disconnecting)

    def test_in_flight_while_a_line_of_ours_awaits_its_answer(self):
        """What a race's deadline looks at (contest.Contest.expire)."""
        i, ti = wire(self.factory("initiator"))
        r, tr = wire(self.factory("responder"))
        self.assertEqual((i.handshake_in_flight, r.handshake_in_flight), (True, False))  # HELLO out
        r.dataReceived(ti.value())
        ti.clear()
        self.assertTrue(r.handshake_in_flight)  # R out: the initiator may commit
        pump(i, ti, r, tr)
        self.successResultOf(r.handshake_done)
        self.assertEqual((i.handshake_in_flight, r.handshake_in_flight), (False, False))
        stranger, _ = wire(self.factory("responder"))
        stranger.dataReceived(b"GET / HTTP/1.0\n")
        self.assertFalse(stranger.handshake_in_flight)

    def test_connection_lost_midway(self):
        i, ti = wire(self.factory("initiator"))
        i.connectionLost(None)
        self.failureResultOf(i.handshake_done, HandshakeFailed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_one_connection_per_factory(self):
        fi = self.factory("initiator")
        fr = self.factory("responder")
        i1, ti1 = wire(fi)
        r1, tr1 = wire(fr)
        i2, ti2 = wire(fi)
        r2, tr2 = wire(fr)
        # Both responders prove themselves; the initiator picks the first.
        r1.dataReceived(ti1.value())
        ti1.clear()
        r2.dataReceived(ti2.value())
        ti2.clear()
        i2.dataReceived(tr2.value())
        tr2.clear()
        i1.dataReceived(tr1.value())
        tr1.clear()
        self.successResultOf(i2.handshake_done)
        self.failureResultOf(i1.handshake_done, HandshakeFailed)
        self.assertEqual(ti1.value(), b"")  # no proof on the losing connection
        r2.dataReceived(ti2.value())
        self.successResultOf(r2.handshake_done)
        self.assertIs(fr.chosen, r2.app)

    def test_app_connection_lost_forwarded(self):
        i, ti = wire(self.factory("initiator"))
        r, tr = wire(self.factory("responder"))
        pump(i, ti, r, tr)
        app = self.successResultOf(i.handshake_done)
        i.connectionLost("bye")
        self.assertEqual(app.lost, "bye")

    def test_bad_role(self):
        self.assertRaises(ValueError, self.factory, "caller")


class LoopbackTests(unittest.TestCase):
    @inlineCallbacks
    def run_pair(self, server_secret, client_secret):
        server_factory = HandshakeFactory(server_secret, CALL, "responder", AppFactory(), reactor)
        built: list = []
        real_build = server_factory.buildProtocol

        def build(addr):
            p = real_build(addr)
            built.append(p)
            return p

        server_factory.buildProtocol = build
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server_factory)
        self.addCleanup(port.stopListening)
        client_factory = HandshakeFactory(client_secret, CALL, "initiator", AppFactory(), reactor)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            client_factory
        )
        return client, built

    @inlineCallbacks
    def test_right_secret_over_loopback(self):
        client, built = yield self.run_pair(SECRET, SECRET)
        app_c = yield client.handshake_done
        app_s = yield built[0].handshake_done
        app_c.transport.write(b"ping\n")
        yield app_s.wait_for(b"ping\n")
        app_s.transport.write(b"pong\n")
        yield app_c.wait_for(b"pong\n")
        app_c.transport.loseConnection()
        app_s.transport.loseConnection()

    @inlineCallbacks
    def test_wrong_secret_over_loopback(self):
        client, built = yield self.run_pair(SECRET, b"wrong")
        results = yield gatherResults(
            [
                client.handshake_done.addCallbacks(lambda _: None, lambda f: f.trap(HandshakeFailed)),
                built[0].handshake_done.addCallbacks(
                    lambda _: None, lambda f: f.trap(HandshakeFailed)
                ),
            ]
        )
        self.assertEqual(results, [HandshakeFailed, HandshakeFailed])
        self.assertIsNone(client.app)
        self.assertIsNone(built[0].app)
