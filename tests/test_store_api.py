"""The store's async door: ``AsyncStore`` over a thread pool, and ``StoreService``.

Work runs off the reactor thread, hand-offs are coalesced, ``record_seen`` is
written behind, ``get_ha1`` lookups share a query, and a stop loses nothing.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.store import (
    Database,
    InvalidValue,
    StoreUnavailable,
    UnknownUser,
)
from kerjostunt.store.api import HA1_WINDOW, SEEN_BATCH, SEEN_DELAY, AsyncStore, StoreStopped
from kerjostunt.store.service import StoreService

from .test_store import REALM, md5_ha1, sha256_ha1


class AsyncStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.db = Database(f"sqlite:///{self.path}")
        self.db.upgrade()
        self.store = AsyncStore(self.db, reactor)
        self.store.start()
        self.addCleanup(self.store.stop)

    @inlineCallbacks
    def test_work_runs_off_the_reactor_thread(self):
        reactor_thread = threading.current_thread()
        worker = yield self.store.run(lambda db: threading.current_thread())
        self.assertIsNot(worker, reactor_thread)
        self.assertIn("kerjostunt-store", worker.name)

    @inlineCallbacks
    def test_methods_return_results(self):
        yield self.store.add_user("alice", REALM, password="pw")
        yield self.store.add_group("g")
        yield self.store.join_group("g", ("alice",))
        user = yield self.store.get_user("alice")
        self.assertEqual(user.groups, ("g",))
        ha1 = yield self.store.get_ha1("alice", "MD5")
        self.assertEqual(ha1, md5_ha1("alice", REALM, "pw"))
        states = yield self.store.record_attempt(
            "c1", "alice", "alice", "t", "stunt", None, None, 3.0, 10.0)
        self.assertEqual(states, {"alice": "stunt"})

    @inlineCallbacks
    def test_errors_are_failed_deferreds(self):
        yield self.assertFailure(self.store.get_user("nobody"), UnknownUser)
        # The store keeps working afterwards.
        users = yield self.store.list_users()
        self.assertEqual(users, [])

    @inlineCallbacks
    def test_outage_is_a_failed_deferred(self):
        broken = AsyncStore(Database("sqlite:////nonexistent-dir/x.sqlite"), reactor)
        broken.start()
        yield self.assertFailure(broken.list_users(), StoreUnavailable)
        yield broken.stop()

    @inlineCallbacks
    def test_stop_flushes_queued_writes(self):
        yield self.store.add_user("a", REALM, password="p")
        yield self.store.add_user("b", REALM, password="p")
        writes = [
            self.store.record_attempt(f"c{i}", "a", "b", None, "direct", None, None, 1.0,
                                      float(i))
            for i in range(100)
        ]
        yield self.store.stop()
        self.assertTrue(all(d.called for d in writes))
        yield gatherResults(writes)
        yield self.assertFailure(self.store.list_users(), StoreStopped)
        check = Database(f"sqlite:///{self.path}")
        self.addCleanup(check.close)
        self.assertEqual(len(check.recent_attempts("b", limit=1000)), 100)
        self.assertEqual(check.get_user("b").stunt_state, "direct")

    def batch_sizes(self, method: str) -> list[int]:
        """The size of every batch ``Database.<method>`` gets from now on."""
        sizes: list[int] = []
        original = getattr(Database, method)

        def counting(database, items):  # type: ignore[no-untyped-def]
            sizes.append(len(items))
            return original(database, items)

        self.patch(Database, method, counting)
        return sizes

    def clocked_store(self) -> tuple[AsyncStore, Clock]:
        """A store whose gathering timers run on a Clock."""
        clock = Clock()
        store = AsyncStore(self.db, reactor, clock=clock)
        store.start()
        self.addCleanup(store.stop)
        return store, clock

    def behind_store(self) -> tuple[AsyncStore, Clock, list[int]]:
        """A clocked store; the list gets the size of every ``record_seen_many`` batch."""
        store, clock = self.clocked_store()
        return store, clock, self.batch_sizes("record_seen_many")

    def last_seen(self, user_id: str) -> tuple[object, object, object]:
        check = Database(f"sqlite:///{self.path}")
        try:
            user = check.get_user(user_id)
        finally:
            check.close()
        return user.public_ip, user.public_port, user.last_seen

    @inlineCallbacks
    def test_record_seen_is_written_behind_in_one_transaction(self):
        for name in ("a", "b", "c"):
            self.db.add_user(name, REALM, password="p")
        store, clock, batches = self.behind_store()
        seen = [store.record_seen(name, "192.0.2.1", 4000 + i, 10.0 + i) for i, name in enumerate("abc")]
        yield store.call_check("a", "a")  # a round trip through the pool: nothing was sent
        self.assertEqual(batches, [])
        self.assertEqual(self.last_seen("a"), (None, None, None))
        clock.advance(SEEN_DELAY)
        yield gatherResults(seen)
        self.assertEqual(batches, [3])
        self.assertEqual(self.last_seen("c"), ("192.0.2.1", 4002, 12.0))

    @inlineCallbacks
    def test_a_full_batch_of_seen_rows_goes_at_once(self):
        self.db.add_user("a", REALM, password="p")
        store, clock, batches = self.behind_store()
        seen = [store.record_seen("a", "192.0.2.1", 1000 + i, float(i)) for i in range(SEEN_BATCH)]
        yield gatherResults(seen)  # no clock.advance
        self.assertEqual(batches, [SEEN_BATCH])
        self.assertEqual(self.last_seen("a"), ("192.0.2.1", 1000 + SEEN_BATCH - 1, float(SEEN_BATCH - 1)))

    @inlineCallbacks
    def test_stop_writes_held_back_seen_rows(self):
        self.db.add_user("a", REALM, password="p")
        store, clock, batches = self.behind_store()
        seen = store.record_seen("a", "192.0.2.7", 5060, 42.0)
        yield store.stop()
        self.assertTrue(seen.called)
        yield seen
        self.assertEqual(self.last_seen("a"), ("192.0.2.7", 5060, 42.0))
        self.assertEqual(clock.getDelayedCalls(), [])
        yield self.assertFailure(store.record_seen("a", "192.0.2.7", 5060, 43.0), StoreStopped)

    @inlineCallbacks
    def test_unknown_user_fails_only_its_seen_row(self):
        self.db.add_user("a", REALM, password="p")
        store, clock, batches = self.behind_store()
        good = store.record_seen("a", "192.0.2.1", 1, 1.0)
        bad = store.record_seen("ghost", "192.0.2.1", 2, 1.0)
        clock.advance(SEEN_DELAY)
        yield good
        yield self.assertFailure(bad, UnknownUser)
        self.assertEqual(batches, [2])

    @inlineCallbacks
    def test_reads_see_held_back_seen_rows(self):
        self.db.add_user("a", REALM, password="p")
        store, clock, batches = self.behind_store()
        store.record_seen("a", "192.0.2.9", 7000, 5.0)
        user = yield store.get_user("a")  # no clock.advance: the read sends them first
        self.assertEqual((user.public_ip, user.public_port, user.last_seen), ("192.0.2.9", 7000, 5.0))

    def count_hand_offs(self, store: AsyncStore) -> list[int]:
        hand_offs: list[int] = []
        original = store._pool.callInThreadWithCallback

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            hand_offs.append(1)
            return original(*args, **kwargs)

        store._pool.callInThreadWithCallback = counting
        return hand_offs

    @inlineCallbacks
    def test_calls_made_while_the_pool_is_busy_share_one_hand_off(self):
        self.db.add_user("a", REALM, password="p")
        hand_offs = self.count_hand_offs(self.store)
        checks = [self.store.call_check("a", "a") for _ in range(9)]
        missing = self.store.get_user("nobody")
        results = yield gatherResults(checks)
        self.assertEqual(results, ["no-group"] * 9)
        yield self.assertFailure(missing, UnknownUser)  # an error stays with its own call
        # call_check goes in the read lane (the first alone, the rest together), get_user in the write lane
        self.assertEqual(len(hand_offs), 3)

    @inlineCallbacks
    def test_ha1_lookups_of_a_few_milliseconds_share_one_query(self):
        self.db.add_user("a", REALM, password="pa")
        self.db.add_user("b", REALM, password="pb")
        store, clock = self.clocked_store()
        hand_offs = self.count_hand_offs(store)
        queries = self.batch_sizes("get_ha1_many")
        lookups = [
            store.get_ha1("a", "MD5"),
            store.get_ha1("b", "sha-256"),
            store.get_ha1("nobody", "MD5"),
            store.get_ha1("a", "SHA-256"),
        ]
        yield self.assertFailure(store.get_ha1("a", "SHA-1"), InvalidValue)  # refused at once
        self.assertEqual(hand_offs, [])
        clock.advance(HA1_WINDOW)
        results = yield gatherResults(lookups)
        self.assertEqual(results, [
            md5_ha1("a", REALM, "pa"), sha256_ha1("b", REALM, "pb"), None, sha256_ha1("a", REALM, "pa"),
        ])
        self.assertEqual((queries, len(hand_offs)), ([4], 1))

    @inlineCallbacks
    def test_stop_answers_gathered_ha1_lookups(self):
        self.db.add_user("a", REALM, password="pa")
        store = AsyncStore(self.db, reactor, clock=Clock())  # its timer never fires
        store.start()
        lookup = store.get_ha1("a", "MD5")
        yield store.stop()
        self.assertEqual((yield lookup), md5_ha1("a", REALM, "pa"))

    @inlineCallbacks
    def test_service_upgrades_and_stops(self):
        path = os.path.abspath(self.mktemp() + ".sqlite")
        service = StoreService(AsyncStore(Database(f"sqlite:///{path}"), reactor))
        service.startService()  # the schema exists before any request
        yield service.store.add_user("alice", REALM, password="p")
        user = yield service.store.get_user("alice")
        self.assertEqual(user.user_id, "alice")
        yield service.stopService()
        self.assertFalse(service.running)
        yield self.assertFailure(service.store.list_users(), StoreStopped)
