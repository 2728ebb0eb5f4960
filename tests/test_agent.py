"""PeerAgent and the call flows: unit tests with Clock/StringTransport, and
end-to-end calls between two agents through a real server on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from kerjostunt.client.agent import ConnectFailed, PeerAgent, PeerConnection
from kerjostunt.client.agentconfig import Account, AgentConfig, Ports, ServerConfig, Timeouts
from kerjostunt.client.calls import (
    PREAMBLE,
    AppPortProtocol,
    CallSetup,
    Dialer,
    DialerConfig,
    build_offer,
    call_tag,
    dial_in_seconds,
    outcome_body,
    read_setup,
)
from kerjostunt.client.endpoint import PeerEndpoint
from kerjostunt.client.signaling import Registration, RegistrationFailed, SignalingError
from kerjostunt.tls import ensure_certificates
from kerjostunt.wire.kerjo import Outcome, parse_outcome
from kerjostunt.wire.sdp import Candidate, candidate_priority, parse_sdp, validate_offer
from kerjostunt.wire.sip.message import Headers, Response

from .support import DOMAIN, add_users, start_server

SECRET = bytes(range(32))


def _response(headers: dict[str, str], body: bytes) -> Response:
    return Response(200, "OK", Headers(list(headers.items())), body)


def _setup(remote_candidates: list[Candidate], peer_public: str | None = "198.51.100.9", role: str = "initiator") -> CallSetup:
    sdp = build_offer("bob", "10.0.0.9", 40001, None).with_candidates(remote_candidates)
    return CallSetup("c1@x", SECRET, role, peer_public, sdp)


def _cand(typ: str, tcptype: str, ip: str, port: int, other: int = 8191) -> Candidate:
    return Candidate("p", 1, "TCP", candidate_priority(typ, tcptype, other=other), ip, port, typ, tcptype)


class OfferAndOutcomeTests(unittest.TestCase):
    def test_offer_follows_the_client_rules(self) -> None:
        offer = build_offer("alice", "10.0.0.5", 40001, 7000)
        parsed = parse_sdp(offer.to_bytes())
        self.assertEqual(validate_offer(parsed), 40001)
        self.assertEqual(parsed.punch_candidate.endpoint, ("10.0.0.5", 40001))
        self.assertEqual([c.endpoint for c in parsed.of_type("host", "passive")], [("10.0.0.5", 7000)])

    def test_offer_without_app_port_has_only_the_punch_candidate(self) -> None:
        parsed = parse_sdp(build_offer("alice", "10.0.0.5", 40001, None).to_bytes())
        self.assertEqual(len(parsed.candidates), 1)

    def test_outcome_body(self) -> None:
        body = outcome_body("stunt", "simultaneous-open", ("198.51.100.9", 40007), 183.4)
        self.assertEqual(body, b"outcome=stunt\ntechnique=simultaneous-open\nremote=198.51.100.9:40007\nelapsed_ms=183\n")
        self.assertEqual(parse_outcome(body).technique, "simultaneous-open")

    def test_failed_outcome_has_no_remote(self) -> None:
        self.assertEqual(parse_outcome(outcome_body("failed", "none", ("1.2.3.4", 5), 10000)),
                         Outcome("failed", "none", None, 10000))

    def test_ipv6_remote_in_brackets(self) -> None:
        self.assertIn(b"remote=[2001:db8::1]:5\n", outcome_body("direct", "public", ("2001:db8::1", 5), 1))

    def test_dial_in(self) -> None:
        self.assertEqual(dial_in_seconds(_response({"X-Kerjo-Dial-In": "130"}, b"")), 0.13)
        self.assertEqual(dial_in_seconds(_response({}, b"")), 0.0)
        self.assertEqual(dial_in_seconds(_response({"X-Kerjo-Dial-In": "-5"}, b"")), 0.0)
        self.assertEqual(dial_in_seconds(_response({"X-Kerjo-Dial-In": "soon"}, b"")), 0.0)
        self.assertEqual(dial_in_seconds(_response({"X-Kerjo-Dial-In": "9999999"}, b"")), 10.0)


class SetupTests(unittest.TestCase):
    def headers(self, **extra: str) -> dict[str, str]:
        h = {"Call-ID": "leg@x", "X-Kerjo-Call-Secret": SECRET.hex(), "X-Kerjo-Role": "responder",
             "X-Kerjo-Peer-Public": "203.0.113.7"}
        h.update(extra)
        return h

    def test_reads_the_server_headers(self) -> None:
        setup = read_setup(_response(self.headers(), build_offer("bob", "10.0.0.9", 4000, None).to_bytes()))
        self.assertEqual((setup.role, setup.secret, setup.peer_public), ("responder", SECRET, "203.0.113.7"))
        self.assertEqual(setup.remote.punch_port, 4000)

    def test_handshake_id_depends_only_on_the_secret(self) -> None:
        # The server gives each leg its own Call-ID; both peers must still agree.
        body = build_offer("bob", "10.0.0.9", 4000, None).to_bytes()
        a = read_setup(_response(self.headers(**{"Call-ID": "caller-leg@a"}), body))
        b = read_setup(_response(self.headers(**{"Call-ID": "callee-leg@srv"}), body))
        self.assertEqual(a.handshake_id, b.handshake_id)
        other = read_setup(_response(self.headers(**{"X-Kerjo-Call-Secret": "ab" * 32}), body))
        self.assertNotEqual(a.handshake_id, other.handshake_id)

    def test_refuses_what_it_cannot_use(self) -> None:
        body = build_offer("bob", "10.0.0.9", 4000, None).to_bytes()
        for bad in ({"X-Kerjo-Call-Secret": ""}, {"X-Kerjo-Call-Secret": "zz"}, {"X-Kerjo-Role": "boss"}):
            self.assertRaises(ValueError, read_setup, _response(self.headers(**bad), body))
        self.assertRaises(ValueError, read_setup, _response(self.headers(), b"not sdp"))


class DialerPlanTests(unittest.TestCase):
    def dialer(self, setup: CallSetup, own_public: str) -> Dialer:
        return Dialer(Clock(), setup, Factory.forProtocol(Protocol), local_ip="10.0.0.5", punch_port=40000,
                      own_public_ip=own_public, config=DialerConfig(deadline=10.0, low_ttl=2))

    def test_punch_goes_to_predictions_best_first_then_the_punch_port(self) -> None:
        setup = _setup([
            _cand("prflx", "so", "198.51.100.9", 40004, other=100),
            _cand("prflx", "so", "198.51.100.9", 40003, other=200),
        ])
        # The peer's own punch port comes last; its 10.0.0.9 is another LAN's address: not dialed.
        self.assertEqual(self.dialer(setup, "203.0.113.7").punch_candidates(),
                         (("198.51.100.9", 40003), ("198.51.100.9", 40004)))
        sdp = build_offer("bob", "198.51.100.9", 40001, None).with_candidates(
            [_cand("prflx", "so", "198.51.100.9", 40003)])
        public = CallSetup("c1@x", SECRET, "initiator", "198.51.100.9", sdp)
        self.assertEqual(self.dialer(public, "203.0.113.7").punch_candidates(),
                         (("198.51.100.9", 40003), ("198.51.100.9", 40001)))

    def test_host_passive_candidates_only_on_a_shared_lan(self) -> None:
        cands = [_cand("host", "passive", "10.0.0.9", 7000), _cand("srflx", "passive", "198.51.100.9", 7000)]
        far = self.dialer(_setup(cands), "203.0.113.7").direct_candidates()
        self.assertEqual([(c.endpoint, t) for c, t in far], [(("198.51.100.9", 7000), "public")])
        near = self.dialer(_setup(cands, peer_public="203.0.113.7"), "203.0.113.7").direct_candidates()
        # On one LAN the public candidates are our own NAT's address: skipped (issue 12).
        self.assertEqual([t for _, t in near], ["lan"])

    def test_stunt_flag_skips_the_public_endpoint_but_not_the_lan(self) -> None:
        cands = [_cand("host", "passive", "10.0.0.9", 7000), _cand("srflx", "passive", "198.51.100.9", 7000)]
        dialer = self.dialer(_setup(cands, peer_public="203.0.113.7"), "203.0.113.7")
        dialer.stunt_only = True
        self.assertEqual([t for _, t in dialer.direct_candidates()], ["lan"])

    def test_stop_before_the_dial_moment_fails_without_dialing(self) -> None:
        clock = Clock()
        dialer = Dialer(clock, _setup([]), Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=1,
                        own_public_ip=None, config=DialerConfig(deadline=1.0, low_ttl=None))
        d = dialer.start(0.5)
        dialer.stop("cancelled by the server")
        failure = self.failureResultOf(d, ConnectFailed)
        self.assertEqual(failure.value.reason, "cancelled by the server")
        clock.advance(1)
        self.assertTrue(dialer.finished)
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_both_nats_random_fails_at_once_without_punching(self) -> None:
        """Nothing can predict either side: no 10 s punch, the reason is named."""
        import dataclasses

        from kerjostunt.client.nat.probing import ProbeResult

        clock = Clock()
        setup = dataclasses.replace(
            _setup([_cand("prflx", "so", "198.51.100.9", 40123)]),
            peer_nat="mapping=address-and-port-dependent; allocation=random; delta=none; confidence=0.05")
        dialer = Dialer(clock, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=1,
                        own_public_ip=None, config=DialerConfig(deadline=10.0, low_ttl=None))
        dialer.stunt_only = True  # no public endpoint to try either
        dialer.own_probes = [ProbeResult(("192.0.2.1", 3478), 1, "203.0.113.5", 31000),
                             ProbeResult(("192.0.2.1", 3479), 1, "203.0.113.5", 52011),
                             ProbeResult(("192.0.2.2", 3478), 1, "203.0.113.5", 9001)]
        d = dialer.start(0.03)
        clock.advance(0.03)
        failure = self.failureResultOf(d, ConnectFailed)
        self.assertIn("both NATs allocate ports at random", failure.value.reason)
        self.assertIsNone(dialer._punch)
        # The outcome's tried= and the failed: line's advice (issue 14).
        self.assertEqual(dialer.tried(), (("punch", "skipped"),))
        self.assertTrue(failure.value.reason.endswith(
            " -- closest: punch (skipped); both NATs allocate ports at random: a relay is needed"),
            failure.value.reason)

    def started(self, setup: CallSetup, own_public: str | None, probes: list[Any]) -> tuple[Dialer, Clock]:
        clock = Clock()
        dialer = Dialer(clock, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=1,
                        own_public_ip=own_public, config=DialerConfig(deadline=10.0, low_ttl=None))
        dialer.own_probes = probes
        dialer.start(0.03).addErrback(lambda f: f.trap(ConnectFailed))  # every attempt fails here
        clock.advance(0.03)
        return dialer, clock

    def test_random_facing_sequential_is_not_punched(self) -> None:
        """Issue 12: neither side can predict the other's port; no 10 s punch, no birthday."""
        import dataclasses

        from kerjostunt.client.nat.probing import ProbeResult

        setup = dataclasses.replace(
            _setup([_cand("prflx", "so", "198.51.100.9", 40123)]),
            peer_nat="mapping=address-and-port-dependent; allocation=random; delta=none; confidence=0.05")
        own = [ProbeResult(("192.0.2.1", 3478), 1, "203.0.113.5", 20000),
               ProbeResult(("192.0.2.1", 3479), 1, "203.0.113.5", 20004),
               ProbeResult(("192.0.2.2", 3478), 1, "203.0.113.5", 20008)]
        dialer, _ = self.started(setup, None, own)
        self.assertIsNone(dialer._punch)
        self.assertIn("punch: not tried: a random NAT facing an address-dependent one", "; ".join(dialer.errors))
        dialer.stop("done")

    def test_a_lan_peer_and_a_public_peer_are_not_punched(self) -> None:
        """Issue 12: a punch there would only take NAT ports; the direct connects do."""
        import dataclasses

        lan = _setup([_cand("host", "passive", "10.0.0.9", 7000), _cand("prflx", "so", "203.0.113.7", 40123)],
                     peer_public="203.0.113.7")
        dialer, _ = self.started(lan, "203.0.113.7", [])
        self.assertIsNone(dialer._punch)
        self.assertIn("punch: not tried: the peer is on our LAN", dialer.errors)
        dialer.stop("done")
        # The peer's own punch address is the public one the server sees: no NAT.
        sdp = build_offer("bob", "198.51.100.9", 40001, None).with_candidates(
            [_cand("srflx", "passive", "198.51.100.9", 7000)])
        public = dataclasses.replace(CallSetup("c1@x", SECRET, "initiator", "198.51.100.9", sdp),
                                     peer_nat="mapping=endpoint-independent; allocation=preserving")
        dialer, _ = self.started(public, "203.0.113.7", [])
        self.assertIsNone(dialer._punch)
        self.assertIn("punch: not tried: the peer has a public address, dialed directly", dialer.errors)
        dialer.stop("done")


class AppPortTests(unittest.TestCase):
    def connect(self, lookup: Any) -> tuple[AppPortProtocol, StringTransport, Clock]:
        clock = Clock()
        protocol = AppPortProtocol(lookup, clock)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, clock

    def test_a_stranger_is_dropped(self) -> None:
        protocol, transport, clock = self.connect(lambda tag: None)
        protocol.dataReceived(b"GET / HTTP/1.0\r\n")
        self.assertTrue(transport.disconnecting or transport.disconnected, "no preamble: at once")
        protocol, transport, clock = self.connect(lambda tag: None)
        protocol.dataReceived(PREAMBLE + b"0" * 32 + b"\n")
        clock.advance(1.0)
        self.assertTrue(transport.disconnecting or transport.disconnected, "an unknown call: after RELOOK_FOR")

    def test_silence_is_dropped(self) -> None:
        protocol, transport, clock = self.connect(lambda tag: None)
        clock.advance(5)
        self.assertTrue(transport.disconnected)

    def test_the_named_call_gets_the_connection_in_handshake(self) -> None:
        clock = Clock()
        setup = _setup([], role="responder")
        dialer = Dialer(clock, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=1,
                        own_public_ip=None, config=DialerConfig(deadline=1.0, low_ttl=None))
        seen = []
        protocol, transport, _ = self.connect(lambda tag: seen.append(tag) or dialer)
        protocol.dataReceived(PREAMBLE + dialer.tag + b"\nKJ1 HELLO " + b"a" * 32 + b"\n")
        self.assertEqual(seen, [call_tag(SECRET, setup.handshake_id)])
        self.assertTrue(transport.value().startswith(b"KJ1 R "))  # the responder proved itself


class FakeSignaling:
    """A registered signaling connection whose REGISTER succeeds at once."""

    def __init__(self) -> None:
        self.disconnected: defer.Deferred = defer.Deferred()
        self.transport = StringTransport()

    def register(self, expires: int, mapping: Any = None) -> defer.Deferred:
        return defer.succeed(Registration("alice", "203.0.113.5", 4000, expires, None))

    def ping(self) -> defer.Deferred:
        return defer.Deferred()

    def unregister(self) -> defer.Deferred:
        return defer.succeed(None)


class BackoffTests(unittest.TestCase):
    def agent(self, clock: Clock, **kw: Any) -> PeerAgent:
        return PeerAgent(clock, server=("127.0.0.1", 5061), user_id="alice", password="x", domain=DOMAIN,
                         ca_path="unused", listen_port=None, jitter=lambda: 0.5, **kw)

    def test_delay_doubles_up_to_the_cap(self) -> None:
        agent = self.agent(Clock(), backoff_initial=1.0, backoff_max=8.0)
        self.assertEqual([agent.backoff_delay(n) for n in range(6)], [1, 2, 4, 8, 8, 8])

    def test_jitter_spreads_half_to_one_and_a_half(self) -> None:
        low = PeerAgent(Clock(), server=("h", 1), user_id="a", password="x", domain=DOMAIN, ca_path="x",
                        listen_port=None, jitter=lambda: 0.0)
        self.assertEqual(low.backoff_delay(2), 2.0)

    def test_reconnects_with_backoff_after_losing_the_server(self) -> None:
        clock = Clock()
        agent = self.agent(clock, punch_port_max_age=0.0)
        attempts: list[float] = []
        first = FakeSignaling()

        def connect(*args: Any, **kw: Any) -> defer.Deferred:
            if not attempts:
                attempts.append(clock.seconds())
                return defer.succeed(first)
            attempts.append(clock.seconds())
            return defer.fail(SignalingError("connection refused"))

        self.patch(__import__("kerjostunt.tls", fromlist=["x"]), "client_options", lambda *a: None)
        agent.connect_signaling = connect
        self.successResultOf(agent.start())
        self.assertTrue(agent.signaling_up)
        first.disconnected.callback(None)  # the server went away
        self.assertFalse(agent.signaling_up)
        for _ in range(40):
            clock.advance(1)
        self.assertEqual(attempts, [0.0, 1.0, 3.0, 7.0, 15.0, 31.0])
        self.successResultOf(agent.stop())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_start_twice_fails(self) -> None:
        clock = Clock()
        agent = self.agent(clock, punch_port_max_age=0.0)
        self.patch(__import__("kerjostunt.tls", fromlist=["x"]), "client_options", lambda *a: None)
        agent.connect_signaling = lambda *a, **kw: defer.Deferred()
        agent.start()
        failure = self.failureResultOf(agent.start(), RuntimeError)
        self.assertEqual(str(failure.value), "agent already starting")
        agent.stop()
        failure = self.failureResultOf(agent.connect("bob", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertEqual(failure.value.reason, "the agent is stopped, not registered")

    def test_connect_before_start_fails(self) -> None:
        agent = self.agent(Clock())
        failure = self.failureResultOf(agent.connect("bob", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertIn("not registered", failure.value.reason)


class ConfigTests(unittest.TestCase):
    def test_the_flat_keywords_build_the_grouped_config(self) -> None:
        config = AgentConfig.of(server=("stunt.example", 5062), user_id="alice", password="pw", domain="d",
                                ca_path="ca.pem", listen_port=None, low_ttl=None, backoff_max=8.0,
                                keepalive_interval=15.0)
        self.assertEqual(config.server, ServerConfig("stunt.example", 5062, domain="d", ca_path="ca.pem"))
        self.assertEqual(config.server.expected_name, "stunt.example")
        self.assertEqual(config.account, Account("alice", "pw"))
        self.assertNotIn("pw", repr(config))
        self.assertEqual(config.ports, Ports(listen_port=None, low_ttl=None))
        self.assertEqual(config.timeouts, Timeouts(keepalive_interval=15.0))
        self.assertEqual(config.reconnect.maximum, 8.0)

    def test_a_misspelt_keyword_is_refused(self) -> None:
        with self.assertRaises(TypeError):
            PeerAgent(Clock(), server=("h", 1), user_id="a", password="x", domain=DOMAIN, ca_path="x",
                      listen_prot=7000)  # type: ignore[call-overload]

    def test_an_agent_from_either(self) -> None:
        flat = PeerAgent(Clock(), server=("h", 1), user_id="a", password="x", domain=DOMAIN, ca_path="x",
                         listen_port=None)
        grouped = PeerAgent(Clock(), AgentConfig(ServerConfig("h", 1, domain=DOMAIN, ca_path="x"), Account("a", "x"),
                                                 ports=Ports(listen_port=None)))
        self.assertEqual(flat.config, grouped.config)
        self.assertEqual((grouped.user_id, grouped.punch_deadline, grouped.low_ttl), ("a", 10.0, 2))


class FakeAgent:
    def __init__(self, result: defer.Deferred) -> None:
        self.result = result
        self.calls: list[tuple[str, Any, float]] = []

    def connect(self, peer_id: str, factory: Any, *, timeout: float) -> defer.Deferred:
        self.calls.append((peer_id, factory, timeout))
        return self.result


class EndpointTests(unittest.TestCase):
    def test_fires_with_the_protocol(self) -> None:
        proto = Protocol()
        agent = FakeAgent(defer.succeed(PeerConnection("bob", proto, "lan", "direct", ("10.0.0.9", 7000), 3.0)))
        factory = Factory.forProtocol(Protocol)
        self.assertIs(self.successResultOf(PeerEndpoint(agent, "bob").connect(factory)), proto)  # type: ignore[arg-type]
        self.assertEqual(agent.calls, [("bob", factory, 20.0)])

    def test_passes_failures_on(self) -> None:
        agent = FakeAgent(defer.fail(ConnectFailed("480 Temporarily Unavailable", 480)))
        self.failureResultOf(PeerEndpoint(agent, "bob").connect(Factory.forProtocol(Protocol)), ConnectFailed)  # type: ignore[arg-type]


# -- end to end --------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiters: list[tuple[bytes, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for item in list(self.waiters):
            if item[0] in self.received:
                self.waiters.remove(item)
                item[1].callback(self.received)

    def wait_for(self, data: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if data in self.received:
            d.callback(self.received)
        else:
            self.waiters.append((data, d))
        return d.addTimeout(10, reactor)


class EndToEndTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        db = self.running.database()
        try:
            db.add_user("carol", DOMAIN, password="singer")  # in no group with alice
            db.add_user("dave", DOMAIN, password="diver")
            db.join_group("friends", ["dave"])
        finally:
            db.close()
        self.recorded: list[defer.Deferred] = []
        store = self.running.server.store
        original = store.record_attempt

        def record_attempt(*args: Any, **kwargs: Any) -> defer.Deferred:
            d = original(*args, **kwargs)
            self.recorded.append(d)
            self.attempt_recorded.callback(None) if not self.attempt_recorded.called else None
            return d

        self.attempt_recorded: defer.Deferred = defer.Deferred()
        self.patch(store, "record_attempt", record_attempt)

    def agent(self, user: str, password: str, **kw: Any) -> PeerAgent:
        agent = PeerAgent(reactor, server=(self.running.host, self.running.port), user_id=user, password=password,
                          domain=DOMAIN, ca_path=str(self.running.ca), tls_hostname="localhost", **kw)
        self.addCleanup(agent.stop)
        return agent

    @defer.inlineCallbacks
    def test_alice_connects_to_bob_and_data_flows_both_ways(self):  # type: ignore[no-untyped-def]
        bob_side: defer.Deferred = defer.Deferred()
        bob = self.agent("bob", "builder", accept_factory=Factory.forProtocol(Recorder), on_peer=bob_side.callback)
        yield bob.start()
        alice = self.agent("alice", "wonderland")
        registration = yield alice.start()
        self.assertEqual(registration.public_ip, "127.0.0.1")
        self.assertTrue(alice.signaling_up)

        connection = yield alice.connect("bob", Factory.forProtocol(Recorder), timeout=20)
        self.assertEqual(connection.peer_id, "bob")
        self.assertIn(connection.outcome, ("direct", "stunt"))
        self.assertIn(connection.technique, ("lan", "public", "simultaneous-open", "low-ttl", "accepted"))
        self.assertGreaterEqual(connection.elapsed_ms, 0)

        self.addCleanup(connection.protocol.transport.abortConnection)
        connection.protocol.transport.write(b"hello bob\n")
        theirs = yield bob_side.addTimeout(10, reactor)
        self.addCleanup(theirs.protocol.transport.abortConnection)
        self.assertEqual(theirs.peer_id, "alice")
        yield theirs.protocol.wait_for(b"hello bob\n")
        theirs.protocol.transport.write(b"hello alice\n")
        yield connection.protocol.wait_for(b"hello alice\n")
        # One TCP connection, seen from both ends.
        mine = connection.protocol.transport
        self.assertEqual(mine.getPeer().port, theirs.protocol.transport.getHost().port)

        yield self.attempt_recorded
        yield defer.gatherResults(self.recorded)
        attempts = yield self.running.server.store.recent_attempts("alice")
        self.assertEqual(len(attempts), 1)
        self.assertEqual((attempts[0].caller, attempts[0].callee), ("alice", "bob"))
        self.assertEqual(attempts[0].outcome, connection.outcome)
        # The server records the first success reported; after a punch on
        # loopback one side saw 'accepted', the other its dial.
        self.assertIn(attempts[0].technique, ("lan", "public", "simultaneous-open", "low-ttl", "accepted"))

    @defer.inlineCallbacks
    def test_two_calls_one_after_the_other(self):  # type: ignore[no-untyped-def]
        bob = self.agent("bob", "builder", accept_factory=Factory.forProtocol(Recorder))
        yield bob.start()
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        first = yield alice.connect("bob", Factory.forProtocol(Recorder))
        second = yield alice.connect("bob", Factory.forProtocol(Recorder))
        self.addCleanup(first.protocol.transport.abortConnection)
        self.addCleanup(second.protocol.transport.abortConnection)
        self.assertIsNot(first.protocol, second.protocol)

    @defer.inlineCallbacks
    def test_unknown_user_is_404(self):  # type: ignore[no-untyped-def]
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        failure = yield self.assertFailure(alice.connect("nobody", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertEqual(failure.code, 404)
        self.assertIn("404", failure.reason)

    @defer.inlineCallbacks
    def test_offline_user_is_480(self):  # type: ignore[no-untyped-def]
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        failure = yield self.assertFailure(alice.connect("dave", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertEqual(failure.code, 480)

    @defer.inlineCallbacks
    def test_no_shared_group_is_403(self):  # type: ignore[no-untyped-def]
        carol = self.agent("carol", "singer", accept_factory=Factory.forProtocol(Protocol))
        yield carol.start()
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        failure = yield self.assertFailure(alice.connect("carol", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertEqual(failure.code, 403)

    @defer.inlineCallbacks
    def test_a_peer_that_accepts_nothing_declines(self):  # type: ignore[no-untyped-def]
        bob = self.agent("bob", "builder")  # no accept_factory
        yield bob.start()
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        failure = yield self.assertFailure(alice.connect("bob", Factory.forProtocol(Protocol)), ConnectFailed)
        self.assertEqual(failure.code, 603)

    @defer.inlineCallbacks
    def test_wrong_password_fails_start(self):  # type: ignore[no-untyped-def]
        alice = self.agent("alice", "not-hers")
        failure = yield self.assertFailure(alice.start(), RegistrationFailed)
        self.assertEqual(failure.response.code, 403)
        self.assertFalse(alice.signaling_up)

    @defer.inlineCallbacks
    def test_untrusted_certificate_fails_start(self):  # type: ignore[no-untyped-def]
        other = ensure_certificates(Path(self.mktemp()), "elsewhere")
        alice = PeerAgent(reactor, server=(self.running.host, self.running.port), user_id="alice",
                          password="wonderland", domain=DOMAIN, ca_path=str(other.ca), tls_hostname="localhost")
        self.addCleanup(alice.stop)
        failure = yield self.assertFailure(alice.start(), SignalingError)
        self.assertIn("--ca", str(failure))

    @defer.inlineCallbacks
    def test_stop_unregisters(self):  # type: ignore[no-untyped-def]
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        self.assertIsNotNone(self.running.server.registrar.lookup("alice"))
        yield alice.stop()
        self.assertIsNone(self.running.server.registrar.lookup("alice"))
        self.assertFalse(alice.signaling_up)

    @defer.inlineCallbacks
    def test_reconnects_after_the_server_drops_it(self):  # type: ignore[no-untyped-def]
        alice = self.agent("alice", "wonderland", backoff_initial=0.01, backoff_max=0.05)
        yield alice.start()
        first = alice.signaling
        registered = defer.Deferred()
        alice._up_waiters.append(registered)
        first.transport.abortConnection()
        yield registered.addTimeout(10, reactor)
        self.assertIsNot(alice.signaling, first)
        self.assertTrue(alice.signaling_up)
        self.assertIsNotNone(self.running.server.registrar.lookup("alice"))


class AppPortEarlyConnectionTests(unittest.TestCase):
    """The peer's connection may name a call we have not started yet (its answer still on its way)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.setup = _setup([], role="responder")
        self.dialer = Dialer(self.clock, self.setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1",
                             punch_port=1, own_public_ip=None, config=DialerConfig(deadline=1.0, low_ttl=None))
        self.known: dict[bytes, Any] = {}
        self.protocol = AppPortProtocol(self.known.get, self.clock)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_a_call_known_moments_later_gets_the_connection(self) -> None:
        self.protocol.dataReceived(PREAMBLE + self.dialer.tag + b"\n")
        self.clock.advance(0.05)
        self.assertFalse(self.transport.disconnecting or self.transport.disconnected)
        self.protocol.dataReceived(b"KJ1 HELLO " + b"a" * 32 + b"\n")  # kept meanwhile
        self.known[self.dialer.tag] = self.dialer
        self.clock.advance(0.02)
        self.assertTrue(self.transport.value().startswith(b"KJ1 R "))  # the responder proved itself

    def test_a_call_never_known_is_dropped_after_a_second(self) -> None:
        self.protocol.dataReceived(PREAMBLE + b"0" * 32 + b"\n")
        self.clock.advance(0.9)
        self.assertFalse(self.transport.disconnecting or self.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def test_flooding_while_waiting_is_dropped(self) -> None:
        self.protocol.dataReceived(PREAMBLE + b"0" * 32 + b"\n")
        self.protocol.dataReceived(b"x" * 500)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
