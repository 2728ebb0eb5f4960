"""kerjostunt.wire.kerjo: each of our own wire elements survives format then parse."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire import kerjo
from kerjostunt.wire.prediction import NATDescription

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoints = st.tuples(st.one_of(ipv4, ipv6), st.integers(1, 65535))


class EndpointTests(SynchronousTestCase):
    @given(endpoints)
    def test_round_trip(self, endpoint: tuple[str, int]) -> None:
        self.assertEqual(kerjo.parse_endpoint(kerjo.format_endpoint(endpoint)), endpoint)

    def test_refuses_names_and_bad_ports(self) -> None:
        for text in ("example.org:80", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4", "[::1]80", "::1:80x"):
            self.assertRaises(ValueError, kerjo.parse_endpoint, text)


class OutcomeTests(SynchronousTestCase):
    @given(st.sampled_from(["direct", "stunt"]), st.sampled_from(kerjo.TECHNIQUES), endpoints,
           st.none() | st.integers(0, 3_600_000))
    def test_connected_round_trip(self, outcome: str, technique: str, remote: tuple[str, int],
                                  elapsed: int | None) -> None:
        value = kerjo.Outcome(outcome, technique, remote, elapsed)
        self.assertEqual(kerjo.parse_outcome(value.to_bytes()), value)

    def test_failed_drops_the_remote(self) -> None:
        body = kerjo.Outcome("failed", "none", ("1.2.3.4", 5), 7).to_bytes()
        self.assertEqual(body, b"outcome=failed\ntechnique=none\nelapsed_ms=7\n")
        self.assertFalse(kerjo.parse_outcome(body).success)

    def test_strict(self) -> None:
        for body in (b"outcome=maybe\ntechnique=none\n", b"outcome=failed\noutcome=failed\ntechnique=none\n",
                     b"outcome=direct\ntechnique=lan\n", b"x" * 2000, b"outcome=failed\ntechnique=none\nfoo=1\n",
                     b"\xff"):
            self.assertRaises(kerjo.OutcomeError, kerjo.parse_outcome, body)


class NATTests(SynchronousTestCase):
    @given(st.sampled_from(["endpoint-independent", "address-dependent", "address-and-port-dependent"]),
           st.sampled_from(["preserving", "sequential", "random"]), st.none() | st.integers(-100, 100))
    def test_round_trip(self, mapping: str, allocation: str, delta: int | None) -> None:
        nat = NATDescription(behind_nat=True, mapping=mapping, allocation=allocation, delta=delta, public_ip=None)
        self.assertEqual(kerjo.parse_nat(kerjo.format_nat(nat, 0.5)), nat)

    def test_unreadable_is_none(self) -> None:
        self.assertIsNone(kerjo.parse_nat(None))
        self.assertIsNone(kerjo.parse_nat("garbage"))


class DialInTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(kerjo.parse_dial_in(kerjo.format_dial_in(130)), 0.13)
        for odd in (None, "", "-5", "soon", "nan"):
            self.assertEqual(kerjo.parse_dial_in(odd), 0.0)
        self.assertEqual(kerjo.parse_dial_in("9999999"), kerjo.MAX_DIAL_IN)


class CallHeaderTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        headers = kerjo.CallHeaders(b"\x01" * 32, kerjo.Role.RESPONDER, "mapping=x", "198.51.100.9")
        self.assertEqual(kerjo.parse_call_headers(dict(headers.items()).get), headers)

    def test_refuses_short_secret_and_bad_role(self) -> None:
        good = dict(kerjo.CallHeaders(b"\x01" * 32, kerjo.Role.INITIATOR, None, None).items())
        for bad in ({kerjo.CALL_SECRET: "abcd"}, {kerjo.CALL_SECRET: "zz"}, {kerjo.ROLE: "boss"}, {kerjo.ROLE: ""}):
            self.assertRaises(ValueError, kerjo.parse_call_headers, {**good, **bad}.get)


class ProbeOfferTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        offer = kerjo.ProbeOffer("tok", "pw", (3478, 3479), 300, "192.0.2.7")
        headers = dict(offer.items())
        self.assertEqual(kerjo.parse_probe_offer(headers[kerjo.PROBE], headers.get(kerjo.PROBE_ALT_IP)), offer)

    def test_missing_field(self) -> None:
        self.assertRaises(ValueError, kerjo.parse_probe_offer, "token=a; ports=1", None)
        self.assertRaises(ValueError, kerjo.parse_probe_offer, "token=a; password=b; ports=x", None)


class TagTests(SynchronousTestCase):
    def test_fresh_and_shaped(self) -> None:
        self.assertNotEqual(kerjo.new_tag(), kerjo.new_tag())
        self.assertTrue(kerjo.new_branch().startswith("z9hG4bK"))


class TriedTests(SynchronousTestCase):
    """The outcome's ``tried=``: each technique of the race and its result, in order (issue 14)."""

    @given(st.lists(st.tuples(st.sampled_from(kerjo.TRIED_TECHNIQUES), st.sampled_from(kerjo.TRIED_RESULTS)),
                    max_size=kerjo.MAX_TRIED))
    def test_round_trip(self, tried: list[tuple[str, str]]) -> None:
        outcome = kerjo.Outcome("failed", "none", None, 10, tuple(tried))
        self.assertEqual(kerjo.parse_outcome(outcome.to_bytes()), outcome)

    def test_refused(self) -> None:
        base = b"outcome=failed\ntechnique=none\n"
        for bad in (b"tried=carrier-pigeon:connected\n", b"tried=punch:maybe\n", b"tried=punch\n", b"tried=\n",
                    b"tried=punch:timeout,\n", b"tried=" + b",".join([b"punch:timeout"] * 13) + b"\n"):
            self.assertRaises(kerjo.OutcomeError, kerjo.parse_outcome, base + bad)
        self.assertRaises(kerjo.OutcomeError, kerjo.parse_outcome,
                          base + b"tried=punch:timeout\ntried=lan:refused\n")
