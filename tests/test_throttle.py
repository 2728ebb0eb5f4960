"""GuessThrottle and FailureLog on a Clock: lockouts, the usual address, the aggregated log."""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest

from kerjostunt.server.throttle import THROTTLED_COUNTER, GuessThrottle, ThrottleConfig


class ThrottleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.counts: Counter[str] = Counter()
        self.throttle = GuessThrottle(self.clock, ThrottleConfig(), lambda what: self.counts.update([what]))

    def _fail(self, n: int, user: str = "alice", source: str = "198.51.100.7") -> None:
        for _ in range(n):
            self.throttle.failed(user, source)

    def test_free_failures_then_a_doubling_lock(self) -> None:
        self._fail(5)
        self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 0.0)
        self._fail(1)
        self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 0.0)
        self._fail(1)
        self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 2.0)
        self.clock.advance(2.0)
        self._fail(1)
        self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 4.0)

    def test_the_lock_has_a_cap_and_is_forgotten_after_quiet(self) -> None:
        self._fail(40)
        self.assertEqual(self.throttle.locked("bob", "198.51.100.7"), 900.0)
        self.clock.advance(3601)
        self.assertEqual(self.throttle.locked("bob", "198.51.100.7"), 0.0)

    def test_a_source_lock_does_not_touch_other_sources(self) -> None:
        self._fail(8)
        self.assertGreater(self.throttle.locked("alice", "198.51.100.7"), 0)
        self.assertEqual(self.throttle.locked("alice", "203.0.113.5"), 0.0)

    def test_user_lock_spares_the_usual_address(self) -> None:
        self.throttle.succeeded("alice", "203.0.113.5")
        for n in range(11):  # one guess each from eleven addresses
            self.throttle.failed("alice", f"198.51.100.{n}")
        self.assertEqual(self.throttle.locked("alice", "198.51.100.99"), 1.0)
        self.assertEqual(self.throttle.locked("alice", "203.0.113.5"), 0.0)
        self.assertEqual(self.throttle.locked("bob", "198.51.100.99"), 0.0)

    def test_a_success_does_not_wipe_a_guessers_record(self) -> None:
        self._fail(6, user="mallory-guesses")
        self.throttle.succeeded("mallory", "198.51.100.7")  # her own account
        self.assertEqual(self.throttle.locked("mallory", "198.51.100.7"), 1.0)

    def test_refusals_are_counted(self) -> None:
        self._fail(6)
        self.throttle.locked("alice", "198.51.100.7")
        self.throttle.locked("alice", "198.51.100.7")
        self.assertEqual(self.counts[THROTTLED_COUNTER], 2)

    def test_tables_are_bounded(self) -> None:
        throttle = GuessThrottle(self.clock, ThrottleConfig(max_entries=100))
        for n in range(1000):
            throttle.failed(f"user{n}", f"10.0.{n // 250}.{n % 250}")
            throttle.succeeded(f"user{n}", "10.9.9.9")
        self.assertEqual(throttle.sizes(), (100, 100, 100))


class FailureLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") == "kerjostunt.server.throttle":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.throttle = GuessThrottle(self.clock, ThrottleConfig(log_interval=60.0, log_sources=3))

    def lines(self) -> list[str]:
        return [str(formatEvent(e)) for e in self.events]

    def test_one_line_per_source_per_interval(self) -> None:
        for _ in range(1000):
            self.throttle.failed("alice", "198.51.100.7")
            self.clock.advance(0.01)
        self.assertEqual(self.lines(), ["sip: wrong credentials for alice from 198.51.100.7"])
        self.clock.advance(60)
        self.throttle.locked("alice", "192.0.2.1")  # any authentication event writes the sums
        self.assertEqual(len(self.lines()), 2)
        self.assertIn("999 more failed logins from 198.51.100.7", self.lines()[1])
        # The source keeps failing: one summary per interval, no new "first" line.
        for _ in range(50):
            self.throttle.failed("bob", "198.51.100.7", "web")
        self.clock.advance(61)
        self.throttle.log.flush()
        self.assertEqual(len(self.lines()), 3)
        self.assertIn("web: 50 more failed logins from 198.51.100.7", self.lines()[2])
        self.assertIn("(users: bob)", self.lines()[2])

    def test_many_sources_are_summed_in_one_line(self) -> None:
        for n in range(10):
            self.throttle.failed("alice", f"198.51.100.{n}")
        self.throttle.log.flush()
        lines = self.lines()
        self.assertEqual(len(lines), 4)  # three sources by name, then the rest in one
        self.assertIn("7 failed logins from further sources", lines[-1])

    def test_flush_with_nothing_writes_nothing(self) -> None:
        self.throttle.log.flush()
        self.assertEqual(self.events, [])


class PendingChecksTests(unittest.TestCase):
    """Parallel guesses: checks in flight count once the source has failed."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = GuessThrottle(self.clock)

    def test_a_first_wave_from_a_clean_source_passes(self) -> None:
        # Twenty checks at once from a source with no failure yet: all run (an
        # office behind one NAT re-registering after a restart must not be held
        # up); the answers then lock the source.
        for _ in range(20):
            self.assertEqual(self.throttle.locked("alice", "198.51.100.7"), 0.0)
            self.throttle.checking("alice", "198.51.100.7")
        for _ in range(20):
            self.throttle.checked("alice", "198.51.100.7")
            self.throttle.failed("alice", "198.51.100.7")
        self.assertGreater(self.throttle.locked("alice", "198.51.100.7"), 0.0)

    def test_pending_checks_fill_the_free_failures(self) -> None:
        self.throttle.failed("alice", "198.51.100.7")
        allowed = 0
        while self.throttle.locked("alice", "198.51.100.7") == 0.0:
            self.throttle.checking("alice", "198.51.100.7")
            allowed += 1
        self.assertEqual(allowed, 4)  # five free failures, one already spent
        # A right password elsewhere is not held up by them.
        self.throttle.succeeded("bob", "203.0.113.5")
        self.assertEqual(self.throttle.locked("bob", "203.0.113.5"), 0.0)
