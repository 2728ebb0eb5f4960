"""IPv6 candidates and the family race (issue 17): which addresses are offered,
the SDP rules, the RFC 8305 stagger, and an IPv6 punch between two dialers on ::1."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.client.calls import CallSetup, Dialer, DialerConfig, build_offer, family, race
from kerjostunt.client.handshake import HandshakeFactory
from kerjostunt.client.nat import birthday
from kerjostunt.client.nat.interfaces import global_ipv6_addresses, parse_if_inet6, preferred_ipv6
from kerjostunt.client.nat.punch import PunchPlan
from kerjostunt.client.nat.sockets import reusable_socket
from kerjostunt.server.calls.dialing import augmented
from kerjostunt.wire.prediction import NATDescription, Prediction
from kerjostunt.wire.sdp import Candidate, SDPError, parse_sdp, validate_offer

from .test_dualstack import HAS_V6, NO_V6

SECRET = bytes(range(32))

# address, ifindex, prefix, scope, flags, name (Linux /proc/net/if_inet6)
IF_INET6 = "\n".join([
    "00000000000000000000000000000001 01 80 10 80       lo",
    "fe80000000000000021122fffe334455 02 40 20 80     eth0",  # link-local
    "fd000000000000000000000000000002 02 40 00 80     eth0",  # unique-local
    "20010db8000000000211 22fffe334455 02 40 00 80 eth0",  # malformed: skipped
    "20010db8000000000211 22fffe334455",
    "20010db8000000000000000000000001 02 40 00 80     eth0",  # stable
    "20010db80000000012345678abcdef01 02 40 00 01     eth0",  # temporary
    "20010db8000000000000000000000bad 02 40 00 20     eth0",  # deprecated
    "20010db8000000000000000000000ddd 02 40 00 40     eth0",  # tentative
    "00000000000000000000ffffc0000201 02 40 00 80     eth0",  # IPv4-mapped
    "",
])


class AddressChoiceTests(unittest.TestCase):
    def test_only_usable_global_unicast(self) -> None:
        found = parse_if_inet6(IF_INET6)
        self.assertEqual([a.address for a in found], ["2001:db8::1", "2001:db8::1234:5678:abcd:ef01"])
        self.assertEqual([a.temporary for a in found], [False, True])

    def test_a_temporary_address_first(self) -> None:
        self.assertEqual([a.address for a in global_ipv6_addresses(lambda: IF_INET6)][0],
                         "2001:db8::1234:5678:abcd:ef01")
        self.assertEqual(preferred_ipv6(lambda: IF_INET6), "2001:db8::1234:5678:abcd:ef01")

    def test_none_without_ipv6(self) -> None:
        self.assertIsNone(preferred_ipv6(lambda: ""))
        self.assertIsNone(preferred_ipv6(lambda: IF_INET6.splitlines()[0] + "\n" + IF_INET6.splitlines()[1]))


class OfferRuleTests(unittest.TestCase):
    def test_dual_stack_offer(self) -> None:
        offer = build_offer("alice", "10.0.0.5", 40001, 7000, ipv6_punch=("2001:db8::5", 40002))
        parsed = parse_sdp(offer.to_bytes())
        self.assertEqual(validate_offer(parsed), 40001)
        self.assertEqual(parsed.punch_candidate.endpoint, ("10.0.0.5", 40001))
        self.assertEqual([c.endpoint for c in parsed.other_family("so")], [("2001:db8::5", 40002)])
        # IPv6 ranks first (RFC 8305).
        self.assertEqual(max(parsed.candidates, key=lambda c: c.priority).ip, "2001:db8::5")

    def test_one_punch_candidate_per_family(self) -> None:
        offer = build_offer("alice", "10.0.0.5", 40001, None, ipv6_punch=("2001:db8::5", 40002))
        doubled = offer.with_candidates([offer.candidates[0]])
        self.assertRaises(SDPError, validate_offer, parse_sdp(doubled.to_bytes()))
        # Signaling over IPv6 alone: the IPv6 candidate is the punch port itself.
        v6 = parse_sdp(build_offer("alice", "2001:db8::5", 40001, None).to_bytes())
        self.assertEqual(validate_offer(v6), 40001)
        self.assertEqual(v6.other_family("so"), [])

    def test_server_adds_no_ipv4_srflx_for_an_ipv6_listener(self) -> None:
        offer = build_offer("alice", "10.0.0.5", 40001, 7000, ipv6_punch=("2001:db8::5", 40002))
        offer = offer.with_candidates([Candidate("7", 1, "TCP", 100, "2001:db8::5", 7001, "host", "passive")])
        nat = NATDescription(True, "endpoint-independent", "preserving", 0, "203.0.113.5")
        out = augmented(parse_sdp(offer.to_bytes()), Prediction("203.0.113.5", (40001,), 0.9, nat), "203.0.113.5")
        self.assertEqual([(c.ip, c.rport) for c in out.of_type("srflx")], [("203.0.113.5", 7000)])


def _setup(remote: Any, role: str = "initiator") -> CallSetup:
    return CallSetup("c1@x", SECRET, role, "198.51.100.9", remote)


class FamilyStaggerTests(unittest.TestCase):
    """RFC 8305: the IPv6 punch at the dial moment, the IPv4 techniques FAMILY_STAGGER later."""

    def setUp(self) -> None:
        self.plans: list[PunchPlan] = []
        self.factories: list[Any] = []
        self.attempts: list[defer.Deferred[Any]] = []
        self.ipv4_sockets: list[str] = []  # every IPv4 attempt that would open a socket

        def fake_punch(reactor: Any, plan: PunchPlan, factory: Any) -> defer.Deferred[Any]:
            self.plans.append(plan)
            self.factories.append(factory)
            if ":" not in plan.local[0]:
                self.ipv4_sockets.append("punch")
            d: defer.Deferred[Any] = defer.Deferred()
            self.attempts.append(d)
            return d

        def fake_socket(name: str) -> Any:
            def opened(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
                self.ipv4_sockets.append(name)
                return defer.Deferred()
            return opened

        self.patch(race, "punch", fake_punch)
        self.patch(race, "connect_from", fake_socket("connect"))
        self.patch(birthday, "birthday", fake_socket("birthday"))
        self.clock = Clock()
        remote = build_offer("bob", "198.51.100.9", 40001, None, ipv6_punch=("2001:db8::9", 40009))  # a public IPv4 peer: its punch is dialed (wire/candidates.py)
        self.dialer = Dialer(self.clock, _setup(remote), Factory.forProtocol(Protocol), local_ip="10.0.0.5",
                             punch_port=40000, own_public_ip="203.0.113.7",
                             config=DialerConfig(deadline=5.0, low_ttl=None), ipv6_punch=("2001:db8::5", 40005))

    def test_ipv6_first_then_ipv4_after_the_stagger(self) -> None:
        self.dialer.start(0.05).addErrback(lambda f: None)
        self.clock.advance(0.05)
        self.assertEqual([p.local for p in self.plans], [("2001:db8::5", 40005)])
        self.assertEqual(self.plans[0].candidates, (("2001:db8::9", 40009),))
        self.clock.advance(race.FAMILY_STAGGER - 0.01)
        self.assertEqual(len(self.plans), 1)
        self.assertEqual(self.ipv4_sockets, [])
        self.clock.advance(0.01)
        self.assertEqual([p.local for p in self.plans], [("2001:db8::5", 40005), ("10.0.0.5", 40000)])
        self.assertEqual(self.ipv4_sockets, ["punch"])
        self.dialer.stop("done")

    def test_an_ipv6_win_before_the_stagger_starts_no_ipv4(self) -> None:
        result = self.dialer.start(0.0)
        self.clock.advance(0)
        self.attempts[0].callback(race.PunchResult("app", ("2001:db8::9", 40009), "simultaneous-open", 1, 0.01))
        won = self.successResultOf(result)
        self.assertEqual((won.technique, won.remote), ("ipv6", ("2001:db8::9", 40009)))
        self.clock.advance(1)
        self.assertEqual(len(self.plans), 1)
        self.assertEqual(self.ipv4_sockets, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_early_ipv6_failure_still_waits_for_ipv4(self) -> None:
        result = self.dialer.start(0.0)
        self.clock.advance(0)
        self.attempts[0].errback(race.PunchFailed("firewall rejected"))
        self.assertNoResult(result)
        self.clock.advance(race.FAMILY_STAGGER)
        self.assertEqual(len(self.plans), 2)
        self.dialer.stop("done")
        self.failureResultOf(result)

    def ipv6_connected(self) -> tuple[Any, StringTransport]:
        """The IPv6 punch's TCP connection is up: its handshake starts (we are the initiator)."""
        protocol = self.factories[0].buildProtocol(IPv6Address("TCP", "2001:db8::9", 40009))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"KJ1 HELLO "))
        return protocol, transport

    def peer_answers(self, protocol: Any, transport: StringTransport) -> None:
        """The peer's side of the handshake, as the real responder runs it."""
        setup = self.dialer.setup
        peer = HandshakeFactory(setup.secret, setup.handshake_id, "responder", Factory.forProtocol(Protocol),
                                self.clock).buildProtocol(IPv6Address("TCP", "2001:db8::5", 40005))
        back = StringTransport()
        peer.makeConnection(back)
        hello = transport.value()
        transport.clear()
        peer.dataReceived(hello)
        protocol.dataReceived(back.value())
        peer.dataReceived(transport.value())
        self.successResultOf(peer.handshake_done)
        self.successResultOf(protocol.handshake_done)

    def test_an_ipv6_connection_in_handshake_at_the_stagger_opens_no_ipv4_socket(self) -> None:
        """Two peers 80 ms apart: the IPv6 TCP connection is up at 80 ms, verified at 160 (NAT lab)."""
        result = self.dialer.start(0.0)
        self.clock.advance(0)
        self.clock.advance(0.08)
        protocol, transport = self.ipv6_connected()
        self.clock.advance(race.FAMILY_STAGGER)
        self.assertEqual(self.ipv4_sockets, [])
        self.assertEqual(self.dialer._family.phase(), "holding")
        self.peer_answers(protocol, transport)
        # The punch wins with the verified connection.
        self.attempts[0].callback(race.PunchResult(protocol, ("2001:db8::9", 40009), "simultaneous-open", 1, 0.16))
        self.assertEqual(self.successResultOf(result).technique, "ipv6")
        self.clock.advance(family.FAMILY_HOLD + 10)
        self.assertEqual(self.ipv4_sockets, [])
        self.assertEqual(len(self.plans), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_connection_ready_with_the_stagger_is_seen_before_it(self) -> None:
        """A busy reactor runs the due stagger before it reads the IPv6 connect that
        completed just before it: the verdict waits a turn, so the connection holds IPv4."""
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        connected: list[Any] = []
        self.clock.callLater(race.FAMILY_STAGGER, lambda: connected.append(self.ipv6_connected()))
        self.clock.advance(race.FAMILY_STAGGER)
        self.assertEqual(len(connected), 1)
        self.assertEqual(self.ipv4_sockets, [])
        self.assertEqual(self.dialer._family.phase(), "holding")
        self.dialer.stop("done")

    def test_a_failed_ipv6_handshake_starts_ipv4_at_once(self) -> None:
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(0.08)
        protocol, _ = self.ipv6_connected()
        self.clock.advance(race.FAMILY_STAGGER)
        self.assertEqual(self.ipv4_sockets, [])
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.ipv4_sockets, ["punch"])
        self.assertEqual(self.plans[1].local, ("10.0.0.5", 40000))
        self.dialer.stop("done")

    def test_a_failed_handshake_before_the_stagger_waits_for_it(self) -> None:
        """IPv4 starts at the stagger on both sides, so that its SYNs cross."""
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(0.05)
        protocol, _ = self.ipv6_connected()
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.ipv4_sockets, [])
        self.clock.advance(race.FAMILY_STAGGER - 0.05)
        self.assertEqual(self.ipv4_sockets, ["punch"])
        self.dialer.stop("done")

    def test_the_ipv6_punch_giving_up_releases_a_held_ipv4(self) -> None:
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(0.08)
        self.ipv6_connected()
        self.clock.advance(race.FAMILY_STAGGER)
        self.attempts[0].errback(race.PunchFailed("cannot listen"))
        self.assertEqual(self.ipv4_sockets, ["punch"])
        self.dialer.stop("done")

    def test_a_race_stopped_while_holding_starts_no_ipv4(self) -> None:
        """The stop drops the IPv6 connection; its failed handshake must not start IPv4 after the end."""
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(0.08)
        protocol, _ = self.ipv6_connected()
        self.clock.advance(race.FAMILY_STAGGER)
        self.dialer.stop("cancelled")
        protocol.connectionLost(Failure(error.ConnectionAborted()))
        self.clock.advance(family.FAMILY_HOLD)
        self.assertEqual(self.ipv4_sockets, [])

    def test_the_hold_is_bounded(self) -> None:
        """A handshake that neither passes nor fails holds IPv4 for FAMILY_HOLD, not its 5 s timeout."""
        self.dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.clock.advance(0.08)
        self.ipv6_connected()
        self.clock.advance(race.FAMILY_STAGGER)
        self.clock.advance(family.FAMILY_HOLD - 0.01)
        self.assertEqual(self.ipv4_sockets, [])
        self.clock.advance(0.01)
        self.assertEqual(self.ipv4_sockets, ["punch"])
        self.dialer.stop("done")

    def test_no_ipv6_no_stagger(self) -> None:
        remote = build_offer("bob", "198.51.100.9", 40001, None)
        dialer = Dialer(self.clock, _setup(remote), Factory.forProtocol(Protocol), local_ip="10.0.0.5",
                        punch_port=40000, own_public_ip="203.0.113.7",
                        config=DialerConfig(deadline=5.0, low_ttl=None), ipv6_punch=("2001:db8::5", 40005))
        dialer.start(0.0).addErrback(lambda f: None)
        self.clock.advance(0)
        self.assertEqual([p.local for p in self.plans], [("10.0.0.5", 40000)])
        dialer.stop("done")


class IPv6PunchTests(unittest.TestCase):
    """Two dialers on ::1 meet by the IPv6 punch; their IPv4 candidates lead nowhere."""

    def setUp(self) -> None:
        if not HAS_V6:
            raise unittest.SkipTest(NO_V6)

    @defer.inlineCallbacks
    def test_two_dialers_meet_over_ipv6(self):  # type: ignore[no-untyped-def]
        holders = [reusable_socket(("::1", 0)) for _ in range(2)]
        dead = reusable_socket(("127.0.0.1", 0))  # bound, never listening: IPv4 is refused
        for s in [*holders, dead]:
            self.addCleanup(s.close)
        v6 = [h.getsockname()[:2] for h in holders]
        dead_port = dead.getsockname()[1]
        dialers = []
        for me, role in ((0, "initiator"), (1, "responder")):
            remote = build_offer("peer", "127.0.0.1", dead_port, None, ipv6_punch=v6[1 - me])
            dialers.append(Dialer(
                reactor, _setup(parse_sdp(remote.to_bytes()), role), Factory.forProtocol(Protocol),
                local_ip="127.0.0.1", punch_port=0, own_public_ip="203.0.113.7",
                config=DialerConfig(deadline=3.0, low_ttl=None, handshake_timeout=3.0), ipv6_punch=v6[me]))
        for holder in holders:
            holder.close()  # the punch binds the same ports itself (SO_REUSEADDR)
        results = yield defer.gatherResults([d.start(0.0) for d in dialers])
        for me, result in enumerate(results):
            self.assertEqual(result.technique, "ipv6")
            self.assertEqual(result.remote[0], "::1")
            self.assertEqual(result.remote, ("::1", v6[1 - me][1]))
            result.protocol.transport.loseConnection()


class NoRefusalOverIPv6Tests(unittest.SynchronousTestCase):
    """A random NAT facing a sequential one is 488 over IPv4 alone; an IPv6 punch port lets the call go."""

    from tests.test_lanes import CallManagerLaneTests as _Lanes

    setUp = _Lanes.setUp
    invites_to = _Lanes.invites_to

    def test_a_caller_with_ipv6_is_not_refused(self) -> None:
        from tests.test_calls import invite_request

        body = build_offer("d1", "10.0.0.5", 40001, 7000, ipv6_punch=("2001:db8:4::11", 40002)).to_bytes()
        self.manager.handle_request(self.conns["d1"], invite_request("d1", "b1", "c6", body=body))
        self.clock.advance(0.3)
        self.assertNotIn(488, [getattr(m, "code", None) for m in self.conns["d1"].sent])
        [forwarded] = self.invites_to("b1")
        self.assertEqual([c.endpoint for c in parse_sdp(forwarded.body).other_family("so")],
                         [("2001:db8:4::11", 40002)])
