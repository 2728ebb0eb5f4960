"""A small, strict RFC 8489 STUN codec.

Pure: no Twisted, no sockets.  Both the probe server (``kerjostunt.server.probe``)
and the client (``kerjostunt.client.nat.probing``) use it, so anything a peer
sends goes through :func:`decode`, which only ever raises :class:`STUNError`.

Over TCP, STUN messages are sent back to back with no extra framing
(RFC 8489 section 6.2.2); the header's length field delimits them, which is
what :class:`StunStreamDecoder` does.

Private attribute
-----------------

``KERJO-LOCAL-PORT`` (``0xBF4B``, comprehension-optional so any standard
server ignores it): the local TCP port the client probes from, as a 16-bit
unsigned integer in network order followed by two zero bytes (value length 4).
A NAT rewrites the transport port, never this attribute, so the server learns
both sides of the mapping from one request.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "MAGIC_COOKIE", "HEADER_LENGTH", "MAX_MESSAGE_SIZE",
    "BINDING_REQUEST", "BINDING_SUCCESS", "BINDING_ERROR",
    "MAPPED_ADDRESS", "USERNAME", "MESSAGE_INTEGRITY", "ERROR_CODE",
    "UNKNOWN_ATTRIBUTES", "REALM", "NONCE", "MESSAGE_INTEGRITY_SHA256",
    "PASSWORD_ALGORITHM", "USERHASH", "XOR_MAPPED_ADDRESS",
    "PASSWORD_ALGORITHMS", "ALTERNATE_DOMAIN", "SOFTWARE", "ALTERNATE_SERVER",
    "FINGERPRINT", "RESPONSE_ORIGIN", "OTHER_ADDRESS", "KERJO_LOCAL_PORT", "CHANGE_REQUEST",
    "CHANGE_IP", "CHANGE_PORT", "encode_change_request", "decode_change_request",
    "ATTRIBUTE_NAMES", "STUNError", "StunMessage", "encode", "decode",
    "check_integrity", "encode_address", "decode_address",
    "encode_xor_address", "decode_xor_address", "encode_error_code",
    "decode_error_code", "encode_unknown_attributes", "encode_local_port",
    "decode_local_port", "short_term_key", "new_transaction_id",
    "peek_header", "StunStreamDecoder", "binding_request",
    "parse_binding_response", "is_request", "is_success", "is_error",
]

MAGIC_COOKIE = 0x2112A442
HEADER_LENGTH = 20
MAX_MESSAGE_SIZE = 2048
FINGERPRINT_XOR = 0x5354554E

# Binding method, three classes (RFC 8489 section 5 / 18.2).
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Comprehension-required attributes (0x0000-0x7FFF).
MAPPED_ADDRESS = 0x0001
#: RFC 5780 7.2: flags asking for the answer from the other IP and/or port
CHANGE_REQUEST = 0x0003
CHANGE_IP = 0x04
CHANGE_PORT = 0x02
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020

# Comprehension-optional attributes (0x8000-0xFFFF).
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C
#: kerjostunt private: the client's local port (see module docstring).
KERJO_LOCAL_PORT = 0xBF4B
#: kerjostunt private (request, empty): "connect back to my mapped address" (docs/probes.rst)
KERJO_CONNECT_BACK = 0xBF4C
#: kerjostunt private (response): how that connect ended, one ASCII word
KERJO_CONNECT_BACK_RESULT = 0xBF4D
#: kerjostunt private: asked (request, empty), the server's probe addresses as the
#: answer's value, comma-separated IP literals (``X-Kerjo-Probe-IPs``'s format)
KERJO_PROBE_IPS = 0xBF4E

ATTRIBUTE_NAMES = {
    MAPPED_ADDRESS: "MAPPED-ADDRESS",
    CHANGE_REQUEST: "CHANGE-REQUEST",
    USERNAME: "USERNAME",
    MESSAGE_INTEGRITY: "MESSAGE-INTEGRITY",
    ERROR_CODE: "ERROR-CODE",
    UNKNOWN_ATTRIBUTES: "UNKNOWN-ATTRIBUTES",
    REALM: "REALM",
    NONCE: "NONCE",
    MESSAGE_INTEGRITY_SHA256: "MESSAGE-INTEGRITY-SHA256",
    PASSWORD_ALGORITHM: "PASSWORD-ALGORITHM",
    USERHASH: "USERHASH",
    XOR_MAPPED_ADDRESS: "XOR-MAPPED-ADDRESS",
    PASSWORD_ALGORITHMS: "PASSWORD-ALGORITHMS",
    ALTERNATE_DOMAIN: "ALTERNATE-DOMAIN",
    SOFTWARE: "SOFTWARE",
    ALTERNATE_SERVER: "ALTERNATE-SERVER",
    FINGERPRINT: "FINGERPRINT",
    RESPONSE_ORIGIN: "RESPONSE-ORIGIN",
    OTHER_ADDRESS: "OTHER-ADDRESS",
    KERJO_LOCAL_PORT: "KERJO-LOCAL-PORT",
    KERJO_CONNECT_BACK: "KERJO-CONNECT-BACK",
    KERJO_CONNECT_BACK_RESULT: "KERJO-CONNECT-BACK-RESULT",
    KERJO_PROBE_IPS: "KERJO-PROBE-IPS",
}

_HEADER = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_MI_LEN = {MESSAGE_INTEGRITY: 20, MESSAGE_INTEGRITY_SHA256: 32}


class STUNError(Exception):
    """Anything wrong with a STUN message, or an error response."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        #: the ERROR-CODE of an error response, when this wraps one
        self.code = code


@dataclass
class StunMessage:
    msg_type: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, attr_type: int) -> bytes | None:
        """The first value of an attribute (RFC 8489: later duplicates are ignored)."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def has(self, attr_type: int) -> bool:
        return any(t == attr_type for t, _ in self.attributes)

    @property
    def method(self) -> int:
        t = self.msg_type
        return (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)

    @property
    def msg_class(self) -> int:
        """0 request, 1 indication, 2 success response, 3 error response."""
        t = self.msg_type
        return ((t >> 4) & 1) | ((t >> 7) & 2)


def is_request(msg: StunMessage) -> bool:
    return msg.msg_class == 0


def is_success(msg: StunMessage) -> bool:
    return msg.msg_class == 2


def is_error(msg: StunMessage) -> bool:
    return msg.msg_class == 3


def new_transaction_id() -> bytes:
    return os.urandom(12)


def short_term_key(password: str) -> bytes:
    """RFC 8489 9.1.1: the key is the OpaqueString-processed password.

    Our probe passwords are URL-safe ASCII, for which OpaqueString is the
    identity; for other input we apply the part of OpaqueString (RFC 8265
    4.2.2) that matters in practice: map non-ASCII spaces to U+0020 and NFC.
    """
    import unicodedata

    mapped = "".join(" " if (c != " " and unicodedata.category(c) == "Zs") else c
                     for c in password)
    return unicodedata.normalize("NFC", mapped).encode("utf-8")


# --- attribute values -----------------------------------------------------

def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def encode_address(addr: tuple[str, int]) -> bytes:
    ip, port = addr
    try:
        a = ipaddress.ip_address(ip)
    except ValueError as e:
        raise STUNError(f"bad address {ip!r}") from e
    if not 0 <= port <= 0xFFFF:
        raise STUNError(f"bad port {port!r}")
    family = 1 if a.version == 4 else 2
    return struct.pack("!BBH", 0, family, port) + a.packed


def decode_address(value: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise STUNError("address attribute too short")
    _, family, port = struct.unpack("!BBH", value[:4])
    raw = value[4:]
    if family == 1 and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw)), port
    if family == 2 and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw)), port
    raise STUNError(f"bad address family {family} / length {len(value)}")


def _xor_pad(transaction_id: bytes) -> bytes:
    if len(transaction_id) != 12:
        raise STUNError("transaction id must be 12 bytes")
    return struct.pack("!I", MAGIC_COOKIE) + transaction_id


def _xor(value: bytes, transaction_id: bytes) -> bytes:
    pad = _xor_pad(transaction_id)
    head, port, raw = value[:2], value[2:4], value[4:]
    port = bytes(a ^ b for a, b in zip(port, pad[:2]))
    raw = bytes(a ^ b for a, b in zip(raw, pad))
    return head + port + raw


def encode_xor_address(value: tuple[str, int], transaction_id: bytes) -> bytes:
    return _xor(encode_address(value), transaction_id)


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    if len(value) < 4:
        raise STUNError("address attribute too short")
    return decode_address(_xor(value, transaction_id))


def encode_error_code(code: int, reason: str = "") -> bytes:
    if not 300 <= code <= 699:
        raise STUNError(f"bad error code {code}")
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")[:763]


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise STUNError("ERROR-CODE too short")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise STUNError("bad ERROR-CODE")
    return cls * 100 + number, value[4:].decode("utf-8", "replace")


def encode_unknown_attributes(types: list[int]) -> bytes:
    return b"".join(struct.pack("!H", t) for t in types)


def encode_change_request(change_ip: bool = False, change_port: bool = False) -> bytes:
    """CHANGE-REQUEST's 32-bit flags (RFC 5780 7.2); both False is what stuntman always sends."""
    return struct.pack("!I", (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0))


def decode_change_request(value: bytes) -> tuple[bool, bool]:
    """(change IP, change port) of a CHANGE-REQUEST; other bits are ignored."""
    if len(value) != 4:
        raise STUNError("bad CHANGE-REQUEST length")
    flags: int = struct.unpack("!I", value)[0]
    return bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT)


def encode_local_port(port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise STUNError(f"bad port {port!r}")
    return struct.pack("!HH", port, 0)


def decode_local_port(value: bytes) -> int:
    if len(value) not in (2, 4):
        raise STUNError("bad KERJO-LOCAL-PORT length")
    port: int = struct.unpack("!H", value[:2])[0]
    return port


# --- messages -------------------------------------------------------------

def _header(msg_type: int, length: int, transaction_id: bytes) -> bytes:
    return _HEADER.pack(msg_type, length, MAGIC_COOKIE, transaction_id)


def _attr(attr_type: int, value: bytes) -> bytes:
    return _ATTR.pack(attr_type, len(value)) + value + b"\x00" * _pad(len(value))


def _fingerprint(data: bytes) -> int:
    return (binascii.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


def _hmac(attr_type: int, key: bytes, data: bytes) -> bytes:
    algo = hashlib.sha1 if attr_type == MESSAGE_INTEGRITY else hashlib.sha256
    return hmac.new(key, data, algo).digest()


def encode(msg_type: int, transaction_id: bytes, attributes: list[tuple[int, bytes]],
           *, integrity_key: bytes | None = None, integrity_sha256: bool = False,
           fingerprint: bool = True) -> bytes:
    """Serialize a message; integrity and fingerprint are appended last, in that order."""
    if not 0 <= msg_type <= 0x3FFF:
        raise STUNError(f"bad message type {msg_type:#x}")
    if len(transaction_id) != 12:
        raise STUNError("transaction id must be 12 bytes")
    body = b"".join(_attr(t, v) for t, v in attributes)
    if integrity_key is not None:
        mi_type = MESSAGE_INTEGRITY_SHA256 if integrity_sha256 else MESSAGE_INTEGRITY
        mi_len = 4 + _MI_LEN[mi_type]
        head = _header(msg_type, len(body) + mi_len, transaction_id)
        body += _attr(mi_type, _hmac(mi_type, integrity_key, head + body))
    if fingerprint:
        head = _header(msg_type, len(body) + 8, transaction_id)
        body += _attr(FINGERPRINT, struct.pack("!I", _fingerprint(head + body)))
    out = _header(msg_type, len(body), transaction_id) + body
    if len(out) > 0xFFFF + HEADER_LENGTH:
        raise STUNError("message too long")
    return out


def peek_header(data: bytes) -> tuple[int, int, bytes]:
    """Validate a 20-byte header: (msg_type, body length, transaction id)."""
    if len(data) < HEADER_LENGTH:
        raise STUNError("short header")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise STUNError("not a STUN message (first two bits)")
    if cookie != MAGIC_COOKIE:
        raise STUNError("bad magic cookie")
    if length % 4:
        raise STUNError("length not a multiple of 4")
    return msg_type, length, tid


def _walk(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """Yield (type, value, offset of attribute start) over the body."""
    offset = HEADER_LENGTH
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise STUNError("truncated attribute header")
        t, n = _ATTR.unpack_from(data, offset)
        vstart = offset + 4
        if vstart + n > end:
            raise STUNError("attribute overruns message")
        yield t, data[vstart:vstart + n], offset
        offset = vstart + n + _pad(n)
        if offset > end:
            raise STUNError("attribute padding overruns message")


def decode(data: bytes) -> StunMessage:
    """Parse exactly one message; a FINGERPRINT, when present, must be right."""
    try:
        data = bytes(data)
        msg_type, length, tid = peek_header(data)
        if len(data) != HEADER_LENGTH + length:
            raise STUNError("length field does not match data")
        attributes: list[tuple[int, bytes]] = []
        seen_fingerprint = False
        for t, v, off in _walk(data):
            if seen_fingerprint:
                raise STUNError("attribute after FINGERPRINT")
            if t == FINGERPRINT:
                if len(v) != 4:
                    raise STUNError("bad FINGERPRINT length")
                head = data[:2] + struct.pack("!H", off + 8 - HEADER_LENGTH) + data[4:off]
                if struct.unpack("!I", v)[0] != _fingerprint(head):
                    raise STUNError("FINGERPRINT mismatch")
                seen_fingerprint = True
            elif t in _MI_LEN and len(v) != _MI_LEN[t] and not (
                    t == MESSAGE_INTEGRITY_SHA256 and 16 <= len(v) <= 32 and len(v) % 4 == 0):
                raise STUNError(f"bad {ATTRIBUTE_NAMES[t]} length")
            attributes.append((t, v))
        return StunMessage(msg_type, tid, attributes)
    except STUNError:
        raise
    except Exception as e:  # belt and braces: callers rely on STUNError only
        raise STUNError(f"undecodable message: {e!r}") from e


def check_integrity(raw: bytes, key: bytes) -> bool:
    """True when the message carries MESSAGE-INTEGRITY(-SHA256) and every one present is right.

    Attributes after the integrity attribute (FINGERPRINT, or a SHA256 one
    after a SHA1 one) are excluded from the HMAC as RFC 8489 14.5/14.6 say:
    the header length is rewritten to end just after the integrity attribute.
    """
    try:
        raw = bytes(raw)
        peek_header(raw)
        checked = False
        for t, v, off in _walk(raw):
            if t not in _MI_LEN:
                continue
            head = raw[:2] + struct.pack("!H", off + 4 + len(v) - HEADER_LENGTH) + raw[4:off]
            mac = _hmac(t, key, head)[:len(v)]
            if len(v) < (20 if t == MESSAGE_INTEGRITY else 16) or not hmac.compare_digest(mac, v):
                return False
            checked = True
        return checked
    except STUNError:
        return False


class StunStreamDecoder:
    """Frames STUN messages out of a TCP byte stream.

    :meth:`feed_frames` gives raw frames once their header is valid (so a
    server can still answer a frame whose body is malformed with a 400);
    :meth:`feed` decodes them too.  A bad header or a message longer than
    ``max_size`` raises :class:`STUNError`: the stream cannot be resynced,
    so the connection should be closed.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed_frames(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER_LENGTH:
            _, length, _ = peek_header(bytes(self._buf[:HEADER_LENGTH]))
            total = HEADER_LENGTH + length
            if total > self.max_size:
                raise STUNError(f"message of {total} bytes exceeds {self.max_size}")
            if len(self._buf) < total:
                break
            frames.append(bytes(self._buf[:total]))
            del self._buf[:total]
        if len(self._buf) > self.max_size:  # unreachable with a valid header, kept as a guard
            raise STUNError("buffer overflow")
        return frames

    def feed(self, data: bytes) -> list[tuple[StunMessage, bytes]]:
        return [(decode(f), f) for f in self.feed_frames(data)]

    @property
    def pending(self) -> int:
        return len(self._buf)


# --- Binding helpers ------------------------------------------------------

def binding_request(*, username: str | None = None, key: bytes | None = None,
                    local_port: int | None = None, transaction_id: bytes | None = None,
                    software: str | None = None,
                    integrity_sha256: bool = False) -> tuple[bytes, bytes]:
    """A Binding request: (wire bytes, transaction id)."""
    tid = transaction_id if transaction_id is not None else new_transaction_id()
    attrs: list[tuple[int, bytes]] = []
    if username is not None:
        attrs.append((USERNAME, username.encode("utf-8")))
    if software is not None:
        attrs.append((SOFTWARE, software.encode("utf-8")))
    if local_port is not None:
        attrs.append((KERJO_LOCAL_PORT, encode_local_port(local_port)))
    return encode(BINDING_REQUEST, tid, attrs, integrity_key=key,
                  integrity_sha256=integrity_sha256), tid


def parse_binding_response(raw_or_msg: bytes | StunMessage, transaction_id: bytes,
                           *, key: bytes | None = None) -> tuple[str, int]:
    """The mapped (ip, port) of a Binding success response.

    Raises :class:`STUNError` for a wrong transaction, an error response
    (``.code`` set), a missing address, or (when ``key`` is given and raw
    bytes are passed) a success response without a good MESSAGE-INTEGRITY.
    """
    if isinstance(raw_or_msg, StunMessage):
        msg = raw_or_msg
    else:
        msg = decode(raw_or_msg)
        # Error responses to short-term credential failures (401) carry no
        # integrity (RFC 8489 9.1.3), so only a success is checked.
        if key is not None and msg.msg_type == BINDING_SUCCESS \
                and not check_integrity(raw_or_msg, key):
            raise STUNError("response integrity check failed")
    if msg.transaction_id != transaction_id:
        raise STUNError("transaction id mismatch")
    if msg.msg_type == BINDING_ERROR:
        value = msg.get(ERROR_CODE)
        code, reason = decode_error_code(value) if value else (None, "")
        raise STUNError(f"error response {code} {reason}".strip(), code=code)
    if msg.msg_type != BINDING_SUCCESS:
        raise STUNError(f"not a Binding success response: {msg.msg_type:#06x}")
    value = msg.get(XOR_MAPPED_ADDRESS)
    if value is not None:
        return decode_xor_address(value, transaction_id)
    value = msg.get(MAPPED_ADDRESS)
    if value is not None:
        return decode_address(value)
    raise STUNError("no mapped address in response")
