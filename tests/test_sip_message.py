"""The message model: Headers multi-map, serialization, make_response."""

from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire.sip.message import (
    COMPACT_FORMS,
    REASONS,
    Headers,
    Request,
    Response,
    make_response,
)


def register() -> Request:
    return Request(
        "REGISTER",
        "sips:kerjo.local",
        Headers(
            [
                ("Via", "SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKa;rport"),
                ("Via", "SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKb"),
                ("From", "<sips:alice@kerjo.local>;tag=f1"),
                ("To", "<sips:alice@kerjo.local>"),
                ("Call-ID", "c1@host"),
                ("CSeq", "3 REGISTER"),
                ("Max-Forwards", "70"),
                ("Contact", "<sips:alice@10.0.0.2:5061>"),
            ]
        ),
    )


class HeadersTests(SynchronousTestCase):
    def test_compact_forms_table(self):
        for short, full in {
            "v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact",
            "l": "Content-Length", "c": "Content-Type", "k": "Supported",
            "s": "Subject", "e": "Content-Encoding", "o": "Event", "u": "Allow-Events",
        }.items():
            self.assertEqual(COMPACT_FORMS[short], full)
            h = Headers([(short.upper(), "x")])
            self.assertEqual(h.items(), [(full, "x")])

    def test_canonical_names(self):
        h = Headers([("call-id", "1"), ("cseq", "1 X"), ("www-authenticate", "Digest"),
                     ("CONTENT-TYPE", "a/b"), ("x-custom-thing", "y")])
        self.assertEqual(
            [n for n, _ in h.items()],
            ["Call-ID", "CSeq", "WWW-Authenticate", "Content-Type", "X-Custom-Thing"],
        )
        self.assertEqual(h.get("I"), "1")
        self.assertEqual(h.get("CALL-ID"), "1")
        self.assertIn("c", h)
        self.assertNotIn("Via", h)
        self.assertIsNone(h.get("Via"))
        self.assertEqual(h.get("Via", "dflt"), "dflt")

    def test_get_all_splits_multi_value_headers(self):
        h = Headers([
            ("Via", "SIP/2.0/TLS a;branch=1, SIP/2.0/TLS b;branch=2"),
            ("v", "SIP/2.0/TLS c"),
            ("Contact", '"Smith, Bob" <sips:bob@x;p=a,b>;q=1, <sips:bob@y>'),
            ("Allow", "INVITE,ACK , OPTIONS"),
            ("Subject", "hello, world"),
        ])
        self.assertEqual(h.get_all("via"),
                         ["SIP/2.0/TLS a;branch=1", "SIP/2.0/TLS b;branch=2", "SIP/2.0/TLS c"])
        self.assertEqual(h.get_all("m"), ['"Smith, Bob" <sips:bob@x;p=a,b>;q=1', "<sips:bob@y>"])
        self.assertEqual(h.get_all("Allow"), ["INVITE", "ACK", "OPTIONS"])
        self.assertEqual(h.get_all("Subject"), ["hello, world"])
        self.assertEqual(h.get("Via"), "SIP/2.0/TLS a;branch=1, SIP/2.0/TLS b;branch=2")
        self.assertEqual(h.get_all("Route"), [])

    def test_prepend_set_remove(self):
        h = Headers([("From", "a"), ("Via", "v1"), ("To", "b"), ("Via", "v2")])
        h.prepend("v", "v0")
        self.assertEqual(h.get_all("Via"), ["v0", "v1", "v2"])
        self.assertEqual(h.items()[1], ("Via", "v0"))
        h.prepend("Route", "r")
        self.assertEqual(h.items()[0], ("Route", "r"))
        h.set("Via", "only")
        self.assertEqual(h.items(), [("Route", "r"), ("From", "a"), ("Via", "only"), ("To", "b")])
        h.set("Expires", "60")
        self.assertEqual(h.items()[-1], ("Expires", "60"))
        h.remove("route")
        h.remove("Nothing-Here")
        self.assertEqual(len(h), 4)
        self.assertNotIn("Route", h)

    def test_copy_is_independent(self):
        h = Headers([("To", "a")])
        c = h.copy()
        c.add("From", "b")
        self.assertEqual(h.items(), [("To", "a")])
        self.assertEqual(c, Headers([("t", "a"), ("f", "b")]))
        self.assertNotEqual(h, c)

    def test_refuses_injection(self):
        h = Headers()
        for value in ("a\r\nVia: x", "a\nb", "a\rb", "a\x00b"):
            self.assertRaises(ValueError, h.add, "Subject", value)
            self.assertRaises(ValueError, h.set, "Subject", value)
            self.assertRaises(ValueError, h.prepend, "Subject", value)
        self.assertRaises(ValueError, h.add, "Bad Name", "x")
        self.assertRaises(ValueError, h.add, "", "x")
        self.assertEqual(len(h), 0)


class SerializationTests(SynchronousTestCase):
    def test_request_to_bytes(self):
        r = Request("OPTIONS", "sips:kerjo.local", Headers([("i", "x"), ("CSeq", "1 OPTIONS")]), b"abc")
        self.assertEqual(
            r.to_bytes(),
            b"OPTIONS sips:kerjo.local SIP/2.0\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 3\r\n\r\nabc",
        )
        self.assertEqual(r.call_id, "x")
        self.assertEqual(r.cseq, (1, "OPTIONS"))

    def test_stale_content_length_is_replaced_in_place(self):
        r = Request("M", "sip:x", Headers([("l", "99"), ("To", "a"), ("Content-Length", "5")]))
        self.assertEqual(r.to_bytes(), b"M sip:x SIP/2.0\r\nContent-Length: 0\r\nTo: a\r\n\r\n")

    def test_response_to_bytes_utf8(self):
        r = Response(200, "OK", Headers([("Subject", "h\u00e9")]), b"")
        self.assertEqual(
            r.to_bytes(), "SIP/2.0 200 OK\r\nSubject: h\u00e9\r\nContent-Length: 0\r\n\r\n".encode()
        )
        self.assertIsNone(r.cseq)
        self.assertIsNone(r.call_id)

    def test_bad_values_refused(self):
        self.assertRaises(ValueError, Request("BAD METHOD", "sip:x", Headers()).to_bytes)
        self.assertRaises(ValueError, Request("M", "sip:x y", Headers()).to_bytes)
        self.assertRaises(ValueError, Response(99, "x", Headers()).to_bytes)
        self.assertRaises(ValueError, Response(200, "O\r\nK", Headers()).to_bytes)

    def test_bad_cseq_property_is_none(self):
        r = Request("M", "sip:x", Headers([("CSeq", "x M")]))
        self.assertIsNone(r.cseq)


class MakeResponseTests(SynchronousTestCase):
    def test_copies_rfc3261_headers(self):
        req = register()
        resp = make_response(req, 200, to_tag="t9")
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.reason, "OK")
        self.assertEqual(
            resp.headers.items(),
            [
                ("Via", "SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bKa;rport"),
                ("Via", "SIP/2.0/TLS 10.0.0.1;branch=z9hG4bKb"),
                ("From", "<sips:alice@kerjo.local>;tag=f1"),
                ("To", "<sips:alice@kerjo.local>;tag=t9"),
                ("Call-ID", "c1@host"),
                ("CSeq", "3 REGISTER"),
            ],
        )
        self.assertEqual(resp.body, b"")

    def test_existing_to_tag_kept(self):
        req = register()
        req.headers.set("To", "<sips:alice@kerjo.local>;tag=old")
        resp = make_response(req, 486, to_tag="new")
        self.assertEqual(resp.headers.get("To"), "<sips:alice@kerjo.local>;tag=old")
        self.assertEqual(resp.reason, "Busy Here")

    def test_unparseable_to_with_tag_kept(self):
        req = register()
        req.headers.set("To", "garbage ;TAG=1")
        self.assertEqual(make_response(req, 400, to_tag="x").headers.get("To"), "garbage ;TAG=1")

    def test_no_tag_without_to_tag(self):
        resp = make_response(register(), 401, "Nope")
        self.assertEqual(resp.headers.get("To"), "<sips:alice@kerjo.local>")
        self.assertEqual(resp.reason, "Nope")

    def test_missing_headers_skipped(self):
        resp = make_response(Request("M", "sip:x", Headers([("Call-ID", "z")])), 400)
        self.assertEqual(resp.headers.items(), [("Call-ID", "z")])

    def test_response_does_not_share_the_request_fields(self):
        req = register()
        resp = make_response(req, 200, to_tag="t9")
        resp.headers.add("X-Added", "1")
        resp.headers.set("Via", "SIP/2.0/TLS other")
        self.assertNotIn("X-Added", req.headers)
        self.assertEqual(len(req.headers.get_all("Via")), 2)

    def test_first_of_repeated_fields_copied(self):
        req = Request("M", "sip:x", Headers([("From", "<sip:a@x>;tag=1"), ("From", "<sip:b@x>;tag=2"),
                                             ("To", "<sip:c@x>"), ("Via", "SIP/2.0/TLS a"), ("Via", "SIP/2.0/TLS b")]))
        resp = make_response(req, 200, to_tag="z")
        self.assertEqual(resp.headers.items(), [("Via", "SIP/2.0/TLS a"), ("Via", "SIP/2.0/TLS b"),
                                                ("From", "<sip:a@x>;tag=1"), ("To", "<sip:c@x>;tag=z")])

    def test_to_tag_checked_when_added(self):
        self.assertRaises(ValueError, make_response, register(), 200, to_tag="t\r\nX-Evil: 1")

    def test_tag_parameter_found_in_any_case(self):
        req = register()
        req.headers.set("To", "<sips:alice@kerjo.local>;TAG=old")
        self.assertEqual(make_response(req, 200, to_tag="new").headers.get("To"), "<sips:alice@kerjo.local>;TAG=old")
        req.headers.set("To", "<sips:alice@kerjo.local;tag=inuri>")
        self.assertEqual(make_response(req, 200, to_tag="new").headers.get("To"),
                         "<sips:alice@kerjo.local;tag=inuri>;tag=new")

    def test_reasons(self):
        for code in (100, 180, 200, 302, 400, 401, 403, 404, 405, 408, 413, 416, 423,
                     480, 481, 486, 487, 500, 501, 503, 504, 505, 513, 600, 603, 606):
            self.assertIn(code, REASONS)
        self.assertEqual(REASONS[513], "Message Too Large")
        self.assertEqual(REASONS[413], "Request Entity Too Large")
        self.assertEqual(make_response(register(), 799).reason, "Unknown")
