"""The two small UDP protocols a client asks its gateway for a port mapping with.

PCP (RFC 6887) and its predecessor NAT-PMP (RFC 6886) share the gateway's
UDP port 5351, so one request can tell which one the gateway speaks: a
NAT-PMP-only gateway answers a PCP request (version 2) with a version 0
"unsupported version" reply (RFC 6887 section 9), and the client asks again
in NAT-PMP. Only what kerjostunt uses is here: PCP MAP for TCP without
options, NAT-PMP's external address and TCP mapping requests. Pure codecs
(standard library only); ``client/nat/portmap.py`` sends them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PORT", "PCP_VERSION", "NATPMP_VERSION", "PortmapError", "UnsupportedVersion",
    "PCPMapRequest", "PCPMapResponse", "NATPMPMapRequest", "NATPMPMapResponse",
    "encode_natpmp_address_request", "decode_natpmp_address_response", "decode_pcp_response",
    "decode_natpmp_map_response", "PCP_RESULTS", "NATPMP_RESULTS",
]

PORT = 5351  # the gateway's port for both (RFC 6887 section 19.1, RFC 6886 section 3.1)
PCP_VERSION = 2
NATPMP_VERSION = 0
TCP = 6  # IANA protocol number, PCP's MAP protocol field
_PCP_MAP = 1
_NATPMP_TCP = 2
_RESPONSE = 0x80

PCP_RESULTS = {
    0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST", 4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE", 8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA", 11: "CANNOT_PROVIDE_EXTERNAL", 12: "ADDRESS_MISMATCH", 13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS = {
    0: "success", 1: "unsupported version", 2: "not authorized or refused", 3: "network failure",
    4: "out of resources", 5: "unsupported opcode",
}

_PCP_HEADER = struct.Struct("!BBHI16s")  # version, R|opcode, reserved, lifetime, client address
_PCP_RESPONSE_HEADER = struct.Struct("!BBBBII12s")  # version, R|opcode, reserved, result, lifetime, epoch
_PCP_MAP_BODY = struct.Struct("!12sB3sHH16s")  # nonce, protocol, reserved, internal, external port, address
_NATPMP_MAP = struct.Struct("!BBHHHI")
_NATPMP_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_NATPMP_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")


class PortmapError(ValueError):
    """A datagram that is not the answer asked for."""


class UnsupportedVersion(PortmapError):
    """A NAT-PMP gateway's reply to a PCP request: ask again in NAT-PMP."""


def _address16(ip: str) -> bytes:
    """PCP carries every address in 16 bytes, IPv4 as IPv4-mapped IPv6."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address("::ffff:" + ip).packed
    return address.packed


def _from16(raw: bytes) -> str:
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else str(address)


@dataclass(frozen=True)
class PCPMapRequest:
    """MAP for TCP; lifetime 0 deletes the mapping the same nonce made (RFC 6887 section 15)."""

    nonce: bytes
    client_ip: str
    internal_port: int
    lifetime: int
    suggested_port: int = 0
    suggested_ip: str = "::"

    def to_bytes(self) -> bytes:
        if len(self.nonce) != 12:
            raise ValueError("a PCP nonce is 12 bytes")
        header = _PCP_HEADER.pack(PCP_VERSION, _PCP_MAP, 0, self.lifetime, _address16(self.client_ip))
        body = _PCP_MAP_BODY.pack(self.nonce, TCP, b"\0\0\0", self.internal_port, self.suggested_port,
                                  _address16(self.suggested_ip) if self.suggested_ip != "::" else bytes(16))
        return header + body


@dataclass(frozen=True)
class PCPMapResponse:
    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    internal_port: int
    external_port: int
    external_ip: str

    @property
    def ok(self) -> bool:
        return self.result == 0

    @property
    def reason(self) -> str:
        return PCP_RESULTS.get(self.result, f"result {self.result}")

    def to_bytes(self) -> bytes:
        """What a gateway sends (the tests' fake gateway)."""
        header = _PCP_RESPONSE_HEADER.pack(PCP_VERSION, _RESPONSE | _PCP_MAP, 0, self.result, self.lifetime,
                                           self.epoch, bytes(12))
        return header + _PCP_MAP_BODY.pack(self.nonce, TCP, b"\0\0\0", self.internal_port, self.external_port,
                                           _address16(self.external_ip))


def decode_pcp_response(data: bytes) -> PCPMapResponse:
    """A MAP response; UnsupportedVersion for a NAT-PMP gateway's version 0 reply."""
    if len(data) >= 4 and data[0] == NATPMP_VERSION:
        raise UnsupportedVersion("the gateway speaks NAT-PMP")
    if len(data) < _PCP_RESPONSE_HEADER.size + _PCP_MAP_BODY.size or len(data) > 1100 or len(data) % 4:
        raise PortmapError("not a PCP MAP response")
    version, opcode, _, result, lifetime, epoch, _ = _PCP_RESPONSE_HEADER.unpack_from(data)
    if version != PCP_VERSION or opcode != _RESPONSE | _PCP_MAP:
        raise PortmapError("not a PCP MAP response")
    nonce, protocol, _, internal, external, address = _PCP_MAP_BODY.unpack_from(data, _PCP_RESPONSE_HEADER.size)
    if result == 0 and protocol != TCP:
        raise PortmapError("a mapping of another protocol")
    return PCPMapResponse(result, lifetime, epoch, nonce, internal, external, _from16(address))


def encode_natpmp_address_request() -> bytes:
    return bytes([NATPMP_VERSION, 0])


def decode_natpmp_address_response(data: bytes) -> tuple[int, str]:
    """(result code, external IPv4 address)."""
    if len(data) != _NATPMP_ADDRESS_RESPONSE.size:
        raise PortmapError("not a NAT-PMP address response")
    version, opcode, result, _epoch, raw = _NATPMP_ADDRESS_RESPONSE.unpack(data)
    if version != NATPMP_VERSION or opcode != _RESPONSE:
        raise PortmapError("not a NAT-PMP address response")
    return result, str(ipaddress.IPv4Address(raw))


@dataclass(frozen=True)
class NATPMPMapRequest:
    """A TCP mapping; lifetime 0 (and suggested port 0) deletes it (RFC 6886 section 3.4)."""

    internal_port: int
    lifetime: int
    suggested_port: int = 0

    def to_bytes(self) -> bytes:
        return _NATPMP_MAP.pack(NATPMP_VERSION, _NATPMP_TCP, 0, self.internal_port, self.suggested_port,
                                self.lifetime)


@dataclass(frozen=True)
class NATPMPMapResponse:
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int

    @property
    def ok(self) -> bool:
        return self.result == 0

    @property
    def reason(self) -> str:
        return NATPMP_RESULTS.get(self.result, f"result {self.result}")

    def to_bytes(self) -> bytes:
        return _NATPMP_MAP_RESPONSE.pack(NATPMP_VERSION, _RESPONSE | _NATPMP_TCP, self.result, self.epoch,
                                         self.internal_port, self.external_port, self.lifetime)


def decode_natpmp_map_response(data: bytes) -> NATPMPMapResponse:
    if len(data) != _NATPMP_MAP_RESPONSE.size:
        raise PortmapError("not a NAT-PMP mapping response")
    version, opcode, result, epoch, internal, external, lifetime = _NATPMP_MAP_RESPONSE.unpack(data)
    if version != NATPMP_VERSION or opcode != _RESPONSE | _NATPMP_TCP:
        raise PortmapError("not a NAT-PMP TCP mapping response")
    return NATPMPMapResponse(result, epoch, internal, external, lifetime)


def natpmp_address_response(result: int, epoch: int, ip: str) -> bytes:
    """What a gateway sends (the tests' fake gateway)."""
    return _NATPMP_ADDRESS_RESPONSE.pack(NATPMP_VERSION, _RESPONSE, result, epoch, ipaddress.IPv4Address(ip).packed)


def decode_pcp_map_request(data: bytes) -> PCPMapRequest:
    """The gateway's side (the tests' fake gateway)."""
    if len(data) < _PCP_HEADER.size + _PCP_MAP_BODY.size:
        raise PortmapError("short PCP request")
    version, opcode, _, lifetime, client = _PCP_HEADER.unpack_from(data)
    if version != PCP_VERSION or opcode != _PCP_MAP:
        raise PortmapError("not a PCP MAP request")
    nonce, _, _, internal, suggested, address = _PCP_MAP_BODY.unpack_from(data, _PCP_HEADER.size)
    suggested_ip = _from16(address) if any(address) else "::"
    return PCPMapRequest(nonce, _from16(client), internal, lifetime, suggested, suggested_ip)


def decode_natpmp_map_request(data: bytes) -> NATPMPMapRequest:
    """The gateway's side (the tests' fake gateway)."""
    if len(data) != _NATPMP_MAP.size:
        raise PortmapError("not a NAT-PMP mapping request")
    version, opcode, _, internal, suggested, lifetime = _NATPMP_MAP.unpack(data)
    if version != NATPMP_VERSION or opcode != _NATPMP_TCP:
        raise PortmapError("not a NAT-PMP TCP mapping request")
    return NATPMPMapRequest(internal, lifetime, suggested)
