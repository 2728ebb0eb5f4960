"""The server's log file line (``kerjostunt.server.logs``): the same text as Twisted's, cheaper."""

from __future__ import annotations

import io
from typing import Any

from twisted.logger import FileLogObserver, LogLevel, jsonFileLogObserver, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.server.logs import classic_line, speed_up_log_files

NOW = 1_764_662_400.75  # a fraction of a second: the stamp is of the whole second


class Point:
    x = 3

    def __repr__(self) -> str:
        return "<Point>"


class Broken:
    def __format__(self, spec: str) -> str:
        raise ValueError("no")


def _failure() -> Failure:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("unreachable")


def events() -> list[dict[str, Any]]:
    base = {"log_time": NOW, "log_level": LogLevel.info, "log_namespace": "kerjostunt.server.calls.manager"}
    variants: list[dict[str, Any]] = [
        {"log_format": "Call {caller} -> {callee}: {outcome}", "caller": "a", "callee": "b", "outcome": "stunt"},
        {"log_format": "{p!r} {p.x} {n:>6.2f} {items[1]} {d[k]} {{braces}}", "p": Point(), "n": 2.5,
         "items": [1, 2], "d": {"k": "v"}},
        {"log_format": "two\nlines {u}", "u": "ünïcødé"},
        {"log_format": "missing {nothere}"},
        {"log_format": "broken {b}", "b": Broken()},
        {"log_format": "positional {}"},
        {"log_format": "called {f()}", "f": lambda: "yes"},
        {"log_format": b"bytes {x}", "x": 1},
        {"log_format": "failed {x}", "x": 1, "log_failure": _failure()},
        {"log_format": ""},
        {},
        {"log_format": "own system", "log_system": "probe#1"},
        {"log_format": "odd system", "log_system": 42},
        {"log_format": "no level", "log_level": None},
        {"log_format": "no time", "log_time": None},
        {"log_format": "no namespace", "log_namespace": None},
    ]
    return [{**base, **variant} for variant in variants]


class ClassicLineTests(unittest.TestCase):
    def test_every_event_reads_as_twisted_writes_it(self) -> None:
        twisted_line = textFileLogObserver(io.StringIO()).formatEvent
        fast = classic_line(twisted_line)
        for event in events():
            with self.subTest(event=event.get("log_format")):
                self.assertEqual(fast(dict(event)), twisted_line(dict(event)))

    def test_the_stamp_follows_the_second(self) -> None:
        twisted_line = textFileLogObserver(io.StringIO()).formatEvent
        fast = classic_line(twisted_line)
        for when in (NOW, NOW + 0.2, NOW + 1.0, NOW + 3601.5, NOW - 86400.0):
            event = {"log_format": "tick", "log_time": when, "log_level": LogLevel.warn, "log_namespace": "x"}
            self.assertEqual(fast(dict(event)), twisted_line(dict(event)))


class SpeedUpTests(unittest.TestCase):
    def test_only_twistds_text_observer_is_changed(self) -> None:
        text_out, other_out, json_out = io.StringIO(), io.StringIO(), io.StringIO()
        twistds = textFileLogObserver(text_out)
        custom_stamps = textFileLogObserver(other_out, timeFormat="%H:%M")
        chosen = jsonFileLogObserver(json_out)
        own = FileLogObserver(io.StringIO(), lambda event: "mine\n")
        formats = [o.formatEvent for o in (twistds, custom_stamps, chosen, own)]
        self.assertEqual(speed_up_log_files([twistds, custom_stamps, chosen, own, print]), 1)
        self.assertIsNot(twistds.formatEvent, formats[0])
        self.assertEqual([o.formatEvent for o in (custom_stamps, chosen, own)], formats[1:])
        event = {"log_format": "hello {who}", "who": "you", "log_time": NOW, "log_level": LogLevel.info,
                 "log_namespace": "n"}
        twistds(dict(event))
        self.assertEqual(text_out.getvalue(), formats[0](dict(event)))
