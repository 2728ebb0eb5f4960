"""
The RFC 6062 TURN client against a real coturn on 127.0.0.1 (skips without coturn).

Two allocations on one coturn: one side Connects to the other's relayed
address, coturn opens a TCP connection between the two relayed addresses
and tells the other side with a ConnectionAttempt; each side binds a data
connection, and bytes written on one arrive on the other.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from kerjostunt.client.nat.turn import Allocation, TurnError, TurnServer, allocate
from kerjostunt.wire import turn

from .loopback import WaitsForData
from .processes import free_port
from .turnserver import start_coturn


def credentials(secret: bytes, user: str, lifetime: int = 600) -> turn.Credentials:
    return turn.rest_credentials(secret, user, int(time.time()) + lifetime)


class Sink(WaitsForData):
    def __init__(self) -> None:
        super().__init__()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: object = None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


def sink_factory() -> tuple[Factory, list[Sink]]:
    built: list[Sink] = []

    class F(Factory):
        def buildProtocol(self, addr: object) -> Sink:
            s = Sink()
            built.append(s)
            return s

    return F(), built


class TurnClientTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.coturn = yield start_coturn(self)
        self.address = (self.coturn.host, self.coturn.port)

    def server(self, user: str, secret: bytes | None = None, lifetime: int = 600) -> TurnServer:
        return TurnServer(self.address, credentials(secret or self.coturn.secret, user, lifetime))

    @defer.inlineCallbacks
    def allocation(self, user: str):
        a: Allocation = yield defer.Deferred.fromCoroutine(allocate(reactor, self.server(user), "127.0.0.1"))
        self.addCleanup(a.close)
        return a

    @defer.inlineCallbacks
    def test_allocate_gives_a_relayed_address_on_the_relay_ip(self):
        a = yield self.allocation("alice")
        self.assertEqual(a.relayed[0], "127.0.0.1")
        self.assertTrue(40000 <= a.relayed[1] <= 40999, a.relayed)
        self.assertGreater(a.lifetime, 0)
        self.assertEqual(a.mapped[0], "127.0.0.1")

    @defer.inlineCallbacks
    def test_connect_and_connection_attempt_carry_bytes_both_ways(self):
        a = yield self.allocation("alice")
        b = yield self.allocation("bob")
        # The peer coturn connects from is A's relayed address: the relay's own IP.
        yield b.permit([a.relayed[0]])
        attempts: defer.Deferred = defer.Deferred()
        b.on_attempt = lambda peer, cid: attempts.callback((peer, cid))
        a_factory, a_built = sink_factory()
        b_factory, b_built = sink_factory()
        connecting = defer.Deferred.fromCoroutine(a.connect(b.relayed, a_factory))
        peer, cid = yield attempts
        self.assertEqual(peer, a.relayed)
        yield defer.Deferred.fromCoroutine(b.bind(cid, peer, b_factory))
        yield connecting
        a_side, b_side = a_built[0], b_built[0]
        a_side.transport.write(b"hello from alice\n")
        got = yield b_side.wait_for(b"\n")
        self.assertEqual(got, b"hello from alice\n")
        b_side.transport.write(b"hi alice\n")
        got = yield a_side.wait_for(b"\n")
        self.assertEqual(got, b"hi alice\n")
        # Closing the allocation ends its data connections (RFC 6062 5.2).
        a.close()
        yield b_side.lost

    @defer.inlineCallbacks
    def test_connect_without_permission_is_refused_with_a_reason(self):
        a = yield self.allocation("alice")
        b = yield self.allocation("bob")  # no permission for A's relayed IP
        a_factory, _ = sink_factory()
        with self.assertRaises(TurnError) as caught:
            yield defer.Deferred.fromCoroutine(a.connect(b.relayed, a_factory))
        # coturn answers 447, or (when its TCP connect to B's relayed port completed before B's
        # allocation refused it) a success, and then drops the data connection being bound.
        reason = caught.exception.reason
        self.assertTrue(caught.exception.code == 447 or "closed the connection before it was bound" in reason,
                        reason)

    @defer.inlineCallbacks
    def test_wrong_secret_is_refused(self):
        server = self.server("mallory", secret=b"not-the-secret")
        with self.assertRaises(TurnError) as caught:
            yield defer.Deferred.fromCoroutine(allocate(reactor, server, "127.0.0.1"))
        self.assertEqual(caught.exception.code, 401)
        self.assertIn("credentials", caught.exception.reason)

    @defer.inlineCallbacks
    def test_expired_credentials_are_refused(self):
        server = self.server("alice", lifetime=-60)
        with self.assertRaises(TurnError) as caught:
            yield defer.Deferred.fromCoroutine(allocate(reactor, server, "127.0.0.1"))
        self.assertEqual(caught.exception.code, 401)


class TurnIPv6Tests(unittest.TestCase):
    """The same exchange over IPv6 (XOR-PEER-ADDRESS xored with each request's transaction ID)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_connect_over_ipv6(self):
        import socket
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        coturn = yield start_coturn(self, host="::1")

        def server(user: str) -> TurnServer:
            return TurnServer(("::1", coturn.port), credentials(coturn.secret, user))

        a = yield defer.Deferred.fromCoroutine(allocate(reactor, server("alice"), "::1"))
        self.addCleanup(a.close)
        b = yield defer.Deferred.fromCoroutine(allocate(reactor, server("bob"), "::1"))
        self.addCleanup(b.close)
        self.assertEqual(a.relayed[0], "::1")
        yield b.permit([a.relayed[0]])
        attempts: defer.Deferred = defer.Deferred()
        b.on_attempt = lambda peer, cid: attempts.callback((peer, cid))
        a_factory, a_built = sink_factory()
        b_factory, b_built = sink_factory()
        connecting = defer.Deferred.fromCoroutine(a.connect(b.relayed, a_factory))
        peer, cid = yield attempts
        self.assertEqual(peer, a.relayed)
        yield defer.Deferred.fromCoroutine(b.bind(cid, peer, b_factory))
        yield connecting
        a_built[0].transport.write(b"over six\n")
        got = yield b_built[0].wait_for(b"\n")
        self.assertEqual(got, b"over six\n")


class TurnDownTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_no_relay_listening(self):
        server = TurnServer(("127.0.0.1", free_port()), credentials(b"x", "alice"))
        with self.assertRaises(TurnError) as caught:
            yield defer.Deferred.fromCoroutine(allocate(reactor, server, "127.0.0.1"))
        self.assertIn("cannot reach the relay", caught.exception.reason)


class TurnWireTests(unittest.TestCase):
    def test_message_types(self):
        self.assertEqual(turn.message_type(turn.ALLOCATE, turn.REQUEST), 0x0003)
        self.assertEqual(turn.message_type(turn.ALLOCATE, turn.SUCCESS), 0x0103)
        self.assertEqual(turn.message_type(turn.ALLOCATE, turn.ERROR), 0x0113)
        self.assertEqual(turn.message_type(turn.CONNECTION_ATTEMPT, turn.INDICATION), 0x001C)
        self.assertEqual(turn.message_type(turn.CONNECTION_BIND, turn.REQUEST), 0x000B)

    def test_rest_credentials(self):
        import base64
        import hashlib
        import hmac
        creds = turn.rest_credentials(b"secret", "alice", 1700000000)
        self.assertEqual(creds.username, "1700000000:alice")
        expected = base64.b64encode(hmac.new(b"secret", b"1700000000:alice", hashlib.sha1).digest()).decode()
        self.assertEqual(creds.password, expected)
        self.assertEqual(creds.key("r"), hashlib.md5(f"1700000000:alice:r:{expected}".encode()).digest())


class TurnTimeoutTests(unittest.TestCase):
    def test_silent_relay_fails_the_request_after_the_timeout(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from kerjostunt.client.nat.turn import REQUEST_TIMEOUT, TurnConnection, _Auth
        clock = Clock()
        conn = TurnConnection(clock, _Auth(credentials(b"x", "alice")))
        conn.makeConnection(StringTransport())
        d = defer.Deferred.fromCoroutine(conn.request(turn.ALLOCATE, []))
        self.assertNoResult(d)
        clock.advance(REQUEST_TIMEOUT + 0.1)
        failure = self.failureResultOf(d, TurnError)
        self.assertIn("no answer from the relay", failure.value.reason)

    def test_garbage_from_the_relay_closes_the_connection(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from kerjostunt.client.nat.turn import TurnConnection, _Auth
        conn = TurnConnection(Clock(), _Auth(credentials(b"x", "alice")))
        transport = StringTransport()
        conn.makeConnection(transport)
        d = defer.Deferred.fromCoroutine(conn.request(turn.ALLOCATE, []))
        conn.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        conn.connectionLost()
        self.failureResultOf(d, TurnError)


class RefreshTests(unittest.TestCase):
    def test_the_allocation_is_refreshed_every_half_lifetime_until_closed(self):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from kerjostunt.client.nat.turn import TurnConnection, _Auth
        from kerjostunt.wire import stun
        clock = Clock()
        auth = _Auth(credentials(b"x", "alice"), realm="kerjo.test", nonce=b"n0")
        control = TurnConnection(clock, auth)
        transport = StringTransport()
        control.makeConnection(transport)
        allocation = Allocation(clock, TurnServer(("127.0.0.1", 3478), auth.credentials), control, "127.0.0.1")
        allocation.lifetime = 100
        allocation._schedule_refresh()
        clock.advance(49)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        sent = stun.decode(transport.value())
        self.assertEqual(sent.msg_type, turn.message_type(turn.REFRESH, turn.REQUEST))
        self.assertEqual(turn.decode_lifetime(sent.get(turn.LIFETIME)), 100)
        self.assertTrue(stun.check_integrity(transport.value(), auth.key()))
        allocation.close()
        control.connectionLost()  # what the abort does on a real transport
        self.assertFalse(clock.getDelayedCalls(), "no refresh, and no request waiting, after the close")
