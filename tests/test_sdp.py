"""The SDP subset: parse, write, bounds, offer rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire.sdp import (
    MAX_CANDIDATES,
    Candidate,
    SDPError,
    SessionDescription,
    candidate_priority,
    parse_sdp,
    validate_offer,
)

EXAMPLE = (
    b"v=0\r\n"
    b"o=alice 0 0 IN IP4 10.0.0.5\r\n"
    b"s=kerjostunt\r\n"
    b"c=IN IP4 10.0.0.5\r\n"
    b"t=0 0\r\n"
    b"m=application 40001 TCP kerjo\r\n"
    b"a=candidate:1 1 TCP 2128609279 10.0.0.5 40001 typ host tcptype so\r\n"
    b"a=candidate:2 1 TCP 2124414975 10.0.0.5 7000 typ host tcptype passive\r\n"
    b"a=x-kerjo-punch-port:40001\r\n"
)

PRFLX = "a=candidate:p1 1 TCP 1862270975 203.0.113.7 40003 typ prflx raddr 10.0.0.5 rport 40001 tcptype so"


class ParseTests(SynchronousTestCase):
    def test_protocol_example(self) -> None:
        sd = parse_sdp(EXAMPLE)
        self.assertEqual(sd.user, "alice")
        self.assertEqual(sd.host_ip, "10.0.0.5")
        self.assertEqual(sd.punch_port, 40001)
        self.assertEqual(
            sd.candidates,
            [Candidate("1", 1, "TCP", 2128609279, "10.0.0.5", 40001, "host", "so"),
             Candidate("2", 1, "TCP", 2124414975, "10.0.0.5", 7000, "host", "passive")],
        )
        self.assertEqual(validate_offer(sd), 40001)

    def test_round_trip_is_byte_exact(self) -> None:
        self.assertEqual(parse_sdp(EXAMPLE).to_bytes(), EXAMPLE)

    def test_prflx_line(self) -> None:
        c = parse_sdp(EXAMPLE + PRFLX.encode() + b"\r\n").candidates[-1]
        self.assertEqual((c.typ, c.raddr, c.rport, c.tcptype, c.endpoint),
                         ("prflx", "10.0.0.5", 40001, "so", ("203.0.113.7", 40003)))
        self.assertEqual(c.to_line(), PRFLX)

    def test_priorities_match_the_examples(self) -> None:
        self.assertEqual(candidate_priority("host", "so"), 2128609279)
        self.assertEqual(candidate_priority("host", "passive"), 2124414975)
        self.assertEqual(candidate_priority("prflx", "so"), 1860173823)

    def test_lf_only_and_unknown_lines(self) -> None:
        body = EXAMPLE.replace(b"\r\n", b"\n") + b"a=sendrecv\nb=AS:64\n"
        self.assertEqual(len(parse_sdp(body).candidates), 2)

    def test_ipv6(self) -> None:
        sd = SessionDescription("bob", "2001:db8::1",
                                [Candidate("1", 1, "TCP", 5, "2001:db8::1", 4000, "host", "so")], 4000)
        again = parse_sdp(sd.to_bytes())
        self.assertEqual(again, sd)

    def test_addresses_checked_every_time(self) -> None:
        """Parsed addresses are remembered; a bad one is refused however often it comes."""
        for _ in range(3):
            self.assertEqual(parse_sdp(EXAMPLE).host_ip, "10.0.0.5")
            for bad in (b"10.0.0.05", b"10.0.0.256", b"10.0.0.5 ", b"::g"):
                with self.assertRaises(SDPError):
                    parse_sdp(EXAMPLE.replace(b"o=alice 0 0 IN IP4 10.0.0.5", b"o=alice 0 0 IN IP4 " + bad))
        # Normalized as before: IPv6 in its compressed form.
        ipv6 = EXAMPLE.replace(b"IN IP4 10.0.0.5\r\ns=", b"IN IP6 2001:DB8:0::1\r\ns=")
        self.assertEqual(parse_sdp(ipv6).host_ip, "2001:db8::1")

    def test_no_punch_port(self) -> None:
        sd = parse_sdp(EXAMPLE.replace(b"a=x-kerjo-punch-port:40001\r\n", b""))
        self.assertIsNone(sd.punch_port)
        self.assertRaises(SDPError, validate_offer, sd)

    def test_bad_bodies(self) -> None:
        bad = [
            b"",
            b"hello",
            b"v=1\r\n",
            b"\xff\xfe",
            EXAMPLE.replace(b"o=alice 0 0 IN IP4 10.0.0.5\r\n", b""),
            EXAMPLE.replace(b"10.0.0.5 40001 typ", b"10.0.0.5 70000 typ"),
            EXAMPLE.replace(b"10.0.0.5 40001 typ", b"10.0.0.x 40001 typ"),
            EXAMPLE.replace(b" TCP 2128609279", b" UDP 2128609279"),
            EXAMPLE.replace(b"typ host tcptype so", b"typ bogus tcptype so"),
            EXAMPLE.replace(b"tcptype so", b"tcptype sideways"),
            EXAMPLE.replace(b"tcptype so", b"tcptype"),
            EXAMPLE.replace(b"x-kerjo-punch-port:40001", b"x-kerjo-punch-port:0"),
            EXAMPLE + b"a=x-kerjo-punch-port:40001\r\n",
            EXAMPLE + b"junk\r\n",
            EXAMPLE + b"a=candidate:3 1 TCP 1 10.0.0.5 5 typ host raddr 1.2.3.4\r\n",
            EXAMPLE + b"a=x\x00\r\n",
            EXAMPLE + b"a=" + b"x" * (32 * 1024) + b"\r\n",
        ]
        for body in bad:
            with self.subTest(body=body[:60]):
                self.assertRaises(SDPError, parse_sdp, body)

    def test_candidate_limit(self) -> None:
        line = b"a=candidate:9 1 TCP 1 10.0.0.5 5000 typ host tcptype passive\r\n"
        parse_sdp(EXAMPLE + line * (MAX_CANDIDATES - 2))
        self.assertRaises(SDPError, parse_sdp, EXAMPLE + line * (MAX_CANDIDATES - 1))

    def test_offer_rules(self) -> None:
        bad = [
            EXAMPLE + PRFLX.encode() + b"\r\n",
            EXAMPLE.replace(b"tcptype so", b"tcptype passive"),
            EXAMPLE + b"a=candidate:3 1 TCP 1 10.0.0.5 5 typ host tcptype so\r\n",
            EXAMPLE.replace(b"x-kerjo-punch-port:40001", b"x-kerjo-punch-port:40002"),
            EXAMPLE.replace(b"tcptype passive", b"tcptype active"),
        ]
        for body in bad:
            with self.subTest(body=body[-80:]):
                self.assertRaises(SDPError, validate_offer, parse_sdp(body))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=600))
    def test_garbage_only_raises_sdp_error(self, tail: bytes) -> None:
        try:
            parse_sdp(EXAMPLE + tail)
        except SDPError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(st.integers(1, 65535), st.sampled_from(["so", "passive", "active", None]),
                              st.sampled_from(["host", "srflx", "prflx"])), max_size=MAX_CANDIDATES),
           st.one_of(st.none(), st.integers(1, 65535)))
    def test_round_trip(self, specs: list, punch: int | None) -> None:
        cands = [Candidate(f"f{i}", 1, "TCP", candidate_priority(typ, tt), "192.0.2.1", port, typ, tt,
                           *(("10.0.0.1", 5) if typ != "host" else ()))
                 for i, (port, tt, typ) in enumerate(specs)]
        sd = SessionDescription("u1", "10.0.0.1", cands, punch)
        self.assertEqual(parse_sdp(sd.to_bytes()), sd)
