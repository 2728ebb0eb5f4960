"""TCP socket options both the server and the client set on their connections."""

from __future__ import annotations

from typing import Any

__all__ = ["no_delay"]


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off where the transport has it (TLS passes it on).

    With it, a message written while an earlier one is unacknowledged waits
    for that ACK, which the peer may delay by 40 ms: the 200 to a caller that
    had just got its 100 Trying reached it 40 ms after the ACK reached the
    callee, and the two sides' dial moments were 40 ms apart (NAT lab).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
