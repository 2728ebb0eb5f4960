"""Issue 13: a peer's SDP must not make the other dial loopback, link-local, the server or a LAN.

The rule (``wire/candidates.py``) on its own; the server dropping such
candidates before it forwards an offer (with fakes, then on real sockets with
a caller on another loopback address); the client refusing them before it
dials (a real listener that must see no connection).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.calls.race import Dialer, DialerConfig
from kerjostunt.client.calls.setup import CallSetup, ConnectFailed
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.server.calls import CallManager, CallSettings
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.service import ServerSettings, server_addresses
from kerjostunt.wire.candidates import Scope, refusal, screen
from kerjostunt.wire.sdp import Candidate, SessionDescription, candidate_priority, parse_sdp

from .callsupport import Peer, online
from .support import DOMAIN, add_users, start_server
from .test_calls import FakeConn, FakeObservations, FakeStore, answer, invite_request

SECRET = b"s" * 32
#: what an attacker's SDP names: ssh on the callee's own machine, a cloud metadata service, ::1
HOSTILE = [("127.0.0.1", 22), ("169.254.169.254", 80), ("::1", 22), ("::ffff:127.0.0.1", 25),
           ("0.0.0.0", 80), ("224.0.0.1", 80), ("255.255.255.255", 80), ("fe80::1", 80)]


def cand(ip: str, port: int, typ: str = "host", tcptype: str = "passive") -> Candidate:
    return Candidate("x", 1, "TCP", candidate_priority(typ, tcptype), ip, port, typ, tcptype)


def hostile_offer(user: str, ip: str, punch: int) -> bytes:
    cands = [Candidate("1", 1, "TCP", candidate_priority("host", "so"), ip, punch, "host", "so")]
    cands += [cand(a, p) for a, p in HOSTILE]
    cands.append(cand(ip, 7000))
    return SessionDescription(user, ip, cands, punch).to_bytes()


class RuleTests(unittest.TestCase):
    def test_never_dialed(self) -> None:
        for ip, port in HOSTILE:
            self.assertIsNotNone(refusal(cand(ip, port), Scope(same_network=True)), ip)
        self.assertEqual(refusal(cand("192.0.2.1", 5061), Scope(own=frozenset({"192.0.2.1"}))),
                         "the server's own address")
        self.assertEqual(refusal(cand("198.51.100.9", 0), Scope()), "port 0")

    def test_a_relayed_address_on_the_servers_host_is_passed_on(self) -> None:
        """coturn beside the server (docs/relay.rst): the relayed address is the server's IP, reached by Connect."""
        own = Scope(own=frozenset({"192.0.2.1"}))
        self.assertIsNone(refusal(cand("192.0.2.1", 40123, "relay"), own))
        self.assertEqual(refusal(cand("192.0.2.1", 40123, "srflx"), own), "the server's own address")

    def test_loopback_only_on_one_host(self) -> None:
        self.assertIsNone(refusal(cand("127.0.0.1", 22), Scope(local=True)))
        self.assertIsNotNone(refusal(cand("169.254.169.254", 80), Scope(local=True)))

    def test_private_host_candidates_only_on_one_lan(self) -> None:
        for ip in ("10.0.0.9", "172.16.1.1", "192.168.1.9", "100.64.0.1", "fd00::1"):
            self.assertEqual(refusal(cand(ip, 7000), Scope()), "private address of another network")
            self.assertIsNone(refusal(cand(ip, 7000), Scope(same_network=True)))
        # The server's own observation of a peer on its LAN (a server inside one) stays.
        self.assertIsNone(refusal(cand("10.0.0.9", 7000, "srflx"), Scope()))
        # Public, benchmarking (the NAT lab's Internet) and documentation addresses pass.
        for ip in ("198.18.3.2", "203.0.113.7", "2001:db8::1", "8.8.8.8"):
            self.assertIsNone(refusal(cand(ip, 7000), Scope()), ip)

    def test_screen_splits(self) -> None:
        kept, refused = screen([cand("127.0.0.1", 22), cand("203.0.113.7", 7000)], Scope())
        self.assertEqual([c.ip for c in kept], ["203.0.113.7"])
        self.assertEqual([(c.ip, why) for c, why in refused], [("127.0.0.1", "loopback address")])

    def test_server_addresses_from_settings(self) -> None:
        settings = ServerSettings(domain="203.0.113.1", sip_endpoint="tcp:5061:interface=198.51.100.2",
                                  probe_endpoints=["tcp:3478:interface=\\:\\:1", "tcp:3479"],
                                  probe_alt_ip="198.51.100.3", web_endpoint="tcp:8443:interface=0.0.0.0")
        self.assertEqual(server_addresses(settings), {"203.0.113.1", "198.51.100.2", "::1", "198.51.100.3"})


class ServerScreensTests(unittest.SynchronousTestCase):
    """The call manager with fakes: what the callee gets of a hostile caller's SDP."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        registrar = Registrar(self.clock)
        self.manager = CallManager(self.clock, DOMAIN, registrar, FakeStore(), FakeObservations(), lambda w: None,
                                   CallSettings(server_addresses=frozenset({"192.0.2.10"})))
        self.alice = FakeConn("alice", "203.0.113.7", 4000)
        self.bob = FakeConn("bob", "198.51.100.9", 5000)
        registrar.bind("alice", self.alice, "<sips:alice@x>", 3600)
        registrar.bind("bob", self.bob, "<sips:bob@x>", 3600)

    def forwarded(self, body: bytes) -> Any:
        self.manager.handle_request(self.alice, invite_request("alice", "bob", body=body))
        return self.bob.last()

    def test_hostile_candidates_are_not_forwarded(self) -> None:
        body = hostile_offer("alice", "203.0.113.7", 40001)
        sdp = parse_sdp(body)
        sdp.candidates.append(cand("192.0.2.10", 5061))  # the server itself
        sdp.candidates.append(cand("10.1.2.3", 8080))    # alice's LAN, not bob's
        forwarded = self.forwarded(sdp.to_bytes())
        self.assertEqual(forwarded.method, "INVITE")
        sent = {(c.ip, c.port) for c in parse_sdp(forwarded.body).candidates}
        self.assertEqual(sent & {(str(ip), p) for ip, p in HOSTILE}, set())
        self.assertNotIn(("192.0.2.10", 5061), sent)
        self.assertNotIn(("10.1.2.3", 8080), sent)
        # What alice may offer still goes: her punch port, her public passive port.
        self.assertIn(("203.0.113.7", 40001), sent)
        self.assertIn(("203.0.113.7", 7000), sent)

    def test_the_address_a_peer_reached_the_server_at_is_the_servers(self) -> None:
        """A wildcard listener names no address in the settings; the connections do."""
        self.bob.transport = StringTransport(hostAddress=IPv4Address("TCP", "192.0.2.99", 5061))
        sdp = parse_sdp(hostile_offer("alice", "203.0.113.7", 40001))
        sdp.candidates.append(cand("192.0.2.99", 22))
        sent = {(c.ip, c.port) for c in parse_sdp(self.forwarded(sdp.to_bytes()).body).candidates}
        self.assertNotIn(("192.0.2.99", 22), sent)
        self.assertIn(("203.0.113.7", 7000), sent)

    def test_private_candidates_go_to_a_peer_behind_the_same_address(self) -> None:
        self.bob.peer = ("203.0.113.7", 5000)  # one NAT: one LAN
        forwarded = self.ring_private()
        self.assertIn(("10.0.0.5", 40001), {(c.ip, c.port) for c in parse_sdp(forwarded.body).candidates})

    def test_private_candidates_do_not_leave_their_lan(self) -> None:
        forwarded = self.ring_private()
        sdp = parse_sdp(forwarded.body)
        self.assertEqual(sdp.of_type("host"), [])
        self.assertTrue(all(c.raddr is None for c in sdp.candidates))  # not named as raddr either
        self.assertNotIn(b"10.0.0.5", forwarded.body)
        # The answer is screened the same way on its way back.
        self.manager.handle_response(self.bob, answer(forwarded))
        ok = self.alice.last()
        self.assertNotIn(b"192.168.1.9", ok.body)

    def ring_private(self) -> Any:
        """invite_request's default offer: alice's host candidates are at 10.0.0.5."""
        body = invite_request("alice", "bob").body
        self.assertEqual({c.ip for c in parse_sdp(body).candidates}, {"10.0.0.5"})
        return self.forwarded(body)


class ServerScreensOnSocketsTests(unittest.TestCase):
    """A real server; the caller on 127.0.0.2, the callee on 127.0.0.1: two hosts as far as
    the rule goes, so the caller's loopback candidates are not the callee's to dial."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        self.peers = yield online(self, self.running, {"bob": "builder"})
        alice = Peer("alice")
        alice.proto = yield connect_signaling(
            reactor, self.running.host, self.running.port, tls.client_options(self.running.ca, "localhost"),
            lambda: SignalingClientProtocol(reactor, "alice", "wonderland", DOMAIN, alice.on_request),
            bind_address=("127.0.0.2", 0),
        )
        self.addCleanup(self._close, alice.proto)
        yield alice.proto.register()
        self.peers["alice"] = alice

    @staticmethod
    def _close(proto: SignalingClientProtocol) -> Any:
        if proto.disconnected.called:
            return None
        proto.transport.loseConnection()
        return proto.disconnected

    @defer.inlineCallbacks
    def test_loopback_and_metadata_candidates_are_not_forwarded(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        _, final = alice.invite("bob", hostile_offer("alice", "127.0.0.2", 40001))
        final.addErrback(lambda f: None)
        forwarded = yield bob.next("INVITE")
        sent = parse_sdp(forwarded.body).candidates
        self.assertEqual({(c.ip, c.port) for c in sent} & set(HOSTILE), set())
        self.assertFalse(any(c.ip in ("127.0.0.1", "169.254.169.254", "::1") for c in sent), sent)
        bob.answer(forwarded, 486)
        yield final


class ClientRefusesTests(unittest.TestCase):
    """The client's Dialer, given what a lying server sent, against a real listener."""

    def listener(self) -> tuple[int, list[Any]]:
        accepted: list[Any] = []

        class Recorder(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self.transport.getPeer())

        port = reactor.listenTCP(0, Factory.forProtocol(Recorder), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, accepted

    @defer.inlineCallbacks
    def test_loopback_candidates_are_not_dialed(self):  # type: ignore[no-untyped-def]
        port, accepted = self.listener()
        remote = SessionDescription("bob", "127.0.0.1", [
            cand("127.0.0.1", port), cand("127.0.0.1", port, "srflx"), cand("::1", port, "srflx"),
            cand("169.254.169.254", 80, "srflx"), cand("127.0.0.1", port, "prflx", "so"),
        ])
        # The server claimed bob shares our public address (a LAN), and our server is elsewhere:
        # nothing on one host makes loopback reasonable.
        setup = CallSetup("c1@x", SECRET, "initiator", "127.0.0.1", remote)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            dialer = Dialer(reactor, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=0,
                            own_public_ip="127.0.0.1", config=DialerConfig(deadline=1.0, low_ttl=None),
                            server_ip="192.0.2.10")
        finally:
            globalLogPublisher.removeObserver(events.append)
        [line] = [e for e in events if "not dialing" in str(e.get("log_format"))]
        self.assertEqual(line["count"], 5)
        self.assertIn("169.254.169.254:80 srflx (link-local address)", line["which"])
        self.assertEqual(dialer.remote.candidates, [])
        self.assertEqual(dialer.direct_candidates(), [])
        self.assertEqual(dialer.punch_candidates(), ())
        with self.assertRaises(ConnectFailed):
            yield dialer.start(0.0)
        self.assertEqual(accepted, [])

    @defer.inlineCallbacks
    def test_the_same_candidate_is_dialed_on_one_host(self):  # type: ignore[no-untyped-def]
        """The control: the listener does see a dial when loopback is allowed."""
        port, accepted = self.listener()
        remote = SessionDescription("bob", "127.0.0.1", [cand("127.0.0.1", port)])
        setup = CallSetup("c1@x", SECRET, "initiator", "127.0.0.1", remote)
        dialer = Dialer(reactor, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=0,
                        own_public_ip="127.0.0.1", config=DialerConfig(deadline=0.5, low_ttl=None,
                                                                      handshake_timeout=0.3))
        self.assertEqual(len(dialer.direct_candidates()), 1)
        with self.assertRaises(ConnectFailed):
            yield dialer.start(0.0)
        self.assertEqual(len(accepted), 1)
