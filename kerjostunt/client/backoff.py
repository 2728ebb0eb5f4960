"""One jittered exponential backoff for everything on the client that retries.

The agent reconnects its signaling connection, the peer manager redials a
peer, reopens signaling and reloads the trusted peers list: each waits
longer after every failure, up to a cap, and spreads the wait randomly so
that many peers that failed together (a server restart) do not come back in
the same instant. This module is pure: the random draw is passed in, so a
test picks the delay and no reactor is needed.

    delay(attempt, rnd) = min(maximum, initial * 2 ** attempt) * factor
    factor = low + (high - low) * rnd        (rnd in [0, 1))

``attempt`` counts from 0 (the first retry waits about ``initial``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]

#: 2.0 ** 62 times any sane ``initial`` is far above any cap; beyond that floats only overflow.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class Backoff:
    """Exponential growth from ``initial`` to ``maximum``, times a factor drawn in ``[low, high]``.

    ``low``/``high`` say how the jitter spreads: ``(0.5, 1.5)`` scatters
    around the nominal delay (the agent's reconnect), ``(1 - j, 1.0)``
    takes up to a fraction ``j`` off the top and so never exceeds
    ``maximum`` (the peer manager's retries).
    """

    initial: float = 1.0
    maximum: float = 60.0
    low: float = 0.5
    high: float = 1.5

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0:
            raise ValueError("backoff delays cannot be negative")
        if self.low < 0 or self.high < 0:
            raise ValueError("the jitter factors cannot be negative")

    @classmethod
    def capped(cls, initial: float, maximum: float, jitter: float) -> Backoff:
        """Up to ``jitter`` (a fraction, 0..1) taken off the top: never above ``maximum``."""
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, not {jitter!r}")
        return cls(initial, maximum, low=1.0, high=1.0 - jitter)

    def nominal(self, attempt: int) -> float:
        """The delay before jitter: ``initial`` doubled ``attempt`` times, at most ``maximum``."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        return min(self.maximum, self.initial * (2.0**exponent))

    def delay(self, attempt: int, rnd: float) -> float:
        """The wait before retry number ``attempt`` (0-based) for the random draw ``rnd`` in [0, 1)."""
        return self.nominal(attempt) * (self.low + (self.high - self.low) * rnd)
