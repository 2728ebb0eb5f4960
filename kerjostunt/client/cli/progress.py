"""What the client commands print while they wait, and how they print it.

``Progress``: a step that takes more than a second gets one line on stderr
(``registering…``, ``calling bob…``, ``punching (simultaneous open)…``,
``loading the peers list of friends…``), so a user sees what is being
waited for; quicker steps print nothing, and ``-q`` silences them all. The
echo commands, ``peers`` and ``join`` use it. ``Output``: stdout lines that end the command
quietly when the reader goes away (``kerjostunt join | head -5``), instead
of a BrokenPipeError traceback per line while the command keeps running.
``bounded``: a step that must end within the command's ``--timeout``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

__all__ = ["Progress", "Output", "bounded", "PROGRESS_DELAY"]

#: a step shorter than this prints no progress line (seconds)
PROGRESS_DELAY = 1.0

_T = TypeVar("_T")


class Progress:
    """One line on ``stream`` for each step still running after ``PROGRESS_DELAY``.

    ``step``/``done``: one step at a time, each replacing the last (echo-*,
    peers). ``begin``/``end``: steps under a key that run side by side
    (``join`` calls several peers at once; each key has its own second).
    """

    def __init__(self, clock: IReactorTime, stream: TextIO, quiet: bool = False) -> None:
        self._clock = clock
        self._stream = stream
        self._quiet = quiet
        self._pending: dict[object, IDelayedCall] = {}
        self.shown: list[str] = []

    def step(self, text: str) -> None:
        """A new step begins (the previous one is over)."""
        self.begin(None, text)

    def done(self) -> None:
        """Nothing is being waited for now."""
        self.end(None)

    def begin(self, key: object, text: str) -> None:
        """Step ``key`` is now ``text`` (its previous text, if any, is over)."""
        self.end(key)
        if not self._quiet:
            self._pending[key] = self._clock.callLater(PROGRESS_DELAY, self._show, key, f"{text}…")

    def end(self, key: object) -> None:
        """Step ``key`` is over (a key not running: nothing)."""
        pending = self._pending.pop(key, None)
        if pending is not None and pending.active():
            pending.cancel()

    def end_all(self) -> None:
        for key in list(self._pending):
            self.end(key)

    def _show(self, key: object, line: str) -> None:
        self._pending.pop(key, None)
        self.shown.append(line)
        try:
            print(line, file=self._stream, flush=True)
        except (BrokenPipeError, ValueError):
            self._quiet = True


class Output:
    """Lines on stdout; the first broken pipe silences the stream and calls ``on_broken`` once.

    ``stream`` None: ``sys.stdout`` as it is at each line (tests replace it).
    """

    def __init__(self, stream: TextIO | None = None, on_broken: Callable[[], None] = lambda: None) -> None:
        self._stream = stream
        self._on_broken = on_broken
        self.broken = False

    def say(self, line: str) -> None:
        if self.broken:
            return
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            print(line, file=stream, flush=True)
        except BrokenPipeError:
            self.broken = True
            _silence(stream)
            self._on_broken()


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null: Python's flush at exit would fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests): nothing is flushed at exit


def bounded(d: defer.Deferred[_T], clock: IReactorTime, seconds: float,
            error: Callable[[], Exception]) -> defer.Deferred[_T]:
    """``d``, cancelled after ``seconds``; its failure is then ``error()``, not a CancelledError."""

    def timed_out(result: object, timeout: float) -> Failure:
        return Failure(error())

    return d.addTimeout(max(0.0, seconds), clock, onTimeoutCancel=timed_out)
