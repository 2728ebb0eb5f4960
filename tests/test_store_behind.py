"""Call attempts written behind (``store/behind.py``): batches, the stop, refusals, and readers.

The gathering timer runs on a ``Clock``; the thread pool and SQLite are real,
so a batch really is one ``record_attempts_many`` transaction.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.store import Database, InvalidValue, StoreUnavailable
from kerjostunt.store.api import AsyncStore
from kerjostunt.store.behind import ATTEMPT_BATCH, ATTEMPT_DELAY, AttemptsBehind
from kerjostunt.store.service import StoreService

from .test_store import REALM


def attempt(store: AsyncStore, call_id: str, outcome: str = "direct", when: float = 100.0,
            caller: str = "a", callee: str = "b") -> Deferred[dict[str, str]]:
    return store.record_attempt(call_id, caller, callee, "public" if outcome != "failed" else None, outcome,
                                None, None, 5.0, when)


class BehindStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"
        self.db = Database(self.url)
        self.db.upgrade()
        for user in ("a", "b", "c"):
            self.db.add_user(user, REALM, password="p")
        self.clock = Clock()
        self.store = AsyncStore(self.db, reactor, clock=self.clock)
        self.store.start()
        self.addCleanup(self.store.stop)
        self.batches: list[list[str]] = []
        original = Database.record_attempts_many

        def counting(database: Database, rows: list[Any]) -> list[dict[str, str]]:
            self.batches.append([row[0] for row in rows])
            return original(database, rows)

        self.patch(Database, "record_attempts_many", counting)

    def stored(self) -> list[str]:
        """Call IDs in the database as another process sees them, oldest first."""
        check = Database(self.url)
        try:
            return [a.call_id for a in reversed(check.recent_attempts("b", limit=1000))]
        finally:
            check.close()

    @inlineCallbacks
    def test_attempts_of_the_delay_share_one_transaction_in_order(self):  # type: ignore[no-untyped-def]
        # Three failures then a success, caller a: the flag rule sees them one after another.
        writes = [attempt(self.store, f"c{i}", "failed", 100.0 + i) for i in range(3)]
        writes.append(attempt(self.store, "c3", "stunt", 103.0))
        yield self.store.call_check("a", "b")  # a round trip through the pool: nothing was sent
        self.assertEqual((self.batches, self.stored()), ([], []))
        self.assertFalse(any(d.called for d in writes))
        self.assertEqual(self.store.health().waiting, 4)
        self.clock.advance(ATTEMPT_DELAY)
        states = yield gatherResults(writes)
        self.assertEqual(self.batches, [["c0", "c1", "c2", "c3"]])
        self.assertEqual(self.stored(), ["c0", "c1", "c2", "c3"])
        one_by_one = Database("sqlite://")
        one_by_one.upgrade()
        for user in ("a", "b"):
            one_by_one.add_user(user, REALM, password="p")
        expected = [one_by_one.record_attempt(f"c{i}", "a", "b", None, "failed", None, None, 5.0, 100.0 + i)
                    for i in range(3)]
        expected.append(one_by_one.record_attempt("c3", "a", "b", "public", "stunt", None, None, 5.0, 103.0))
        self.assertEqual(states, expected)
        self.assertEqual(states[-1]["b"], "stunt")

    @inlineCallbacks
    def test_a_full_batch_goes_without_waiting(self):  # type: ignore[no-untyped-def]
        writes = [attempt(self.store, f"c{i}", when=float(i)) for i in range(ATTEMPT_BATCH + 1)]
        yield gatherResults(writes[:ATTEMPT_BATCH])  # no clock.advance
        self.assertEqual([len(b) for b in self.batches], [ATTEMPT_BATCH])
        self.assertFalse(writes[-1].called)  # the next batch has begun, and waits
        self.clock.advance(ATTEMPT_DELAY)
        yield writes[-1]
        self.assertEqual([len(b) for b in self.batches], [ATTEMPT_BATCH, 1])

    @inlineCallbacks
    def test_a_clean_stop_writes_every_held_attempt(self):  # type: ignore[no-untyped-def]
        service = StoreService(self.store, upgrade=False)
        service.startService()
        writes = [attempt(self.store, f"c{i}", when=float(i)) for i in range(7)]
        yield service.stopService()  # the clock never moved
        self.assertTrue(all(d.called for d in writes))
        yield gatherResults(writes)
        self.assertEqual(self.stored(), [f"c{i}" for i in range(7)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @inlineCallbacks
    def test_readers_see_the_attempts_held_back(self):  # type: ignore[no-untyped-def]
        attempt(self.store, "c1", "failed", 100.0)
        attempt(self.store, "c2", "stunt", 101.0, caller="c", callee="b")
        # Nothing advances the clock: each read sends what is held first.
        pairs = yield self.store.pair_outcomes("b", 0.0)  # the peers list (issue 12)
        self.assertEqual({peer: (p.latest, p.failures) for peer, p in pairs.items()},
                         {"a": ("failed", 1), "c": ("stunt", 0)})
        attempt(self.store, "c3", "direct", 102.0)
        recent = yield self.store.recent_attempts("b")
        self.assertEqual([a.call_id for a in recent], ["c3", "c2", "c1"])
        attempt(self.store, "c4", "direct", 103.0, caller="c", callee="a")
        window = yield self.store.attempts_since(0.0)  # /status
        self.assertEqual([a.call_id for a in window], ["c1", "c2", "c3", "c4"])
        attempt(self.store, "c5", "direct", 104.0, caller="b", callee="c")
        user = yield self.store.get_user("c")  # the use-STUNT flag the attempt moved
        self.assertEqual(user.stunt_state, "direct")
        members = yield self.store.list_users()
        self.assertEqual({u.user_id: u.stunt_state for u in members}["c"], "direct")

    @inlineCallbacks
    def test_an_operators_flag_lands_after_the_attempts_before_it(self):  # type: ignore[no-untyped-def]
        attempt(self.store, "c1", "stunt")
        yield self.store.set_stunt_state("b", "unreachable")
        user = yield self.store.get_user("b")
        self.assertEqual(user.stunt_state, "unreachable")
        self.assertEqual(self.stored(), ["c1"])

    @inlineCallbacks
    def test_a_refused_batch_is_written_row_by_row_and_a_bad_row_fails_alone(self):  # type: ignore[no-untyped-def]
        def refuse(database: Database, rows: list[Any]) -> list[dict[str, str]]:
            raise StoreUnavailable("database error: value too long")  # not busy: not retried as a batch

        original = Database.record_attempt

        def one(database: Database, call_id: str, *rest: Any) -> dict[str, str]:
            if call_id == "bad":
                raise StoreUnavailable("database error: this row")
            return original(database, call_id, *rest)

        self.patch(Database, "record_attempts_many", refuse)
        self.patch(Database, "record_attempt", one)
        good = attempt(self.store, "c1", "stunt")
        bad = attempt(self.store, "bad")
        later = attempt(self.store, "c2", "direct", 101.0)
        self.clock.advance(ATTEMPT_DELAY)
        self.assertEqual((yield good)["b"], "stunt")
        yield self.assertFailure(bad, StoreUnavailable)  # its caller logs it (CallManager._store_attempt)
        self.assertEqual((yield later)["b"], "direct")
        self.assertEqual(self.stored(), ["c1", "c2"])

    @inlineCallbacks
    def test_a_batch_refused_at_the_stop_still_answers_every_caller(self):  # type: ignore[no-untyped-def]
        def refuse(database: Database, rows: list[Any]) -> list[dict[str, str]]:
            raise StoreUnavailable("database error: refused")

        self.patch(Database, "record_attempts_many", refuse)
        writes = [attempt(self.store, f"c{i}") for i in range(2)]
        yield self.store.stop()  # the clock never moved: the stop sent the batch
        for d in writes:  # the row-by-row retry met the stopped store: failed, not left hanging
            self.failureResultOf(d)
        self.assertEqual(self.stored(), [])

    @inlineCallbacks
    def test_an_unknown_outcome_is_refused_at_once(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(attempt(self.store, "c1", "teleported"), InvalidValue)
        self.assertEqual(self.store.health().waiting, 0)


class SettledTests(unittest.TestCase):
    """``settled`` waits for the batches in flight, not only for what is held."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[list[Any], Any]] = []
        self.behind = AttemptsBehind(self.clock, lambda rows, then: self.sent.append((rows, then)),
                                     lambda row, then: self.sent.append(([row], then)))

    def test_a_read_waits_for_the_batch_in_flight(self) -> None:
        written = self.behind.add(("c1",))
        self.clock.advance(ATTEMPT_DELAY)
        self.assertEqual(len(self.sent), 1)  # sent, not answered
        read = self.behind.settled()
        self.assertFalse(read.called)
        self.sent[0][1]([{"a": "direct"}])
        self.assertTrue(read.called)
        self.assertEqual(self.successResultOf(written), {"a": "direct"})
        self.assertIsNone(self.successResultOf(self.behind.settled()))  # nothing in flight: at once

    def test_a_read_does_not_wait_for_batches_sent_after_it(self) -> None:
        self.behind.add(("c1",))
        read = self.behind.settled()  # sends batch 1
        self.behind.add(("c2",))
        self.clock.advance(ATTEMPT_DELAY)  # batch 2, sent after the read asked
        self.assertEqual(len(self.sent), 2)
        self.sent[0][1]([{}])
        self.assertTrue(read.called)  # batch 2 still in flight
        later = self.behind.settled()
        self.assertFalse(later.called)
        self.sent[1][1]([{}])
        self.assertTrue(later.called)

    def test_settled_sends_what_is_held(self) -> None:
        self.behind.add(("c1",))
        read = self.behind.settled()
        self.assertEqual([rows for rows, _ in self.sent], [[("c1",)]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(read.called)

    def test_a_failed_batch_still_settles_and_fails_its_callers(self) -> None:
        first, second = self.behind.add(("c1",)), self.behind.add(("c2",))
        read = self.behind.settled()
        self.sent[0][1](Failure(StoreUnavailable("refused")))
        self.assertEqual([rows for rows, _ in self.sent[1:]], [[("c1",)], [("c2",)]])  # one by one
        self.assertFalse(read.called)
        self.sent[1][1]({"a": "direct"})
        self.sent[2][1](Failure(StoreUnavailable("refused again")))
        self.assertTrue(read.called)
        self.assertEqual(self.successResultOf(first), {"a": "direct"})
        self.failureResultOf(second, StoreUnavailable)
        self.flushLoggedErrors()
