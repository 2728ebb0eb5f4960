"""What the cluster bus sends, gathered per reactor turn and packed per channel.

A call that crosses instances is about ten SIP messages, and several of them
are often made in one reactor turn (one read of TLS records can hold a
callee's 180 and 200, a turn can answer many callers). Sent one ``NOTIFY``
each, every message is a statement PostgreSQL parses and runs, a queue
entry, a wake-up of each listening backend and a notification the
receiving instance reads: that per-message work, not the bytes, is what
the bus costs (docs/performance.rst, "Crossing calls, third round").

So ``Outbox`` sends at once when nothing is in flight, and gathers what
is added while a round trip is out for the next one, sent when it comes
back. Two other rules were measured and are kept as options: sending at
the end of the reactor turn (``at_once=False``, a ``callLater(0)``) and
holding sends ``spacing`` seconds apart; at a few hundred crossing calls
a second neither gathered much more per transaction, and both delayed
every hop (docs/performance.rst). The payloads for one channel go as few notifications as fit,
newline-separated, each at most ``limit`` bytes (PostgreSQL refuses 8000).
Payloads therefore never contain a newline (JSON and base64 do not). Order
is kept per channel, which is the order a listener of that channel sees;
notifications to different channels in one batch commit together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

MAX_PAYLOAD = 7900  # bytes of one notification (PostgreSQL: under 8000)
SEND_BATCH = 200    # notifications per round trip at most
SPACING = 0.0       # seconds between the starts of two sends at least
AT_ONCE = True      # an idle outbox sends within add (False: at the end of the turn)
SEPARATOR = "\n"


def pack(items: list[tuple[str, str, int]], limit: int = MAX_PAYLOAD) -> list[tuple[str, str]]:
    """``(channel, payload, size in bytes)`` as notifications: each channel's payloads joined, in order.

    Channels come in the order of their first payload; a payload never
    exceeds ``limit`` (``Outbox.add`` refuses larger ones).
    """
    parts: dict[str, list[list[str]]] = {}
    sizes: dict[str, int] = {}
    for channel, payload, size in items:
        groups = parts.get(channel)
        if groups is None:
            parts[channel] = [[payload]]
            sizes[channel] = size
        elif sizes[channel] + 1 + size <= limit:
            groups[-1].append(payload)
            sizes[channel] += 1 + size
        else:
            groups.append([payload])
            sizes[channel] = size
    return [(channel, SEPARATOR.join(group)) for channel, groups in parts.items() for group in groups]


def unpack(payload: str) -> list[str]:
    """The payloads one notification carries."""
    return payload.split(SEPARATOR)


class Outbox:
    """One sender's queue: ``send(notifications)`` at most once in flight, ``sent()`` when it is done.

    ``send`` is called inside ``add`` or ``sent`` when nothing is in flight
    (or, with ``at_once=False`` or a ``spacing``, from a timer of
    ``clock``); it may raise, which ``failed`` hears.
    """

    def __init__(self, clock: IReactorTime, send: Callable[[list[tuple[str, str]]], None],
                 failed: Callable[[str], None], limit: int = MAX_PAYLOAD, batch: int = SEND_BATCH,
                 spacing: float = SPACING, at_once: bool = AT_ONCE) -> None:
        self._clock = clock
        self._at_once = at_once
        self._spacing = spacing
        self._last = float("-inf")  # when the last send started
        self._send = send
        self._failed = failed
        self._limit = limit
        self._batch = batch
        self._queue: list[tuple[str, str, int]] = []
        self._turn: Any = None  # the pending end-of-turn flush
        self._in_flight = False
        self._open = False
        self._closed = False
        self._flushed: list[Deferred[None]] = []

    def __len__(self) -> int:
        """Payloads waiting (not yet handed to ``send``)."""
        return len(self._queue)

    def add(self, channel: str, payload: str) -> bool:
        """Queue one payload; False (logged, dropped) when it is too large or has a newline."""
        size = len(payload) if payload.isascii() else len(payload.encode())
        if size > self._limit or SEPARATOR in payload:
            log.warn("Dropped a {size}-byte notification to {channel} (too large or multi-line)", size=size,
                     channel=channel)
            return False
        if self._closed:
            return True  # as a lost connection would lose it; the owner hears of the loss separately
        self._queue.append((channel, payload, size))
        self._schedule()
        return True

    def start(self) -> None:
        """The connection is up: what was added before goes now."""
        self._open = True
        self._schedule()

    def sent(self) -> None:
        """The round trip in flight is done."""
        self._in_flight = False
        self._schedule()
        self._wake_if_idle()

    def flushed(self) -> Deferred[None]:
        """Fires when everything added so far has been sent (or the outbox closed)."""
        d: Deferred[None] = Deferred()
        self._flushed.append(d)
        self._wake_if_idle()
        return d

    def close(self) -> None:
        """Nothing more goes; what is queued is dropped, waiters fire."""
        self._closed = True
        self._queue = []
        if self._turn is not None and self._turn.active():
            self._turn.cancel()
        self._turn = None
        self._wake_if_idle()

    def _schedule(self) -> None:
        if self._queue and self._open and not self._in_flight and not self._closed and self._turn is None:
            wait = self._last + self._spacing - self._clock.seconds()
            if self._at_once and wait <= 0:
                self._flush()
            else:
                self._turn = self._clock.callLater(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        self._turn = None
        if not self._queue or self._in_flight or self._closed:
            return
        notes = pack(self._queue, self._limit)
        if len(notes) > self._batch:
            # the rest waits for the next round trip; re-packing it then is cheap and keeps order
            taken = _payloads_in(notes[:self._batch])
            notes, self._queue = notes[:self._batch], _without(self._queue, taken)
        else:
            self._queue = []
        self._in_flight = True
        self._last = self._clock.seconds()
        try:
            self._send(notes)
        except Exception as exc:  # psycopg2.Error: the connection broke
            self._in_flight = False
            self._failed(f"sending: {exc}")

    def _wake_if_idle(self) -> None:
        if self._closed or (not self._queue and not self._in_flight and self._turn is None):
            waiters, self._flushed = self._flushed, []
            for waiter in waiters:
                waiter.callback(None)


def _payloads_in(notes: list[tuple[str, str]]) -> dict[str, int]:
    """How many payloads of each channel these notifications carry."""
    counts: dict[str, int] = {}
    for channel, text in notes:
        counts[channel] = counts.get(channel, 0) + text.count(SEPARATOR) + 1
    return counts


def _without(queue: list[tuple[str, str, int]], taken: dict[str, int]) -> list[tuple[str, str, int]]:
    """The queue less the first ``taken[channel]`` payloads of each channel (order otherwise kept)."""
    left = dict(taken)
    rest = []
    for item in queue:
        if left.get(item[0], 0) > 0:
            left[item[0]] -= 1
        else:
            rest.append(item)
    return rest
