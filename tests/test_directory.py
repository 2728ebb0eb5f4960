"""The INVITEs' group check from memory (store/directory.py): the database's answer, fewer round trips."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.store import Database
from kerjostunt.store.directory import POLL, STALE_AFTER, Directory, read_token

REALM = "kerjo.local"


class InlineStore:
    """``AsyncStore.run`` done at once on a real database; counts the runs, can be made to fail
    or to hold its answers back (read at once, delivered on ``release``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.runs: list[str] = []
        self.broken = False
        self.held: list[tuple[Deferred[Any], Any]] | None = None

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.runs.append(function.__name__)
        if self.broken:
            return fail(ConnectionError("database gone"))
        if self.held is not None:
            d: Deferred[Any] = Deferred()  # read now, answered when released
            self.held.append((d, function(self.db, *args, **kwargs)))
            return d
        return succeed(function(self.db, *args, **kwargs))

    def release(self) -> None:
        held, self.held = self.held or [], None
        for d, result in held:
            d.callback(result)


class DirectoryTests(unittest.TestCase):
    def setUp(self) -> None:
        path = os.path.join(self.mktemp() + ".d", "store.sqlite")
        os.makedirs(os.path.dirname(path))
        self.url = f"sqlite:///{path}"
        self.db = Database(self.url)
        self.db.upgrade()
        self.addCleanup(self.db.close)
        for user in ("alice", "bob", "carol", "dave"):
            self.db.add_user(user, REALM, password="pw")
        self.db.add_group("team")
        self.db.join_group("team", ["alice", "bob", "dave"])
        self.db.add_group("other")
        self.db.join_group("other", ["carol"])
        self.store = InlineStore(self.db)
        self.clock = Clock()
        self.directory = Directory(self.store, self.clock)
        self.directory.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(self.directory.stopService)

    def check(self, caller: str, callee: str) -> str:
        results: list[str] = []
        self.directory.call_check(caller, callee).addCallback(results.append)
        self.assertEqual(len(results), 1)
        return results[0]

    def test_same_answers_as_the_database(self) -> None:
        pairs = [("alice", "bob"), ("alice", "carol"), ("alice", "nobody"), ("nobody", "bob"),
                 ("carol", "carol"), ("alice", "alice")]
        for caller, callee in pairs * 2:  # the second round from memory
            self.assertEqual(self.check(caller, callee), self.db.call_check(caller, callee), (caller, callee))

    def test_known_users_need_no_round_trip(self) -> None:
        self.check("alice", "bob")
        runs = len(self.store.runs)
        for _ in range(5):
            self.assertEqual(self.check("bob", "alice"), "ok")
        self.assertEqual(len(self.store.runs), runs)
        self.assertEqual(len(self.directory), 2)

    def test_unknown_callee_is_asked_every_time(self) -> None:
        # Not cached: a flood of INVITEs to made-up user IDs must not fill the memory.
        self.assertEqual(self.check("alice", "mallory"), "unknown")
        runs = len(self.store.runs)
        self.assertEqual(self.check("alice", "mallory"), "unknown")
        self.assertEqual(len(self.store.runs), runs + 1)

    def test_an_operators_change_is_in_force_after_the_next_poll(self) -> None:
        self.assertEqual(self.check("alice", "bob"), "ok")
        admin = Database(self.url)  # another process: kerjostunt group leave team bob
        self.addCleanup(admin.close)
        admin.leave_group("team", ["bob"])
        self.clock.advance(POLL)
        self.assertEqual(self.check("alice", "bob"), "no-group")
        admin.join_group("other", ["alice"])
        self.clock.advance(POLL)
        self.assertEqual(self.check("alice", "carol"), "ok")

    def test_every_write_changes_the_token(self) -> None:
        writes: list[Callable[[], object]] = [
            lambda: self.db.add_user("erin", REALM, password="pw"),
            lambda: self.db.set_password("erin", REALM, "new"),
            lambda: self.db.join_group("team", ["erin"]),
            lambda: self.db.leave_group("team", ["erin"]),
            lambda: self.db.delete_user("erin"),
            lambda: self.db.import_users([{"user_id": "fred", "password": "pw", "groups": "team"}], REALM),
            lambda: self.db.delete_group("other"),
        ]
        seen = {read_token(self.db)}
        for write in writes:
            write()
            token = read_token(self.db)
            self.assertNotIn(token, seen)
            seen.add(token)

    def test_a_deleted_user_is_unknown_after_the_poll(self) -> None:
        self.assertEqual(self.check("alice", "dave"), "ok")
        self.db.delete_user("dave")
        self.clock.advance(POLL)
        self.assertEqual(self.check("alice", "dave"), "unknown")

    def test_unreadable_token_sends_every_check_to_the_database(self) -> None:
        self.check("alice", "bob")
        self.store.broken = True
        self.clock.advance(STALE_AFTER + POLL)
        self.store.broken = False
        self.db.leave_group("team", ["bob"])
        runs = len(self.store.runs)
        self.assertEqual(self.check("alice", "bob"), "no-group")  # not the cached "ok"
        self.assertGreater(len(self.store.runs), runs)

    def test_a_fetch_from_before_a_change_does_not_fill_the_cache(self) -> None:
        self.store.held = []
        results: list[str] = []
        self.directory.call_check("alice", "bob").addCallback(results.append)
        self.db.leave_group("team", ["bob"])
        self.directory.flush()  # the poll saw the change while the fetch was on its way
        self.store.release()
        self.assertEqual(results, ["ok"])  # what the database said then
        self.assertEqual(len(self.directory), 0)
        self.assertEqual(self.check("alice", "bob"), "no-group")

