"""Structured header values: URIs, name-addr, Via, CSeq, auth, Expires."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire.sip.headers import (
    URI,
    NameAddr,
    Via,
    format_auth,
    parse_auth,
    parse_cseq,
    parse_expires,
    parse_name_addr,
    parse_uri,
    parse_via,
)


class URITests(SynchronousTestCase):
    def test_full(self):
        u = parse_uri("SIPS:alice:pw@kerjo.local:5061;transport=tls;lr?subject=x")
        self.assertEqual(u, URI("sips", "alice", "kerjo.local", 5061, {"transport": "tls", "lr": None}, "pw", "subject=x"))
        self.assertEqual(str(u), "sips:alice:pw@kerjo.local:5061;transport=tls;lr?subject=x")

    def test_minimal(self):
        u = parse_uri("sip:kerjo.local")
        self.assertEqual((u.scheme, u.user, u.host, u.port, u.params), ("sip", None, "kerjo.local", None, {}))
        self.assertEqual(str(u), "sip:kerjo.local")

    def test_ipv4_ipv6(self):
        self.assertEqual(parse_uri("sips:bob@192.0.2.1:6000").host, "192.0.2.1")
        u = parse_uri("sips:bob@[2001:db8::1]:5061")
        self.assertEqual((u.host, u.port), ("2001:db8::1", 5061))
        self.assertEqual(str(u), "sips:bob@[2001:db8::1]:5061")
        self.assertEqual(parse_uri("sip:[::1]").host, "::1")

    def test_round_trip_params_lowercased(self):
        self.assertEqual(str(parse_uri("sip:a@b;Transport=TLS")), "sip:a@b;transport=TLS")

    def test_bad(self):
        for text in ("tel:+123", "http://x", "sip:", "sips:bob@", "sips:@x", "sip:a@b:port", "sip:a@b:70000",
                     "sip:a@[1.2.3.4]", "sip:a@[::1", "sip:a@b c", "sip:a@b;x=\"q\"", "sip:a@b@c",
                     "sip:a@-bad", "sip:a<b@c", "sip:a@b;=x", "sip:a@b:\u0661"):
            self.assertRaises(ValueError, parse_uri, text)


class NameAddrTests(SynchronousTestCase):
    def test_forms(self):
        n = parse_name_addr('"Bob" <sips:bob@x>;tag=1')
        self.assertEqual((n.display, str(n.uri), n.params, n.tag), ("Bob", "sips:bob@x", {"tag": "1"}, "1"))
        n = parse_name_addr("<sips:bob@x;transport=tls>")
        self.assertEqual((n.display, n.uri.params, n.params, n.tag), (None, {"transport": "tls"}, {}, None))
        n = parse_name_addr("sips:bob@x;tag=1;expires=60")
        self.assertEqual((n.uri.params, n.params), ({}, {"tag": "1", "expires": "60"}))
        n = parse_name_addr("Bob  Smith <sips:bob@x>")
        self.assertEqual(n.display, "Bob Smith")

    def test_quoted_display_escapes(self):
        n = parse_name_addr(r'"A \"q\" \\ b" <sips:a@x>')
        self.assertEqual(n.display, 'A "q" \\ b')
        self.assertEqual(parse_name_addr(str(n)), n)

    def test_quoted_param_kept_raw(self):
        n = parse_name_addr('<sips:a@x>;+sip.instance="<urn:uuid:1>";expires=30')
        self.assertEqual(n.params["+sip.instance"], '"<urn:uuid:1>"')
        self.assertEqual(str(n), '<sips:a@x>;+sip.instance="<urn:uuid:1>";expires=30')

    def test_str(self):
        self.assertEqual(str(NameAddr(None, parse_uri("sips:a@x"), {"tag": "9"})), "<sips:a@x>;tag=9")
        self.assertEqual(str(NameAddr("A", parse_uri("sips:a@x"))), '"A" <sips:a@x>')

    def test_bad(self):
        for text in ('"unterminated <sips:a@x>', "<sips:a@x", "*", "", "Bob", '"B" sips:a@x',
                     "sips:a@x?h=1", "<sips:a@x>;tag=1;tag=2", "<sips:a@x>junk", "B@d <sips:a@x>",
                     "<sips:a@x>;tag=a b", "<sips:a@x>\r\nVia: x"):
            self.assertRaises(ValueError, parse_name_addr, text)


class ViaTests(SynchronousTestCase):
    def test_parse(self):
        v = parse_via("SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKabc;rport;received=1.2.3.4")
        self.assertEqual((v.transport, v.host, v.port), ("TLS", "10.0.0.2", 5061))
        self.assertEqual(v.branch, "z9hG4bKabc")
        self.assertEqual(v.params, {"branch": "z9hG4bKabc", "rport": None, "received": "1.2.3.4"})
        self.assertIsNone(v.rport)
        self.assertEqual(v.received, "1.2.3.4")
        self.assertEqual(str(v), "SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKabc;rport;received=1.2.3.4")

    def test_lws_and_case(self):
        v = parse_via("sip / 2.0 / tls   [2001:db8::2] ;rport=4000 ; branch=z9hG4bK1")
        self.assertEqual((v.transport, v.host, v.port, v.rport, v.branch), ("TLS", "2001:db8::2", None, 4000, "z9hG4bK1"))
        self.assertEqual(str(v), "SIP/2.0/TLS [2001:db8::2];rport=4000;branch=z9hG4bK1")

    def test_build(self):
        v = Via("TLS", "h", 1, {"branch": "z9hG4bK1"})
        v.params["received"] = "2001:db8::9"
        v.params["rport"] = "7000"
        self.assertEqual(str(v), "SIP/2.0/TLS h:1;branch=z9hG4bK1;received=2001:db8::9;rport=7000")
        self.assertEqual(parse_via(str(v)), v)

    def test_bad(self):
        for text in ("SIP/2.0/TLS", "SIP/3.0/TLS h", "TLS h", "SIP/2.0/TLS h:x", "SIP/2.0/TLS h;branch=a;branch=b",
                     'SIP/2.0/TLS h;received="1.2.3.4"', "SIP/2.0/TLS h extra", "", "SIP/2.0/TLS h;b=a\"b"):
            self.assertRaises(ValueError, parse_via, text)


class CSeqExpiresTests(SynchronousTestCase):
    def test_cseq(self):
        self.assertEqual(parse_cseq("1 REGISTER"), (1, "REGISTER"))
        self.assertEqual(parse_cseq("  2147483647\tINVITE "), (2**31 - 1, "INVITE"))
        for text in ("2147483648 INVITE", "-1 INVITE", "1", "1 INVITE x", "x INVITE", "1 IN@VITE",
                     "\u0661 INVITE", "99999999999 X", ""):
            self.assertRaises(ValueError, parse_cseq, text)

    def test_expires(self):
        self.assertEqual(parse_expires(" 3600 "), 3600)
        self.assertEqual(parse_expires("0"), 0)
        self.assertEqual(parse_expires("99999999999999999999"), 2**32 - 1)
        for text in ("-1", "", "1.5", "\u0661", "Thu, 01 Dec 1994 16:00:00 GMT"):
            self.assertRaises(ValueError, parse_expires, text)


class AuthTests(SynchronousTestCase):
    def test_parse(self):
        scheme, params = parse_auth('Digest realm="kerjo.local",NONCE="a,b\\"c", qop="auth,auth-int" ,algorithm=SHA-256, stale=FALSE')
        self.assertEqual(scheme, "Digest")
        self.assertEqual(params, {"realm": "kerjo.local", "nonce": 'a,b"c', "qop": "auth,auth-int",
                                  "algorithm": "SHA-256", "stale": "FALSE"})
        self.assertEqual(parse_auth("Digest"), ("Digest", {}))

    def test_bad(self):
        for text in ('Digest realm="x", realm="y"', 'Digest realm="x', "Digest realm", "Digest =x",
                     'Digest realm="x" junk', "Digest a=b c", "", '"Digest" a=b', "Digest a=b\r\nX: y",
                     "Digest,realm=x"):
            self.assertRaises(ValueError, parse_auth, text)

    def test_format_challenge_and_credentials(self):
        challenge = format_auth("Digest", {"realm": "r", "nonce": "n", "qop": "auth", "algorithm": "MD5",
                                           "stale": "TRUE", "opaque": "o"})
        self.assertEqual(challenge, 'Digest realm="r", nonce="n", qop="auth", algorithm=MD5, stale=TRUE, opaque="o"')
        creds = format_auth("Digest", {"username": 'a"b', "uri": "sips:x", "qop": "auth", "nc": "00000001",
                                       "cnonce": "c", "response": "ff"}, challenge=False)
        self.assertEqual(creds, 'Digest username="a\\"b", uri="sips:x", qop=auth, nc=00000001, cnonce="c", response="ff"')
        self.assertEqual(parse_auth(creds)[1]["username"], 'a"b')

    def test_format_refuses_bad(self):
        self.assertRaises(ValueError, format_auth, "Digest", {"realm": "a\r\nb"})
        self.assertRaises(ValueError, format_auth, "Digest", {"algorithm": "MD 5"})
        self.assertRaises(ValueError, format_auth, "Di gest", {})
        self.assertRaises(ValueError, format_auth, "Digest", {"bad name": "x"})

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                           st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), max_size=20),
                           max_size=6))
    def test_format_parse_round_trip(self, params):
        params = {k: v for k, v in params.items() if k not in ("algorithm", "nc", "stale")}
        self.assertEqual(parse_auth(format_auth("Digest", params)), ("Digest", params))


TEXT = st.text(max_size=60) | st.sampled_from(
    ['"a" <sips:b@c>;tag=1', "SIP/2.0/TLS h;branch=1", "Digest realm=\"x\"", "1 INVITE", "sips:[::1]:1;a=b"]
).flatmap(lambda s: st.integers(0, len(s)).flatmap(lambda i: st.text(max_size=4).map(lambda t: s[:i] + t + s[i:])))


class ArbitraryInputTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(TEXT)
    def test_only_value_errors(self, text):
        for parse in (parse_uri, parse_name_addr, parse_via, parse_cseq, parse_auth, parse_expires):
            try:
                parse(text)
            except ValueError:
                pass
