"""Tests for the pure STUN codec, cross-checked against aioice's codec."""

from __future__ import annotations

import struct

from aioice import stun as aio
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kerjostunt.wire import stun

TID = bytes(range(12))


class CodecTests(TestCase):
    def test_round_trip(self) -> None:
        attrs = [(stun.USERNAME, b"abc"), (stun.SOFTWARE, b"kerjo test"),
                 (stun.KERJO_LOCAL_PORT, stun.encode_local_port(40000))]
        raw = stun.encode(stun.BINDING_REQUEST, TID, attrs)
        self.assertEqual(len(raw) % 4, 0)
        msg = stun.decode(raw)
        self.assertEqual(msg.msg_type, stun.BINDING_REQUEST)
        self.assertEqual(msg.transaction_id, TID)
        self.assertEqual(msg.attributes[:3], attrs)
        self.assertTrue(msg.has(stun.FINGERPRINT))
        self.assertEqual(msg.get(stun.USERNAME), b"abc")
        self.assertIsNone(msg.get(stun.REALM))
        self.assertEqual(stun.decode_local_port(msg.get(stun.KERJO_LOCAL_PORT)), 40000)
        self.assertEqual(msg.method, 1)
        self.assertTrue(stun.is_request(msg))

    def test_classes(self) -> None:
        ok = stun.decode(stun.encode(stun.BINDING_SUCCESS, TID, []))
        err = stun.decode(stun.encode(stun.BINDING_ERROR, TID, []))
        self.assertTrue(stun.is_success(ok))
        self.assertTrue(stun.is_error(err))
        self.assertEqual(ok.method, 1)

    def test_no_fingerprint(self) -> None:
        raw = stun.encode(stun.BINDING_REQUEST, TID, [], fingerprint=False)
        self.assertEqual(len(raw), 20)
        self.assertEqual(stun.decode(raw).attributes, [])

    def test_bad_fingerprint(self) -> None:
        raw = bytearray(stun.encode(stun.BINDING_REQUEST, TID, [(stun.USERNAME, b"abcd")]))
        raw[24] ^= 1
        self.assertRaises(stun.STUNError, stun.decode, bytes(raw))

    def test_rejects(self) -> None:
        good = stun.encode(stun.BINDING_REQUEST, TID, [(stun.USERNAME, b"abcd")])
        cases = [
            b"", good[:19], good[:-4],
            b"\x80" + good[1:],                                   # first bits
            good[:4] + b"\x00\x00\x00\x00" + good[8:],           # cookie
            good[:2] + struct.pack("!H", 3) + good[4:],         # length
            good + b"\x00\x00\x00\x00",                          # trailing
            struct.pack("!HHI12s", 1, 4, stun.MAGIC_COOKIE, TID) + b"\x00\x01\x00\x09",
        ]
        for raw in cases:
            self.assertRaises(stun.STUNError, stun.decode, raw)

    def test_attribute_after_fingerprint(self) -> None:
        raw = stun.encode(stun.BINDING_REQUEST, TID, [])
        raw = raw[:2] + struct.pack("!H", len(raw) - 20 + 8) + raw[4:] + b"\x00\x06\x00\x04abcd"
        self.assertRaises(stun.STUNError, stun.decode, raw)

    def test_xor_address_v4_v6(self) -> None:
        for addr in [("192.0.2.1", 32853), ("2001:db8:1234::5678", 65535), ("0.0.0.0", 0)]:
            value = stun.encode_xor_address(addr, TID)
            self.assertEqual(stun.decode_xor_address(value, TID), addr)
            self.assertEqual(aio.unpack_xor_address(value, TID), addr)
            self.assertEqual(value, aio.pack_xor_address(addr, TID))
            self.assertEqual(stun.decode_address(stun.encode_address(addr)), addr)

    def test_rfc5769_ipv4_xor_vector(self) -> None:
        # RFC 5769 2.2: 192.0.2.1:32853 with this transaction id.
        tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
        self.assertEqual(stun.encode_xor_address(("192.0.2.1", 32853), tid),
                         bytes.fromhex("0001a147e112a643"))

    def test_bad_addresses(self) -> None:
        for value in [b"", b"\x00\x01\x00", b"\x00\x03\x00\x01abcd", b"\x00\x01\x00\x01abc"]:
            self.assertRaises(stun.STUNError, stun.decode_xor_address, value, TID)
        self.assertRaises(stun.STUNError, stun.encode_address, ("nope", 1))
        self.assertRaises(stun.STUNError, stun.encode_address, ("1.2.3.4", 70000))

    def test_error_code(self) -> None:
        value = stun.encode_error_code(401, "Unauthorized")
        self.assertEqual(stun.decode_error_code(value), (401, "Unauthorized"))
        self.assertEqual(aio.unpack_error_code(value), (401, "Unauthorized"))
        self.assertRaises(stun.STUNError, stun.decode_error_code, b"\x00\x00\x09\x00")


class IntegrityTests(TestCase):
    def test_sha1_matches_aioice(self) -> None:
        raw, tid = stun.binding_request(username="tok", key=b"secret", local_port=1234)
        msg = aio.parse_message(raw)
        self.assertTrue(msg.check_message_integrity(b"secret"))
        self.assertFalse(msg.check_message_integrity(b"other"))
        self.assertTrue(stun.check_integrity(raw, b"secret"))
        self.assertFalse(stun.check_integrity(raw, b"other"))

    def test_aioice_built_message(self) -> None:
        m = aio.Message(aio.Method.BINDING, aio.Class.REQUEST, transaction_id=TID)
        m.attributes["USERNAME"] = "tok"
        m.add_message_integrity(b"secret")
        m.add_fingerprint()
        raw = bytes(m)
        self.assertTrue(stun.check_integrity(raw, b"secret"))
        self.assertEqual(stun.decode(raw).get(stun.USERNAME), b"tok")

    def test_sha256(self) -> None:
        raw, _ = stun.binding_request(username="tok", key=b"secret", integrity_sha256=True)
        msg = stun.decode(raw)
        self.assertEqual(len(msg.get(stun.MESSAGE_INTEGRITY_SHA256)), 32)
        self.assertTrue(stun.check_integrity(raw, b"secret"))
        self.assertFalse(stun.check_integrity(raw, b"secreT"))

    def test_sha256_by_hand(self) -> None:
        import hashlib
        import hmac
        raw = stun.encode(stun.BINDING_REQUEST, TID, [(stun.USERNAME, b"u")],
                          integrity_key=b"k", integrity_sha256=True, fingerprint=False)
        head = raw[:-36]
        self.assertEqual(struct.unpack("!H", head[2:4])[0], len(raw) - 20)
        self.assertEqual(raw[-32:], hmac.new(b"k", head, hashlib.sha256).digest())

    def test_no_integrity_is_false(self) -> None:
        raw, _ = stun.binding_request(username="tok")
        self.assertFalse(stun.check_integrity(raw, b"secret"))
        self.assertFalse(stun.check_integrity(b"garbage", b"secret"))

    def test_tampered_attribute(self) -> None:
        raw = bytearray(stun.binding_request(username="tok", key=b"k", local_port=1)[0])
        raw[24] ^= 0x20  # inside USERNAME
        self.assertFalse(stun.check_integrity(bytes(raw), b"k"))

    def test_short_term_key(self) -> None:
        self.assertEqual(stun.short_term_key("abc-DEF_1"), b"abc-DEF_1")
        self.assertEqual(stun.short_term_key("a\u00a0b"), b"a b")
        self.assertEqual(stun.short_term_key("e\u0301"), "\u00e9".encode())


class StreamTests(TestCase):
    def test_back_to_back_and_split(self) -> None:
        a, _ = stun.binding_request(username="a")
        b, _ = stun.binding_request(username="bb", key=b"k")
        dec = stun.StunStreamDecoder()
        data = a + b
        out = []
        for i in range(len(data)):
            out += dec.feed(data[i:i + 1])
        self.assertEqual([raw for _, raw in out], [a, b])
        self.assertEqual(dec.pending, 0)
        self.assertEqual([raw for _, raw in stun.StunStreamDecoder().feed(a + b)], [a, b])

    def test_oversized(self) -> None:
        dec = stun.StunStreamDecoder(max_size=100)
        header = struct.pack("!HHI12s", 1, 200, stun.MAGIC_COOKIE, TID)
        self.assertRaises(stun.STUNError, dec.feed, header)

    def test_bad_header(self) -> None:
        self.assertRaises(stun.STUNError, stun.StunStreamDecoder().feed, b"GET / HTTP/1.1\r\n\r\n123")

    def test_frame_with_bad_body(self) -> None:
        raw = struct.pack("!HHI12s", 1, 4, stun.MAGIC_COOKIE, TID) + b"\x00\x06\x00\x09"
        frames = stun.StunStreamDecoder().feed_frames(raw)
        self.assertEqual(frames, [raw])
        self.assertRaises(stun.STUNError, stun.decode, frames[0])


class BindingTests(TestCase):
    def test_parse_success(self) -> None:
        raw, tid = stun.binding_request()
        resp = stun.encode(stun.BINDING_SUCCESS, tid, [
            (stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(("203.0.113.5", 4444), tid))],
            integrity_key=b"k")
        self.assertEqual(stun.parse_binding_response(resp, tid), ("203.0.113.5", 4444))
        self.assertEqual(stun.parse_binding_response(resp, tid, key=b"k"), ("203.0.113.5", 4444))
        self.assertRaises(stun.STUNError, stun.parse_binding_response, resp, tid, key=b"x")
        self.assertRaises(stun.STUNError, stun.parse_binding_response, resp, TID)

    def test_parse_mapped_fallback(self) -> None:
        resp = stun.encode(stun.BINDING_SUCCESS, TID, [
            (stun.MAPPED_ADDRESS, stun.encode_address(("203.0.113.5", 1)))])
        self.assertEqual(stun.parse_binding_response(stun.decode(resp), TID), ("203.0.113.5", 1))
        empty = stun.encode(stun.BINDING_SUCCESS, TID, [])
        self.assertRaises(stun.STUNError, stun.parse_binding_response, empty, TID)

    def test_parse_error(self) -> None:
        resp = stun.encode(stun.BINDING_ERROR, TID, [
            (stun.ERROR_CODE, stun.encode_error_code(401, "Unauthorized"))])
        e = self.assertRaises(stun.STUNError, stun.parse_binding_response, resp, TID)
        self.assertEqual(e.code, 401)

    def test_aioice_parses_our_response(self) -> None:
        resp = stun.encode(stun.BINDING_SUCCESS, TID, [
            (stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(("198.51.100.7", 61000), TID)),
            (stun.SOFTWARE, b"kerjostunt")], integrity_key=b"pw")
        msg = aio.parse_message(resp)
        self.assertEqual(msg.attributes["XOR-MAPPED-ADDRESS"], ("198.51.100.7", 61000))
        self.assertTrue(msg.check_message_integrity(b"pw"))


class FuzzTests(TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200))
    def test_decode_arbitrary(self, data: bytes) -> None:
        try:
            stun.decode(data)
        except stun.STUNError:
            pass
        stun.check_integrity(data, b"k")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=120), st.integers(0, 0xFFFF))
    def test_decode_with_valid_header(self, body: bytes, msg_type: int) -> None:
        body = body[: len(body) // 4 * 4]
        data = struct.pack("!HHI12s", msg_type & 0x3FFF, len(body), stun.MAGIC_COOKIE, TID) + body
        try:
            stun.decode(data)
        except stun.STUNError:
            pass
        try:
            stun.parse_binding_response(data, TID)
        except stun.STUNError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 0x7FFF).filter(
        lambda t: t not in (stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256,
                            stun.FINGERPRINT)),
        st.binary(max_size=40)), max_size=8), st.binary(min_size=12, max_size=12),
        st.booleans(), st.booleans())
    def test_round_trip_property(self, attrs, tid, with_key, sha256) -> None:
        key = b"key" if with_key else None
        raw = stun.encode(stun.BINDING_REQUEST, tid, attrs, integrity_key=key,
                          integrity_sha256=sha256)
        msg = stun.decode(raw)
        self.assertEqual(msg.attributes[:len(attrs)], attrs)
        self.assertEqual(stun.check_integrity(raw, b"key"), with_key)
        frames = stun.StunStreamDecoder(max_size=4096).feed(raw + raw)
        self.assertEqual(len(frames), 2)
