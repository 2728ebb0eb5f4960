"""Stream framing, parsing rules, limits, and Hypothesis properties."""

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire.sip.message import Headers, Request, Response, canonical_name
from kerjostunt.wire.sip.parser import (
    PING,
    PONG,
    KeepAlivePing,
    KeepAlivePong,
    Limits,
    SIPParseError,
    StreamParser,
    _split_lines,
    parse_message,
)

HEAD = (
    b"REGISTER sips:kerjo.local SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bK1;rport\r\n"
    b"From: <sips:alice@kerjo.local>;tag=a\r\n"
    b"To: <sips:alice@kerjo.local>\r\n"
    b"Call-ID: c1\r\n"
    b"CSeq: 1 REGISTER\r\n"
)


def msg(extra: bytes = b"", body: bytes = b"", head: bytes = HEAD, length: bool = True) -> bytes:
    cl = b"Content-Length: %d\r\n" % len(body) if length else b""
    return head + extra + cl + b"\r\n" + body


RESPONSE = (
    b"SIP/2.0 401 Unauthorized\r\n"
    b"Via: SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bK1;rport=5061;received=1.2.3.4\r\n"
    b"From: <sips:alice@kerjo.local>;tag=a\r\n"
    b"To: <sips:alice@kerjo.local>;tag=b\r\n"
    b"Call-ID: c1\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b'WWW-Authenticate: Digest realm="kerjo.local", nonce="n"\r\n'
    b"Content-Length: 0\r\n\r\n"
)


class ParseTests(SynchronousTestCase):
    def test_request(self):
        r = parse_message(msg(body=b"hi"))
        self.assertIsInstance(r, Request)
        self.assertEqual((r.method, r.uri, r.body), ("REGISTER", "sips:kerjo.local", b"hi"))
        self.assertEqual(r.cseq, (1, "REGISTER"))
        self.assertEqual(r.call_id, "c1")
        self.assertEqual(r.headers.get("Content-Length"), "2")

    def test_response(self):
        r = parse_message(RESPONSE)
        self.assertIsInstance(r, Response)
        self.assertEqual((r.code, r.reason), (401, "Unauthorized"))
        self.assertEqual(r.headers.get("WWW-Authenticate"), 'Digest realm="kerjo.local", nonce="n"')

    def test_response_empty_reason(self):
        data = RESPONSE.replace(b"401 Unauthorized", b"200")
        self.assertEqual(parse_message(data).reason, "")

    def test_compact_forms(self):
        data = (b"OPTIONS sips:kerjo.local SIP/2.0\r\nv: SIP/2.0/TLS h\r\nf: <sips:a@x>;tag=1\r\n"
                b"t: <sips:b@x>\r\ni: c\r\nCSeq: 2 OPTIONS\r\nk: path\r\nl: 3\r\n\r\nabc")
        r = parse_message(data)
        self.assertEqual([n for n, _ in r.headers.items()],
                         ["Via", "From", "To", "Call-ID", "CSeq", "Supported", "Content-Length"])
        self.assertEqual(r.body, b"abc")

    def test_folding_and_whitespace(self):
        data = msg(extra=b"Subject: first\r\n   second\r\n\tthird  \r\nX-Empty:\r\nX-Spaced   :   v  \r\n")
        r = parse_message(data)
        self.assertEqual(r.headers.get("Subject"), "first second third")
        self.assertEqual(r.headers.get("X-Empty"), "")
        self.assertEqual(r.headers.get("X-Spaced"), "v")

    def test_multiple_via_split(self):
        data = msg(extra=b"Via: SIP/2.0/TLS b;branch=z9hG4bK2, SIP/2.0/TLS c;branch=z9hG4bK3\r\n")
        vias = parse_message(data).headers.get_all("v")
        self.assertEqual(vias, ["SIP/2.0/TLS 10.0.0.2:5061;branch=z9hG4bK1;rport",
                                "SIP/2.0/TLS b;branch=z9hG4bK2", "SIP/2.0/TLS c;branch=z9hG4bK3"])

    def test_lf_only_line_endings(self):
        data = msg(body=b"x\r\ny").replace(b"\r\n", b"\n").replace(b"Length: 4", b"Length: 3")
        r = parse_message(data)
        self.assertEqual(r.body, b"x\ny")
        self.assertEqual(r.call_id, "c1")

    def test_missing_content_length_means_empty_body(self):
        p = StreamParser()
        items = p.feed(msg(length=False) + msg(body=b"z"))
        self.assertEqual([i.body for i in items], [b"", b"z"])
        self.assertEqual(items[0].headers.get("Content-Length"), None)

    def test_version_case_insensitive(self):
        r = parse_message(msg(head=HEAD.replace(b"SIP/2.0\r\n", b"sip/2.0\r\n", 1)))
        self.assertEqual(r.method, "REGISTER")

    def test_parse_message_requires_exactly_one(self):
        for data in (msg() + msg(), msg() + b"\r\n", b"\r\n\r\n", msg()[:-3], b"", msg(body=b"ab")[:-1]):
            e = self.assertRaises(SIPParseError, parse_message, data)
            self.assertEqual(e.code, 400)
        e = self.assertRaises(SIPParseError, parse_message, msg() + b"junk")
        self.assertEqual(e.message.call_id, "c1")


class BadInputTests(SynchronousTestCase):
    def assertError(self, data, code, fatal, has_message, limits=Limits()):
        e = self.assertRaises(SIPParseError, StreamParser(limits).feed, data)
        self.assertEqual((e.code, e.fatal), (code, fatal), e.reason)
        self.assertEqual(e.message is not None, has_message, e.reason)
        self.assertIsNone(e.__cause__)
        return e

    def test_missing_required_headers(self):
        for name in (b"Via", b"From", b"To", b"Call-ID", b"CSeq"):
            head = b"\r\n".join(line for line in HEAD.split(b"\r\n") if not line.startswith(name + b":"))
            e = self.assertError(msg(head=head + b"\r\n"), 400, False, True)
            self.assertIn(name.decode(), e.reason)

    def test_missing_header_message_copyable(self):
        head = HEAD.replace(b"CSeq: 1 REGISTER\r\n", b"")
        e = self.assertError(msg(head=head), 400, False, True)
        self.assertEqual(e.message.call_id, "c1")
        self.assertEqual(len(e.message.headers.get_all("Via")), 1)

    def test_cseq_problems(self):
        self.assertError(msg(head=HEAD.replace(b"1 REGISTER", b"1 INVITE")), 400, False, True)
        self.assertError(msg(head=HEAD.replace(b"1 REGISTER", b"x REGISTER")), 400, False, True)
        self.assertError(msg(head=HEAD.replace(b"1 REGISTER", b"2147483648 REGISTER")), 400, False, True)
        self.assertError(msg(extra=b"CSeq: 2 REGISTER\r\n"), 400, False, True)

    def test_response_missing_cseq(self):
        self.assertError(RESPONSE.replace(b"CSeq: 1 REGISTER\r\n", b""), 400, False, True)

    def test_bad_request_uri(self):
        self.assertError(msg(head=HEAD.replace(b"sips:kerjo.local", b"kerjo", 1)), 400, False, True)

    def test_version(self):
        e = self.assertError(msg(head=HEAD.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1)), 505, False, True)
        self.assertEqual(e.message.method, "REGISTER")
        self.assertError(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, True, False)
        self.assertError(RESPONSE.replace(b"SIP/2.0 401", b"SIP/1.0 401"), 505, False, True)

    def test_malformed_start_lines(self):
        for line in (b"REGISTER  sips:x SIP/2.0", b"REGISTER sips:x", b"REG@ sips:x SIP/2.0",
                     b"SIP/2.0 20 OK", b"SIP/2.0 099 X", b"SIP/2.0 200OK", b"\rREGISTER sips:x SIP/2.0"):
            self.assertError(line + b"\r\n" + HEAD.split(b"\r\n", 1)[1] + b"\r\n", 400, True, False)

    def test_malformed_header_lines(self):
        for extra in (b"No colon here\r\n", b"Bad Name: x\r\n", b"X-Nul: a\x00b\r\n", b"X-Cr: a\rb\r\n",
                      b": empty name\r\n"):
            self.assertError(msg(extra=extra), 400, True, False)
        self.assertError(b"REGISTER sips:x SIP/2.0\r\n folded: first\r\n\r\n", 400, True, False)

    def test_non_utf8_headers(self):
        e = self.assertError(msg(extra=b"Subject: \xff\xfe\r\n"), 400, True, False)
        self.assertIn("UTF-8", e.reason)
        self.assertError(b"\xc3\x28 sips:x SIP/2.0\r\n\r\n", 400, True, False)

    def test_non_utf8_body_is_fine(self):
        self.assertEqual(parse_message(msg(body=b"\xff\x00\xfe")).body, b"\xff\x00\xfe")

    def test_bad_content_length(self):
        for value in (b"-1", b"abc", b"1.5", b"", b"\xef\xbc\x91", b"+3", b"0x10"):
            self.assertError(msg(extra=b"Content-Length: " + value + b"\r\n", length=False), 400, True, True)
        self.assertError(msg(extra=b"Content-Length: 1\r\n", body=b"ab"), 400, True, True)

    def test_duplicate_equal_content_length_ok(self):
        r = parse_message(msg(extra=b"l: 002\r\n", body=b"ab"))
        self.assertEqual(r.body, b"ab")

    def test_body_limit_413(self):
        limits = Limits(max_body_bytes=10)
        self.assertEqual(len(StreamParser(limits).feed(msg(body=b"x" * 10))), 1)
        e = self.assertError(msg(extra=b"Content-Length: 11\r\n", length=False), 413, True, True, limits)
        self.assertEqual(e.message.call_id, "c1")
        self.assertError(msg(extra=b"Content-Length: " + b"9" * 40 + b"\r\n", length=False), 413, True, True)

    def test_message_limit_513(self):
        size = len(msg(body=b"x" * 20))
        limits = Limits(max_message_bytes=size)
        self.assertEqual(len(StreamParser(limits).feed(msg(body=b"x" * 20))), 1)
        self.assertError(msg(body=b"x" * 21), 513, True, True, limits)
        self.assertRaises(SIPParseError, parse_message, msg(body=b"x" * 21), limits)

    def test_header_bytes_limit_513(self):
        limits = Limits(max_header_bytes=len(msg()))
        self.assertEqual(len(StreamParser(limits).feed(msg())), 1)
        self.assertError(msg(extra=b"X: y\r\n"), 513, True, False, limits)
        # also detected before the end of the header section arrives
        self.assertError(msg()[:-2] + b"X" * 5000, 513, True, False, Limits(max_header_bytes=len(msg()) + 100))

    def test_line_limit_513(self):
        line = b"X: " + b"y" * 30
        self.assertEqual(len(StreamParser(Limits(max_line_bytes=len(HEAD.split(b"\r\n")[1]))).feed(msg())), 1)
        self.assertError(b"OPTIONS sips:x SIP/2.0\r\n" + line + b"\r\n\r\n", 400, False, True,
                         Limits(max_line_bytes=len(line)))
        self.assertError(b"OPTIONS sips:x SIP/2.0\r\n" + line + b"z\r\n\r\n", 513, True, False,
                         Limits(max_line_bytes=len(line)))
        # an endless line is refused without waiting for its end
        self.assertError(b"OPTIONS sips:x SIP/2.0\r\n" + b"X: " + b"y" * 30, 513, True, False,
                         Limits(max_line_bytes=25))

    def test_header_count_limit_513(self):
        limits = Limits(max_headers=6)
        self.assertEqual(len(StreamParser(limits).feed(msg())), 1)
        e = self.assertError(msg(extra=b"X: 1\r\n"), 513, True, False, limits)
        self.assertIn("header fields", e.reason)
        # continuation lines do not count
        self.assertEqual(len(StreamParser(limits).feed(msg(head=HEAD.replace(b"Call-ID: c1", b"Call-ID:\r\n c1")))), 1)

    def test_default_limits(self):
        self.assertEqual(Limits(), Limits(65536, 16384, 4096, 64, 32768))


class StreamTests(SynchronousTestCase):
    def test_ping_pong(self):
        p = StreamParser()
        self.assertEqual(p.feed(b"\r\n\r\n"), [PING])
        self.assertEqual(p.feed(b"\r\n"), [PONG])
        self.assertEqual(p.feed(b"\r\n\r\n\r\n"), [PING, PONG])
        self.assertEqual(p.feed(b"\r\n\r\n\r\n\r\n"), [PING, PING])
        self.assertEqual(p.buffered, 0)
        self.assertIsInstance(PING, KeepAlivePing)
        self.assertIsInstance(PONG, KeepAlivePong)

    def test_pong_then_message(self):
        items = StreamParser().feed(b"\r\n" + msg())
        self.assertEqual(items[0], PONG)
        self.assertIsInstance(items[1], Request)

    def test_ping_between_messages(self):
        items = StreamParser().feed(msg() + b"\r\n\r\n" + msg(body=b"b") + b"\r\n")
        self.assertEqual([type(i) for i in items], [Request, KeepAlivePing, Request, KeepAlivePong])

    def test_partial_keepalive_waits(self):
        p = StreamParser()
        self.assertEqual(p.feed(b"\r"), [])
        self.assertEqual(p.buffered, 1)
        self.assertEqual(p.feed(b"\n\r"), [])  # could still become a ping
        self.assertEqual(p.feed(b"\n"), [PING])
        # documented: a ping split right after its first CRLF reads as two pongs
        self.assertEqual(p.feed(b"\r\n"), [PONG])
        self.assertEqual(p.feed(b"\r\n"), [PONG])

    def test_stray_lf_ignored(self):
        self.assertEqual(len(StreamParser().feed(b"\n\n" + msg())), 1)

    def test_pipelined_one_byte_at_a_time(self):
        stream = msg(body=b"one") + RESPONSE + msg(body=b"three\r\n\r\n") + msg()
        p = StreamParser()
        out = []
        for i in range(len(stream)):
            got = p.feed(stream[i : i + 1])
            if not got:
                self.assertGreater(p.buffered, 0)
            out.extend(got)
        self.assertEqual([type(m) for m in out], [Request, Response, Request, Request])
        self.assertEqual([m.body for m in out], [b"one", b"", b"three\r\n\r\n", b""])
        self.assertEqual(p.buffered, 0)
        self.assertEqual(out, StreamParser().feed(stream))

    def test_buffered_counts_incomplete(self):
        p = StreamParser()
        data = msg(body=b"12345")
        self.assertEqual(p.feed(data[:-2]), [])
        self.assertEqual(p.buffered, len(data) - 2)
        self.assertEqual(len(p.feed(data[-2:])), 1)
        self.assertEqual(p.buffered, 0)

    def test_non_fatal_error_keeps_stream(self):
        bad = msg(head=HEAD.replace(b"Call-ID: c1\r\n", b""), body=b"body")
        p = StreamParser()
        e = self.assertRaises(SIPParseError, p.feed, msg() + bad + msg(body=b"next"))
        self.assertFalse(e.fatal)
        self.assertEqual(len(e.preceding), 1)
        self.assertEqual(e.message.body, b"body")
        self.assertEqual([m.body for m in p.feed(b"")], [b"next"])

    def test_feed_events(self):
        bad = msg(head=HEAD.replace(b"Call-ID: c1\r\n", b""))
        events = StreamParser().feed_events(msg() + bad + b"\r\n\r\n" + msg() + b"garbage\r\n\r\n" + msg())
        kinds = [type(e) for e in events]
        self.assertEqual(kinds, [Request, SIPParseError, KeepAlivePing, Request, SIPParseError])
        self.assertFalse(events[1].fatal)
        self.assertTrue(events[-1].fatal)

    def test_fatal_error_is_final(self):
        p = StreamParser()
        e = self.assertRaises(SIPParseError, p.feed, b"garbage\r\n\r\n")
        self.assertTrue(e.fatal)
        self.assertEqual(p.buffered, 0)
        again = self.assertRaises(SIPParseError, p.feed, msg())
        self.assertTrue(again.fatal)
        self.assertEqual(again.code, 400)
        self.assertEqual(StreamParser().feed_events(b"") , [])
        self.assertEqual([type(x) for x in p.feed_events(msg())], [SIPParseError])


# --- Hypothesis ---------------------------------------------------------------

TOKEN = st.from_regex(r"[A-Za-z0-9\-.!%*_+`'~]{1,12}", fullmatch=True)
VALUE_CHARS = st.characters(min_codepoint=0x20, exclude_categories=("Cs",), exclude_characters="\x7f")
VALUE = st.text(VALUE_CHARS, max_size=40).filter(lambda v: v == v.strip(" \t"))
RESERVED = {"Content-Length", "From", "To", "Call-ID", "CSeq", "Max-Forwards"}
EXTRA = st.lists(st.tuples(TOKEN.filter(lambda n: canonical_name(n) not in RESERVED), VALUE), max_size=8)
USER = st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True)


@st.composite
def requests(draw):
    method = draw(TOKEN)
    headers = Headers([
        ("Via", f"SIP/2.0/TLS h;branch=z9hG4bK{draw(USER)}"),
        ("From", f"<sips:{draw(USER)}@kerjo.local>;tag={draw(USER)}"),
        ("To", f"<sips:{draw(USER)}@kerjo.local>"),
        ("Call-ID", draw(USER)),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
    ] + draw(EXTRA))
    headers = Headers(draw(st.permutations(headers.items())))
    return Request(method, f"sips:{draw(USER)}@kerjo.local", headers, draw(st.binary(max_size=100)))


@st.composite
def responses(draw):
    headers = Headers([
        ("Via", "SIP/2.0/TLS h;branch=z9hG4bK1"), ("From", "<sips:a@x>;tag=1"), ("To", "<sips:b@x>"),
        ("Call-ID", draw(USER)), ("CSeq", f"1 {draw(TOKEN)}"),
    ] + draw(EXTRA))
    reason = draw(st.text(VALUE_CHARS, max_size=30))
    return Response(draw(st.integers(100, 699)), reason, headers, draw(st.binary(max_size=100)))


def expected(message):
    headers = message.headers.copy()
    headers.set("Content-Length", str(len(message.body)))
    return type(message)(*(
        (message.method, message.uri) if isinstance(message, Request) else (message.code, message.reason)
    ), headers, message.body)


@st.composite
def chunked(draw, data):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@st.composite
def mutated(draw):
    """Valid messages with bytes flipped, inserted or cut: gets past the
    start line far more often than random bytes do."""
    data = bytearray(b"".join(m.to_bytes() for m in draw(st.lists(st.one_of(requests(), responses()), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        blob = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b":", b"\xff", b"\x00", b"-1", b"99999", b","]))
        if op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos : pos + len(blob)]
        else:
            data[pos : pos + len(blob)] = blob
    return bytes(data)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_message_bytes=600, max_header_bytes=400, max_line_bytes=80, max_headers=8, max_body_bytes=60)


class PropertyTests(SynchronousTestCase):
    @SETTINGS
    @given(st.one_of(requests(), responses()))
    def test_round_trip(self, message):
        parsed = parse_message(message.to_bytes())
        self.assertEqual(parsed, expected(message))
        self.assertEqual(parse_message(parsed.to_bytes()), parsed)

    @SETTINGS
    @given(st.lists(st.one_of(requests(), responses(), st.just(PING)), min_size=1, max_size=4), st.data())
    def test_round_trip_stream_chunks(self, messages, data):
        stream = b"".join(b"\r\n\r\n" if m is PING else m.to_bytes() for m in messages)
        p = StreamParser()
        out = []
        for chunk in data.draw(chunked(stream)):
            out.extend(p.feed(chunk))
        got = [m for m in out if not isinstance(m, (KeepAlivePing, KeepAlivePong))]
        self.assertEqual(got, [expected(m) for m in messages if m is not PING])
        self.assertEqual(p.buffered, 0)

    def _only_parse_errors(self, stream, chunks, limits):
        p = StreamParser(limits)
        for chunk in chunks:
            try:
                items = p.feed(chunk)
            except SIPParseError as e:
                self.assertIsNone(e.__cause__, "internal error turned into 400")
                self.assertIn(e.code, (400, 413, 505, 513))
                items = e.preceding
                if e.fatal:
                    self.assertRaises(SIPParseError, p.feed, b"x")
                    return
            for item in items:
                self.assertIsInstance(item, (Request, Response, KeepAlivePing, KeepAlivePong))
            self.assertLessEqual(p.buffered, limits.max_message_bytes + len(chunk))
        for e in StreamParser(limits).feed_events(stream):
            if isinstance(e, SIPParseError):
                self.assertIsNone(e.__cause__)
        try:
            parse_message(stream, limits)
        except SIPParseError as e:
            self.assertIsNone(e.__cause__)

    @SETTINGS
    @given(st.binary(max_size=400), st.data(), st.sampled_from([Limits(), SMALL]))
    def test_arbitrary_bytes_only_parse_errors(self, stream, data, limits):
        self._only_parse_errors(stream, data.draw(chunked(stream)), limits)

    @SETTINGS
    @given(mutated(), st.data(), st.sampled_from([Limits(), SMALL]))
    def test_mutated_messages_only_parse_errors(self, stream, data, limits):
        self._only_parse_errors(stream, data.draw(chunked(stream)), limits)


class LineScanParser(StreamParser):
    """The parser without its whole-section fast path: every header section scanned line by line."""

    __slots__ = ()

    def _find_head(self) -> bool:
        return False


def _events(parser, chunks):
    """What a connection would see, errors as (code, reason, fatal) so they compare."""
    out = []
    for chunk in chunks:
        for e in parser.feed_events(chunk):
            if isinstance(e, SIPParseError):
                out.append((e.code, e.reason, e.fatal, e.message))
                if e.fatal:
                    return out
            else:
                out.append(e)
    return out + [parser.buffered]


def _old_split_lines(head):
    """The line-by-line check that _split_lines replaced with one search."""
    text = head.decode("utf-8")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")][:-2]
    if any(re.search(r"[\x00-\x08\x0a-\x1f\x7f]", line) for line in lines):
        return "control"
    return lines


HEAD_TEXT = st.lists(st.sampled_from(["a", " ", ":", "\r", "\n", "\r\n", "\t", "\x00", "\x7f", "\x0b", "é"]),
                     max_size=30).map("".join)


class FastPathTests(SynchronousTestCase):
    """The whole-section search finds what the line scan finds, and refuses what it refuses, the same way."""

    @SETTINGS
    @given(st.one_of(mutated(), st.binary(max_size=300)), st.data(),
           st.sampled_from([Limits(), SMALL, Limits(max_headers=6), Limits(max_line_bytes=120, max_header_bytes=300)]))
    def test_same_as_line_scan(self, stream, data, limits):
        chunks = data.draw(chunked(stream))
        self.assertEqual(_events(StreamParser(limits), chunks), _events(LineScanParser(limits), chunks))

    @SETTINGS
    @given(HEAD_TEXT)
    def test_split_lines_same_as_per_line_check(self, text):
        head = (text + "\n\n").encode()
        try:
            new = _split_lines(head)
        except SIPParseError as e:
            self.assertEqual(e.reason, "Bad Request: control character in header section")
            new = "control"
        self.assertEqual(new, _old_split_lines(head))

    def test_limits_at_the_fast_path_edges(self):
        # Exactly max_headers fields passes; one more is refused, whole or byte by byte.
        limits = Limits(max_headers=6)
        ok = msg()  # 5 fields + Content-Length
        self.assertIsInstance(StreamParser(limits).feed(ok)[0], Request)
        over = msg(b"X-A: 1\r\n")
        for chunks in ([over], [over[i:i + 1] for i in range(len(over))]):
            [(code, reason, fatal, _)] = _events(StreamParser(limits), chunks)
            self.assertEqual((code, reason, fatal), (513, "Message Too Large: too many header fields", True))
        # A section longer than max_line_bytes goes through the line scan and is still accepted.
        long_ok = msg(b"X-Long: " + b"v" * 60 + b"\r\n")
        self.assertIsInstance(StreamParser(Limits(max_line_bytes=100)).feed(long_ok)[0], Request)
        [(code, reason, _, _)] = _events(StreamParser(Limits(max_line_bytes=60)), [long_ok])
        self.assertEqual((code, reason), (513, "Message Too Large: line too long"))

    def test_bare_cr_in_a_header_is_refused(self):
        [(code, reason, fatal, _)] = _events(StreamParser(), [msg(b"X-A: a\rb\r\n")])
        self.assertEqual((code, reason, fatal), (400, "Bad Request: control character in header section", True))
