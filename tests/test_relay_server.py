"""The server's side of the opt-in relay (server/relay.py): options, who may relay, when, the credentials.

A pair whose NATs no technique joins gets ``X-Kerjo-Relay`` on both legs
instead of the 488, when a relay is configured and both may use it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from kerjostunt.server.relay import RelayGate, RelaySettings, parse_relay_url
from kerjostunt.server.tap import Options
from kerjostunt.wire import kerjo
from kerjostunt.wire.sdp import SDPError, parse_sdp, validate_offer
from tests import test_lanes


def _secret_file(case: unittest.TestCase, text: bytes = b"s3cret\n") -> str:
    fd, path = tempfile.mkstemp()
    os.write(fd, text)
    os.close(fd)
    case.addCleanup(os.unlink, path)
    return path


class RelayOptionTests(unittest.TestCase):
    def test_urls(self) -> None:
        self.assertEqual(parse_relay_url("turn:198.51.100.1"), ("198.51.100.1", 3478))
        self.assertEqual(parse_relay_url("turn:198.51.100.1:3479"), ("198.51.100.1", 3479))
        self.assertEqual(parse_relay_url("turn:198.51.100.1:3479?transport=tcp"), ("198.51.100.1", 3479))
        self.assertEqual(parse_relay_url("turn:[2001:db8::1]"), ("2001:db8::1", 3478))
        self.assertEqual(parse_relay_url("turn:[2001:db8::1]:5349"), ("2001:db8::1", 5349))
        for bad in ("stun:1.2.3.4", "turn:relay.example", "turn:1.2.3.4?transport=udp", "turn:1.2.3.4:99999"):
            with self.assertRaises(ValueError, msg=bad):
                parse_relay_url(bad)

    def test_no_relay_without_the_options(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options.settings().relay)

    def test_options(self) -> None:
        options = Options()
        options.parseOptions(["--relay", "turn:198.51.100.1", "--relay", "turn:198.51.100.2:3479",
                              "--relay-secret-file", _secret_file(self), "--relay-lifetime", "120",
                              "--relay-group", "staff", "--relay-user", "alice"])
        relay = options.settings().relay
        assert relay is not None
        self.assertEqual(relay.servers, (("198.51.100.1", 3478), ("198.51.100.2", 3479)))
        self.assertEqual(relay.secret, b"s3cret")
        self.assertEqual(relay.lifetime, 120)
        self.assertEqual(relay.groups, frozenset({"staff"}))
        self.assertEqual(relay.users, frozenset({"alice"}))

    def test_relay_needs_its_secret_and_the_secret_a_relay(self) -> None:
        for argv in (["--relay", "turn:198.51.100.1"], ["--relay-secret-file", _secret_file(self)],
                     ["--relay", "turn:198.51.100.1", "--relay-secret-file", _secret_file(self, b"\n")],
                     ["--relay", "turn:nowhere.example", "--relay-secret-file", _secret_file(self)]):
            with self.assertRaises(usage.UsageError, msg=argv):
                Options().parseOptions(argv)


class RelayGateTests(unittest.SynchronousTestCase):
    def gate(self, **kw: Any) -> RelayGate:
        settings = RelaySettings(servers=(("198.51.100.1", 3478),), secret=b"k", lifetime=600, **kw)
        groups = {"alice": ["staff"], "bob": ["guests"], "carol": ["staff"]}
        return RelayGate(settings, lambda: 1000.0, lambda u: defer.succeed(groups.get(u, [])))

    def test_when(self) -> None:
        gate = self.gate()
        self.assertEqual(gate.when("both NATs random", 0), kerjo.RELAY_NOW)
        self.assertEqual(gate.when("", 1), kerjo.RELAY_FALLBACK)
        self.assertIsNone(gate.when("", 0))
        self.assertIsNone(self.gate(fallback=False).when("", 3))

    def test_credentials_follow_the_turn_rest_api(self) -> None:
        offer = self.gate().offer("alice", kerjo.RELAY_NOW)
        self.assertEqual(offer.username, "1600:alice")
        mac = hmac.new(b"k", b"1600:alice", hashlib.sha1).digest()
        self.assertEqual(offer.password, base64.b64encode(mac).decode())
        self.assertEqual(kerjo.parse_relay_offer(offer.value()), offer)

    def test_who_may_relay(self) -> None:
        self.assertTrue(self.successResultOf(self.gate().allowed(["alice", "bob"])))
        self.assertFalse(self.successResultOf(self.gate(users=frozenset({"alice"})).allowed(["alice", "bob"])))
        self.assertTrue(self.successResultOf(self.gate(groups=frozenset({"staff"})).allowed(["alice", "carol"])))
        self.assertFalse(self.successResultOf(self.gate(groups=frozenset({"staff"})).allowed(["alice", "bob"])))
        both = self.gate(groups=frozenset({"staff"}), users=frozenset({"bob"}))
        self.assertTrue(self.successResultOf(both.allowed(["alice", "bob"])))

    def test_a_store_failure_means_no_relay(self) -> None:
        settings = RelaySettings(servers=(("198.51.100.1", 3478),), secret=b"k", groups=frozenset({"x"}))
        gate = RelayGate(settings, lambda: 0.0, lambda u: defer.fail(RuntimeError("db down")))
        self.assertEqual(self.successResultOf(gate.decide("a", "b", "both NATs random", 0)), {})
        self.flushLoggedErrors(defer.FirstError)


class RelayOfferWireTests(unittest.TestCase):
    def test_bad_offers(self) -> None:
        self.assertIsNone(kerjo.parse_relay_offer(None))
        for bad in ("servers=; username=a; password=b", "servers=1.2.3.4:3478; username=; password=b",
                    "servers=1.2.3.4:3478; username=a; password=b; when=later",
                    "servers=relay:3478; username=a; password=b",
                    "servers=1.2.3.4:3478; username=a b; password=c"):
            with self.assertRaises(ValueError, msg=bad):
                kerjo.parse_relay_offer(bad)

    def test_clients_may_offer_relay_candidates(self) -> None:
        body = (b"v=0\r\no=bob 0 0 IN IP4 10.0.0.2\r\ns=kerjostunt\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n"
                b"m=application 40001 TCP kerjo\r\n"
                b"a=candidate:1 1 TCP 2128609279 10.0.0.2 40001 typ host tcptype so\r\n"
                b"a=candidate:r1 1 TCP 16777215 198.51.100.1 40123 typ relay raddr 198.18.1.2 rport 5000"
                b" tcptype passive\r\n"
                b"a=x-kerjo-punch-port:40001\r\n")
        self.assertEqual(validate_offer(parse_sdp(body)), 40001)
        with self.assertRaises(SDPError):
            validate_offer(parse_sdp(body.replace(b"typ relay raddr 198.18.1.2 rport 5000 tcptype passive",
                                                  b"typ relay tcptype so")))


class RelayCallTests(unittest.SynchronousTestCase):
    """The lane tests' call table (two sequential-NAT hosts, preserving ones, a random one), with a relay."""

    def setUp(self) -> None:
        self.table = test_lanes.CallManagerLaneTests("test_calls_through_one_sequential_nat_take_turns")
        self.table.setUp()
        self.manager, self.conns, self.store = self.table.manager, self.table.conns, self.table.store
        self.set_relay()

    def set_relay(self, **kw: Any) -> None:
        settings = RelaySettings(servers=(("198.51.100.1", 3478),), secret=b"k", **kw)
        self.manager.relay = RelayGate(settings, self.table.clock.seconds, lambda u: defer.succeed([]))

    def test_random_facing_sequential_gets_the_relay_instead_of_488(self) -> None:
        self.table.invite("d1", "b1", "c3")
        self.assertNotIn(488, [getattr(m, "code", None) for m in self.conns["d1"].sent])
        [forwarded] = self.table.invites_to("b1")  # at once: no NAT lane for a relayed call
        offer = kerjo.parse_relay_offer(forwarded.headers.get(kerjo.RELAY))
        assert offer is not None
        self.assertEqual(offer.when, kerjo.RELAY_NOW)
        self.assertEqual(offer.servers, (("198.51.100.1", 3478),))
        self.assertTrue(offer.username.endswith(":b1"), offer.username)
        self.assertEqual(self.store.attempts, [])

    def test_the_caller_gets_its_own_credential_in_the_200(self) -> None:
        from tests.test_calls import answer

        self.table.invite("d1", "b1", "c3")
        [forwarded] = self.table.invites_to("b1")
        self.manager.handle_response(self.conns["b1"], answer(forwarded, punch=50001))
        ok = [m for m in self.conns["d1"].sent if getattr(m, "code", None) == 200][-1]
        offer = kerjo.parse_relay_offer(ok.headers.get(kerjo.RELAY))
        assert offer is not None
        self.assertTrue(offer.username.endswith(":d1"), offer.username)

    def test_pairs_that_can_punch_get_no_relay(self) -> None:
        self.table.invite("a1", "b1", "c1")
        self.table.clock.advance(0.3)
        [forwarded] = self.table.invites_to("b1")
        self.assertIsNone(forwarded.headers.get(kerjo.RELAY))

    def test_a_pair_whose_calls_failed_gets_the_relay_as_a_fallback(self) -> None:
        self.manager.pairs.recorded("a1", "b1", False, {"a1": "198.18.1.2", "b1": "198.18.2.2"})
        self.table.invite("a1", "b1", "c1")
        self.table.clock.advance(0.3)
        [forwarded] = self.table.invites_to("b1")
        offer = kerjo.parse_relay_offer(forwarded.headers.get(kerjo.RELAY))
        assert offer is not None
        self.assertEqual(offer.when, kerjo.RELAY_FALLBACK)

    def test_no_fallback_when_the_operator_says_so(self) -> None:
        self.set_relay(fallback=False)
        self.manager.pairs.recorded("a1", "b1", False, {"a1": "198.18.1.2", "b1": "198.18.2.2"})
        self.table.invite("a1", "b1", "c1")
        self.table.clock.advance(0.3)
        [forwarded] = self.table.invites_to("b1")
        self.assertIsNone(forwarded.headers.get(kerjo.RELAY))

    def test_a_user_who_may_not_relay_gets_the_488(self) -> None:
        self.set_relay(users=frozenset({"b1"}))
        self.table.invite("d1", "b1", "c3")
        self.assertEqual(self.conns["d1"].sent[-1].code, 488)


class RelayFlagTests(unittest.TestCase):
    def test_the_trusted_peers_list_shows_a_relayed_pair_as_relay(self) -> None:
        from kerjostunt.store.records import PairOutcome, RecentAttempt, next_states, pair_flag

        self.assertEqual(pair_flag("unknown", PairOutcome("relay", 0)), "relay")
        self.assertEqual(pair_flag("unreachable", PairOutcome("relay", 0)), "relay")
        self.assertEqual(pair_flag("stunt", PairOutcome("failed", 3)), "unreachable")
        # A relayed call changes no user's flag, and keeps the callee from "unreachable".
        recent = [RecentAttempt("relay", "d1", True), RecentAttempt("failed", "d2", True)]
        self.assertEqual(next_states("relay", "stunt", "unknown", recent), ("stunt", "unknown"))
