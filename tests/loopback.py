"""Test protocols for real loopback connections."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol


class WaitsForData(Protocol):
    """Collects what it receives in ``data``; ``wait_for(marker)`` fires with it once ``marker`` is in."""

    def __init__(self) -> None:
        self.data = b""
        self.waiting: tuple[bytes, Deferred] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.waiting and self.waiting[0] in self.data:
            d, self.waiting = self.waiting[1], None
            d.callback(self.data)

    def wait_for(self, marker: bytes) -> Deferred:
        d: Deferred = Deferred()
        if marker in self.data:
            d.callback(self.data)
        else:
            self.waiting = (marker, d)
        return d
