"""What the server's log events cost: the level filter at the source and a cheaper log-file line.

Measured inside the running server at 200 calls/s (docs/performance.rst,
"Inside the running server, fourth round"): a call's log events (its info
line and two debug events that the level filter dropped) cost about 224 us
of the reactor. Most of it was Twisted's pure-Python ``string.Formatter``
and a time zone and ``strftime`` per line written, and ``Logger.emit``
building the debug events only to drop them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from zope.interface import implementer

LogEvent = dict[str, Any]

@implementer(ILogObserver)
class _LevelFilter:
    """What ``filter_log_level`` puts in front of the global publisher: a later call replaces it.

    The level is one set lookup, not ``LogLevelFilterPredicate``'s walk up
    the namespace (about 15 us of the server's reactor per event written).
    """

    def __init__(self, level: LogLevel, publisher: ILogObserver) -> None:
        self._passes = frozenset(each for each in LogLevel.iterconstants() if each >= level)
        self._publisher = publisher

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") in self._passes:
            self._publisher(event)


def _discard(*_args: object, **_fields: object) -> None:
    """A dropped level's ``Logger`` method: no event is built at all."""


def filter_log_level(level: LogLevel) -> None:
    """Stop kerjostunt's events below ``level`` before any log observer sees them.

    twistd's log file observer formats and writes every event it gets, debug
    included, and twistd builds that observer itself (no level option), so
    the filter sits at the source: every ``Logger`` of a loaded kerjostunt
    module sends to a level check in front of the global publisher, and its
    methods for the levels below ``level`` (``log.debug``, ...) are replaced
    by one that returns at once, so a dropped event is not even built. Twisted's own events are not
    affected. ``twistd kerjostunt --log-level`` calls this; tests that build
    a server directly keep every event.
    """
    filtered = _LevelFilter(level, globalLogPublisher)
    for logger in _kerjostunt_loggers():
        logger.observer = filtered
        for each in LogLevel.iterconstants():
            if each < level:
                setattr(logger, each.name, _discard)
            else:
                vars(logger).pop(each.name, None)


def _kerjostunt_loggers() -> Iterable[Logger]:
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "kerjostunt" or name.startswith("kerjostunt.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Logger) and (
                value.observer is globalLogPublisher or isinstance(value.observer, _LevelFilter)
            ):
                yield value


# -- the log file's line --------------------------------------------------------------


class _SecondStamps:
    """RFC 3339 time stamps by the whole second: every event of one second has the same one."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        if second != self._second:
            self._stamp = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._stamp


def classic_line(twisted_line: Callable[[LogEvent], str | None]) -> Callable[[LogEvent], str | None]:
    """``formatEventAsClassicLogText`` with RFC 3339 stamps, the same text at a fraction of the cost.

    ``str.format_map`` formats what Twisted's ``formatWithCall`` would for a
    plain ``str`` format; any event that is not that plain case (a failure,
    a flattened event, Twisted's ``{f()}`` call syntax, a bytes format, a
    ``log_system`` that is not text, a format that raises) goes to
    ``twisted_line``, Twisted's own formatter, which also words the errors.
    """
    stamps = _SecondStamps()

    def line(event: LogEvent) -> str | None:
        fmt = event.get("log_format")
        system = event.get("log_system")
        if (type(fmt) is not str or "()" in fmt or "log_failure" in event or "log_flattened" in event
                or (system is not None and type(system) is not str)):
            return twisted_line(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return twisted_line(event)
        if not text:
            return None
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{stamps(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"

    return line


def _is_twistd_text_format(format_event: Callable[[LogEvent], str | None]) -> bool:
    """Is this the formatter ``textFileLogObserver`` (what twistd uses) made, with RFC 3339 stamps?"""
    code = getattr(format_event, "__code__", None)
    cells = getattr(format_event, "__closure__", None) or ()
    if code is None or format_event.__qualname__ != "textFileLogObserver.<locals>.formatEvent":
        return False
    free = dict(zip(code.co_freevars, (cell.cell_contents for cell in cells)))
    return free.get("timeFormat") == timeFormatRFC3339


def speed_up_log_files(observers: Iterable[ILogObserver]) -> int:
    """Give twistd's text log file observers ``classic_line``; returns how many were changed.

    twistd builds its log file observer itself (``--logfile``, or standard
    output with ``-n``) after the plugin's ``makeService``, and only
    ``textFileLogObserver``'s default line is replaced: an observer an
    operator chose with ``twistd --logger`` is left as it is.
    """
    changed = 0
    for observer in observers:
        if isinstance(observer, FileLogObserver) and _is_twistd_text_format(observer.formatEvent):
            observer.formatEvent = classic_line(observer.formatEvent)
            changed += 1
    return changed


def global_observers() -> list[ILogObserver]:
    """The global publisher's observers (Twisted keeps them in ``_observers``; none if it stops)."""
    return list(getattr(globalLogPublisher, "_observers", ()))
