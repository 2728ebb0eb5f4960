"""``twistd kerjostunt`` options that need no process: --log-level."""

from __future__ import annotations

import gc
import sys

from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from kerjostunt.server import calls, signaling
from kerjostunt.server.logs import filter_log_level
from kerjostunt.server.service import GC_GEN0_THRESHOLD, tune_gc
from kerjostunt.server.tap import Options


def _kerjostunt_loggers() -> list[Logger]:
    return [
        value
        for name, module in list(sys.modules.items())
        if module is not None and name.startswith("kerjostunt")
        for value in vars(module).values()
        if isinstance(value, Logger)
    ]


class LogLevelTests(unittest.TestCase):
    def setUp(self) -> None:
        before = {id(lg): (lg, lg.observer) for lg in _kerjostunt_loggers()}

        def restore() -> None:
            for lg, observer in before.values():
                lg.observer = observer
                for level in LogLevel.iterconstants():
                    vars(lg).pop(level.name, None)

        self.addCleanup(restore)
        self.seen: list[dict] = []
        globalLogPublisher.addObserver(self.seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.seen.append)

    def test_default_is_info(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertIs(options["log-level"], LogLevel.info)

    def test_option(self) -> None:
        options = Options()
        options.parseOptions(["--log-level", "DEBUG"])
        self.assertIs(options["log-level"], LogLevel.debug)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--log-level", "chatty"])

    def test_debug_stops_at_the_source(self) -> None:
        filter_log_level(LogLevel.info)
        calls.log.debug("hidden {x}", x=1)
        signaling.log.info("shown {x}", x=2)
        Logger(namespace="other").debug("not ours {x}", x=3)
        calls.log.emit(LogLevel.debug, "emitted {x}", x=4)
        formats = [e.get("log_format") for e in self.seen]
        self.assertNotIn("hidden {x}", formats)
        self.assertNotIn("emitted {x}", formats)
        self.assertIn("shown {x}", formats)
        self.assertIn("not ours {x}", formats)

    def test_warn_drops_info_without_building_an_event(self) -> None:
        filter_log_level(LogLevel.warn)
        built: list[object] = []
        self.patch(Logger, "emit", lambda *a, **k: built.append(a))
        calls.log.info("hidden {x}", x=1)
        calls.log.debug("hidden {x}", x=2)
        self.assertEqual(built, [])
        calls.log.warn("shown {x}", x=3)
        self.assertEqual(len(built), 1)

    def test_debug_level_lets_debug_through(self) -> None:
        filter_log_level(LogLevel.info)
        filter_log_level(LogLevel.debug)  # applied again: replaces the first filter
        calls.log.debug("visible {x}", x=1)
        self.assertIn("visible {x}", [e.get("log_format") for e in self.seen])


class TLSGroupsOptionTests(unittest.TestCase):
    def test_default_keeps_openssl_groups(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options.settings().tls_groups)

    def test_groups_reach_the_settings(self) -> None:
        options = Options()
        options.parseOptions(["--tls-groups", "X25519:P-256"])
        self.assertEqual(options.settings().tls_groups, "X25519:P-256")


class GarbageCollectorTests(unittest.TestCase):
    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_threshold_raised_and_start_up_frozen_once_running(self) -> None:
        when_running: list = []

        class Reactor:
            def callWhenRunning(self, f, *args):  # type: ignore[no-untyped-def]
                when_running.append((f, args))

        gc.unfreeze()
        tune_gc(Reactor())
        self.assertEqual(gc.get_threshold()[0], GC_GEN0_THRESHOLD)
        self.assertEqual(gc.get_freeze_count(), 0)  # not before the reactor runs
        [(freeze, args)] = when_running
        freeze(*args)
        self.assertGreater(gc.get_freeze_count(), 1000)
