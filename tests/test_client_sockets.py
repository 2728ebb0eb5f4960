"""
connect_from / listen_reusable on real loopback sockets (port 0, no sleeps).
"""

from __future__ import annotations

import socket

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.nat.sockets import connect_from, listen_reusable, reusable_socket

from .loopback import WaitsForData


class Recorder(WaitsForData):
    def __init__(self) -> None:
        super().__init__()
        self.made: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.first: Deferred = Deferred()

    def buildProtocol(self, addr):
        p = Recorder()
        p.factory = self
        self.built.append(p)
        if len(self.built) == 1:
            self.first.callback(p)
        return p


def free_port() -> int:
    """A port number that nothing listens on right now."""
    s = reusable_socket(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ReusableSocketTests(unittest.TestCase):
    def test_options_set_and_bound(self):
        s = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(s.close)
        self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), 1)
        self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        self.assertNotEqual(s.getsockname()[1], 0)
        self.assertFalse(s.getblocking())

    def test_two_sockets_share_a_port(self):
        a = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(a.close)
        b = reusable_socket(("127.0.0.1", a.getsockname()[1]))
        self.addCleanup(b.close)
        self.assertEqual(a.getsockname(), b.getsockname())

    def test_ipv6_family_by_address(self):
        try:
            s = reusable_socket(("::1", 0))
        except OSError as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        self.addCleanup(s.close)
        self.assertEqual(s.family, socket.AF_INET6)


class ConnectFromTests(unittest.TestCase):
    def listen(self, local=("127.0.0.1", 0)):
        server = RecordingFactory()
        port = listen_reusable(reactor, local, server)
        self.addCleanup(port.stopListening)
        return server, port

    def close_later(self, proto):
        self.addCleanup(lambda: proto.transport.abortConnection() or proto.lost)

    @inlineCallbacks
    def test_connects_from_the_given_port_and_data_flows(self):
        server, port = self.listen()
        src = free_port()
        client = RecordingFactory()
        proto = yield connect_from(
            reactor,
            ("127.0.0.1", src),
            ("127.0.0.1", port.getHost().port),
            client,
            timeout=5,
        )
        self.close_later(proto)
        self.assertIs(proto, client.built[0])
        self.assertEqual(proto.transport.getHost().port, src)
        self.assertEqual(proto.transport.getPeer().port, port.getHost().port)
        accepted = yield server.first
        proto.transport.write(b"ping\n")
        yield accepted.wait_for(b"ping\n")
        accepted.transport.write(b"pong\n")
        yield proto.wait_for(b"pong\n")

    @inlineCallbacks
    def test_connect_while_listening_on_the_same_port(self):
        # The whole point of reusable sockets: listener and dialer share a port.
        server, port = self.listen()
        _, mine = self.listen()
        proto = yield connect_from(
            reactor,
            ("127.0.0.1", mine.getHost().port),
            ("127.0.0.1", port.getHost().port),
            RecordingFactory(),
            timeout=5,
        )
        self.close_later(proto)
        self.assertEqual(proto.transport.getHost().port, mine.getHost().port)

    @inlineCallbacks
    def test_low_ttl_is_restored(self):
        server, port = self.listen()
        proto = yield connect_from(
            reactor,
            ("127.0.0.1", 0),
            ("127.0.0.1", port.getHost().port),
            RecordingFactory(),
            timeout=5,
            ttl=1,
        )
        self.close_later(proto)
        sock = proto.transport.getHandle()
        default = socket.socket()
        self.addCleanup(default.close)
        self.assertEqual(
            sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL),
            default.getsockopt(socket.IPPROTO_IP, socket.IP_TTL),
        )

    def test_refused(self):
        d = connect_from(
            reactor,
            ("127.0.0.1", 0),
            ("127.0.0.1", free_port()),
            RecordingFactory(),
            timeout=5,
        )
        return self.assertFailure(d, error.ConnectionRefusedError)

    def test_factory_refusing_fails(self):
        server, port = self.listen()

        class No(Factory):
            def buildProtocol(self, addr):
                return None

        d = connect_from(
            reactor,
            ("127.0.0.1", 0),
            ("127.0.0.1", port.getHost().port),
            No(),
            timeout=5,
        )
        return self.assertFailure(d, error.ConnectError)


class TimeoutAndCancelTests(unittest.TestCase):
    """
    The socket and the connect are real, the reactor only records the
    descriptor and time is a Clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.writers: list = []

    # A reactor that records descriptors and uses a Clock for time.
    def fake_reactor(self):
        test = self

        class R:
            callLater = test.clock.callLater

            def addWriter(self, w):
                test.writers.append(w)

            def removeWriter(self, w):
                if w in test.writers:
                    test.writers.remove(w)

            def removeReader(self, w):
                pass

        return R()

    def pending_target(self):
        """
        An address whose connect stays in progress, on loopback: a listener
        with backlog 0 whose single queue slot is taken.  Linux drops further
        SYNs, exactly what a NAT dropping an unsolicited SYN looks like.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler = socket.socket()
        self.addCleanup(filler.close)
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        return listener.getsockname()

    def start(self):
        return connect_from(
            self.fake_reactor(),
            ("127.0.0.1", 0),
            self.pending_target(),
            RecordingFactory(),
            timeout=3,
        )

    def test_timeout(self):
        d = self.start()
        self.assertNoResult(d)
        self.assertEqual(len(self.writers), 1)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, error.TimeoutError)
        self.assertEqual(self.writers, [])

    def test_cancel_closes(self):
        d = self.start()
        self.assertNoResult(d)
        waiter = self.writers[0]
        d.cancel()
        self.failureResultOf(d).trap(Exception)
        self.assertEqual(self.writers, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(waiter._sock.fileno(), -1)


class RealReactorCancelTests(unittest.TestCase):
    def test_cancel_pending_connect_on_the_real_reactor(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler = socket.socket()
        self.addCleanup(filler.close)
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        d = connect_from(
            reactor, ("127.0.0.1", 0), listener.getsockname(), RecordingFactory(), timeout=30
        )
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)
        # Nothing left in the reactor: trial would report a dirty reactor.
