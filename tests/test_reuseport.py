"""SO_REUSEPORT listening: two listeners share one port, a plain one cannot join them."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from kerjostunt.server.reuseport import ReusePortEndpoint, TCPListen, parse_tcp
from kerjostunt.server.tap import Options


class Counting(Factory):
    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        self.accepted += 1
        return Protocol()


class ParseTests(unittest.TestCase):
    def test_what_tap_writes(self) -> None:
        self.assertEqual(parse_tcp("tcp:5061:backlog=1024:interface=10.0.0.1"), TCPListen(5061, "10.0.0.1", 1024))
        self.assertEqual(parse_tcp("tcp:0:interface=127.0.0.1"), TCPListen(0, "127.0.0.1", 50))
        self.assertEqual(parse_tcp("tcp:5061:interface=2001\\:db8\\:\\:1").interface, "2001:db8::1")
        self.assertRaises(ValueError, parse_tcp, "ssl:5061")

    def test_the_option(self) -> None:
        options = Options()
        options.parseOptions(["--reuse-port"])
        self.assertTrue(options.settings().reuse_port)
        options = Options()
        options.parseOptions([])
        self.assertFalse(options.settings().reuse_port)


class ShareTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_two_listeners_share_a_port_and_a_plain_one_is_refused(self):  # type: ignore[no-untyped-def]
        first, second = Counting(), Counting()
        port_a = yield ReusePortEndpoint(reactor, TCPListen(0, "127.0.0.1")).listen(first)
        self.addCleanup(port_a.stopListening)
        number = port_a.getHost().port
        port_b = yield ReusePortEndpoint(reactor, TCPListen(number, "127.0.0.1")).listen(second)
        self.addCleanup(port_b.stopListening)
        self.assertEqual(port_b.getHost().port, number)
        yield self.assertFailure(TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(Counting()),
                                 CannotListenError)
        clients = []
        for _ in range(24):  # the kernel spreads them by a hash of the addresses
            proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", number).connect(Factory.forProtocol(Protocol))
            clients.append(proto)
        for proto in clients:
            proto.transport.loseConnection()
        self.assertGreater(first.accepted + second.accepted, 0)
