"""TURN (RFC 8656) with TCP allocations (RFC 6062): the messages our relay client sends.

Pure, like :mod:`kerjostunt.wire.stun` whose codec it builds on: the
methods and attributes TURN adds to STUN, the long-term credential key
(RFC 8489 9.2.2: MD5 of ``username:realm:password``), and the TURN REST API
credentials coturn checks with ``use-auth-secret`` (username
``expiry:userid``, password base64 of HMAC-SHA1(secret, username)), which the
STUNT server hands out per call and nobody else needs to store.

Only what a TCP-allocation client uses is here: no ChannelBind, no
Send/Data indications (RFC 6062 data flows on its own connection, raw).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass

from kerjostunt.wire import stun

__all__ = [
    "ALLOCATE", "REFRESH", "CREATE_PERMISSION", "CONNECT", "CONNECTION_BIND", "CONNECTION_ATTEMPT",
    "LIFETIME", "XOR_PEER_ADDRESS", "XOR_RELAYED_ADDRESS", "REQUESTED_TRANSPORT", "CONNECTION_ID",
    "REQUESTED_ADDRESS_FAMILY", "encode_family",
    "TRANSPORT_TCP", "REQUEST", "INDICATION", "SUCCESS", "ERROR",
    "message_type", "Credentials", "rest_credentials", "long_term_key", "encode_transport",
    "encode_lifetime", "decode_lifetime", "encode_connection_id", "decode_connection_id",
]

# Methods (RFC 8656 section 17, RFC 6062 section 6.1).
ALLOCATE = 0x003
REFRESH = 0x004
CREATE_PERMISSION = 0x008
CONNECT = 0x00A
CONNECTION_BIND = 0x00B
CONNECTION_ATTEMPT = 0x00C

# Attributes (RFC 8656 section 18, RFC 6062 section 6.2).
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017  # RFC 6156 (8656 18.8): 0x01 IPv4, 0x02 IPv6
REQUESTED_TRANSPORT = 0x0019
CONNECTION_ID = 0x002A

#: REQUESTED-TRANSPORT's protocol number for a TCP allocation (RFC 6062 5.1)
TRANSPORT_TCP = 6

# Classes (RFC 8489 5).
REQUEST, INDICATION, SUCCESS, ERROR = 0, 1, 2, 3

stun.ATTRIBUTE_NAMES.update({
    LIFETIME: "LIFETIME", XOR_PEER_ADDRESS: "XOR-PEER-ADDRESS",
    XOR_RELAYED_ADDRESS: "XOR-RELAYED-ADDRESS", REQUESTED_TRANSPORT: "REQUESTED-TRANSPORT",
    REQUESTED_ADDRESS_FAMILY: "REQUESTED-ADDRESS-FAMILY",
    CONNECTION_ID: "CONNECTION-ID",
})


def message_type(method: int, msg_class: int) -> int:
    """The 14-bit type: the method's bits with the two class bits between them (RFC 8489 5)."""
    if not 0 <= method <= 0xFFF or not 0 <= msg_class <= 3:
        raise stun.STUNError(f"bad method {method:#x} or class {msg_class}")
    return ((method & 0x00F) | ((method & 0x070) << 1) | ((method & 0xF80) << 2)
            | ((msg_class & 1) << 4) | ((msg_class & 2) << 7))


@dataclass(frozen=True)
class Credentials:
    """One TURN server's long-term credential: what a call hands each side."""

    username: str
    password: str

    def key(self, realm: str) -> bytes:
        return long_term_key(self.username, realm, self.password)


def rest_credentials(secret: bytes, user: str, expiry: int) -> Credentials:
    """The TURN REST API scheme (coturn ``use-auth-secret``): valid until ``expiry`` (Unix time).

    The user ID part only names the allocation in coturn's log and quotas;
    coturn checks the HMAC and that ``expiry`` has not passed.
    """
    username = f"{int(expiry)}:{user}"
    mac = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return Credentials(username, base64.b64encode(mac).decode("ascii"))


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 9.2.2 key for MESSAGE-INTEGRITY: MD5(username ":" realm ":" password).

    Our usernames and passwords are ASCII (REST credentials), for which the
    OpaqueString profile changes nothing.
    """
    text = f"{username}:{realm}:{stun.short_term_key(password).decode('utf-8')}"
    return hashlib.md5(text.encode("utf-8")).digest()


def encode_transport(protocol: int = TRANSPORT_TCP) -> bytes:
    return struct.pack("!B3x", protocol)


def encode_family(ipv6: bool) -> bytes:
    return struct.pack("!B3x", 2 if ipv6 else 1)


def encode_lifetime(seconds: int) -> bytes:
    return struct.pack("!I", max(0, min(int(seconds), 0xFFFFFFFF)))


def decode_lifetime(value: bytes) -> int:
    if len(value) != 4:
        raise stun.STUNError("bad LIFETIME length")
    seconds: int = struct.unpack("!I", value)[0]
    return seconds


def encode_connection_id(connection_id: bytes) -> bytes:
    if len(connection_id) != 4:
        raise stun.STUNError("CONNECTION-ID is 4 bytes")
    return bytes(connection_id)


def decode_connection_id(value: bytes) -> bytes:
    """Opaque 4 bytes: echoed back in ConnectionBind as received (coturn does not byte-swap it)."""
    if len(value) != 4:
        raise stun.STUNError("bad CONNECTION-ID length")
    return bytes(value)
