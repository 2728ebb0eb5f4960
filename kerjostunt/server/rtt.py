"""The kernel's RTT of a signaling connection (Linux TCP_INFO).

Calls time both peers' SYNs from each peer's RTT; the kernel knows it from
the TCP and TLS handshakes without a ping (docs/decisions.rst). Used by
``signaling.py``; no Twisted state of its own.
"""

from __future__ import annotations

import socket
import struct
import sys

# Linux ``struct tcp_info`` (include/uapi/linux/tcp.h): the two RTT fields,
# microseconds. tcpi_rtt (smoothed) has been there for ever; tcpi_min_rtt
# since Linux 4.6, so a shorter struct means an older kernel.
TCP_INFO_SIZE = 232
_TCPI_RTT = struct.Struct("=I")
TCPI_RTT_OFFSET = 68
TCPI_MIN_RTT_OFFSET = 148
_NO_SAMPLE = 0xFFFFFFFF  # tcpi_min_rtt before the kernel has a sample (~0U)


def rtt_from_tcp_info(info: bytes) -> float | None:
    """Seconds from a packed ``struct tcp_info``: tcpi_min_rtt, else tcpi_rtt.

    The minimum is the path's base delay without queueing spikes, which is
    what timing both peers' SYNs needs; the smoothed RTT stands in on
    kernels too old to report it. None when neither holds a sample.
    """
    if len(info) >= TCPI_MIN_RTT_OFFSET + 4:
        micros: int = _TCPI_RTT.unpack_from(info, TCPI_MIN_RTT_OFFSET)[0]
        if 0 < micros < _NO_SAMPLE:
            return micros / 1e6
    if len(info) >= TCPI_RTT_OFFSET + 4:
        micros = _TCPI_RTT.unpack_from(info, TCPI_RTT_OFFSET)[0]
        if micros > 0:
            return micros / 1e6
    return None


def tcp_socket_of(transport: object) -> socket.socket | None:
    """The TCP socket under a transport (through the TLS wrapper), or None.

    ``TLSMemoryBIOProtocol.getHandle`` gives the OpenSSL connection, so walk
    down ``.transport`` to ``tcp.Server``; test transports have no socket.
    """
    for _ in range(4):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            is_tcp = handle.family in (socket.AF_INET, socket.AF_INET6) and handle.type == socket.SOCK_STREAM
            return handle if is_tcp else None
        transport = getattr(transport, "transport", None)
    return None


# Other systems' TCP_INFO (FreeBSD, macOS's TCP_CONNECTION_INFO) have other layouts.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None


def has_kernel_rtt(transport: object) -> bool:
    """Can ``kernel_rtt`` answer for this transport? (No system call: once per REGISTER.)"""
    return _TCP_INFO is not None and tcp_socket_of(transport) is not None


def kernel_rtt(transport: object) -> float | None:
    """The kernel's RTT of the connection under ``transport`` (Linux TCP_INFO), or None."""
    sock = tcp_socket_of(transport)
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, TCP_INFO_SIZE)
    except OSError:  # not TCP (a UNIX socket in tests), or closed
        return None
    return rtt_from_tcp_info(info)
