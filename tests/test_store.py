"""The user database (SQLite).

``StoreTestsMixin`` holds the operations every backend must support;
tests/test_store_postgres.py runs the same tests against PostgreSQL;
tests/test_store_api.py tests its async door, ``AsyncStore``.
"""

from __future__ import annotations

import hashlib
import os
import threading

from twisted.trial import unittest

from kerjostunt.store import (
    Database,
    Duplicate,
    ImportRowError,
    InvalidName,
    InvalidValue,
    StoreUnavailable,
    UnknownGroup,
    UnknownUser,
    next_states,
)
from kerjostunt.store.database import RECENT_WINDOW
from kerjostunt.store.records import RecentAttempt

REALM = "kerjo.local"
DAY = 24 * 3600.0


def md5_ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


def sha256_ha1(user: str, realm: str, password: str) -> str:
    return hashlib.sha256(f"{user}:{realm}:{password}".encode()).hexdigest()


class StoreTestsMixin:
    """Backend-independent store tests; ``make_database`` gives a fresh,
    upgraded, empty database."""

    db: Database

    def make_database(self) -> Database:
        raise NotImplementedError

    def setUp(self) -> None:
        self.db = self.make_database()
        self.addCleanup(self.db.close)

    def users(self, *names: str) -> None:
        for name in names:
            self.db.add_user(name, REALM, password=f"pw-{name}")

    # -- schema ----------------------------------------------------------

    def test_upgrade_is_idempotent(self) -> None:
        self.users("alice")
        self.db.upgrade()
        self.assertEqual(self.db.get_user("alice").user_id, "alice")

    def test_models_match_migrations(self) -> None:
        """The hand-written migration and the models describe the same schema."""
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        from kerjostunt.store.models import Base

        with self.db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        self.assertEqual(diff, [])

    # -- users -----------------------------------------------------------

    def test_add_user_stores_ha1s_matching_hashlib(self) -> None:
        self.db.add_user("alice", REALM, password="s3cret")
        self.assertEqual(self.db.get_ha1("alice", "MD5"), md5_ha1("alice", REALM, "s3cret"))
        self.assertEqual(
            self.db.get_ha1("alice", "SHA-256"), sha256_ha1("alice", REALM, "s3cret")
        )
        user = self.db.get_user("alice")
        self.assertEqual(
            (user.user_id, user.realm, user.stunt_state, user.groups, user.last_seen),
            ("alice", REALM, "unknown", (), None),
        )

    def test_add_user_with_ha1_only(self) -> None:
        md5 = md5_ha1("bob", REALM, "x")
        self.db.add_user("bob", REALM, ha1_md5=md5.upper())
        self.assertEqual(self.db.get_ha1("bob", "MD5"), md5)
        self.assertIsNone(self.db.get_ha1("bob", "SHA-256"))

    def test_add_user_rejects_bad_credentials(self) -> None:
        self.assertRaises(InvalidValue, self.db.add_user, "a", REALM)
        self.assertRaises(InvalidValue, self.db.add_user, "a", REALM, password="")
        self.assertRaises(InvalidValue, self.db.add_user, "a", REALM, ha1_md5="abc")
        self.assertRaises(InvalidValue, self.db.add_user, "a", REALM, ha1_sha256="z" * 64)
        self.assertRaises(
            InvalidValue, self.db.add_user, "a", REALM, password="p", ha1_md5="a" * 32
        )
        self.assertEqual(self.db.list_users(), [])

    def test_get_ha1_unknown_user_is_none(self) -> None:
        self.assertIsNone(self.db.get_ha1("nobody", "MD5"))

    def test_duplicate_user(self) -> None:
        self.users("alice")
        e = self.assertRaises(Duplicate, self.users, "alice")
        self.assertIn("alice", str(e))

    def test_invalid_names(self) -> None:
        for bad in ["", " alice", "-x", ".x", "a b", "a/b", "ä", "a" * 65, "a:b", "a@b",
                    "alice\n", "alice\r\n", "al\tice", "a\x00", "a\x7f", "\nalice"]:
            self.assertRaises(InvalidName, self.db.add_user, bad, REALM, password="p")
            self.assertRaises(InvalidName, self.db.add_group, bad)
        for good in ["a", "A9", "a" * 64, "x.y_z+w-1"]:
            self.db.add_user(good, REALM, password="p")
            self.db.add_group(good)
        self.assertEqual(len(self.db.list_users()), 4)

    def test_set_password(self) -> None:
        self.users("alice")
        self.db.set_password("alice", "other.realm", "new")
        self.assertEqual(self.db.get_ha1("alice", "MD5"), md5_ha1("alice", "other.realm", "new"))
        self.assertEqual(
            self.db.get_ha1("alice", "SHA-256"), sha256_ha1("alice", "other.realm", "new")
        )
        self.assertEqual(self.db.get_user("alice").realm, "other.realm")
        self.assertRaises(UnknownUser, self.db.set_password, "bob", REALM, "x")

    def test_delete_user(self) -> None:
        self.users("alice", "bob")
        self.db.add_group("g")
        self.db.join_group("g", ["alice", "bob"])
        self.db.delete_user("alice")
        self.assertRaises(UnknownUser, self.db.get_user, "alice")
        self.assertEqual(self.db.list_groups(), {"g": ["bob"]})
        self.assertRaises(UnknownUser, self.db.delete_user, "alice")

    def test_list_users_sorted_with_groups(self) -> None:
        self.users("carol", "alice", "bob")
        self.db.add_group("g2")
        self.db.add_group("g1")
        self.db.join_group("g2", ["alice"])
        self.db.join_group("g1", ["alice", "carol"])
        listed = [(u.user_id, u.groups) for u in self.db.list_users()]
        self.assertEqual(
            listed, [("alice", ("g1", "g2")), ("bob", ()), ("carol", ("g1",))]
        )

    # -- groups ----------------------------------------------------------

    def test_groups(self) -> None:
        self.users("alice", "bob", "carol")
        self.db.add_group("friends")
        self.assertRaises(Duplicate, self.db.add_group, "friends")
        self.db.join_group("friends", ["alice", "bob"])
        self.db.join_group("friends", ["alice"])  # already a member: no error
        self.assertEqual(self.db.list_groups(), {"friends": ["alice", "bob"]})
        self.assertEqual(self.db.groups_of("alice"), ["friends"])
        self.assertEqual(self.db.groups_of("carol"), [])
        self.assertRaises(UnknownUser, self.db.groups_of, "nobody")
        self.assertTrue(self.db.share_group("alice", "bob"))
        self.assertFalse(self.db.share_group("alice", "carol"))
        self.assertTrue(self.db.is_member("friends", "bob"))
        self.assertFalse(self.db.is_member("friends", "carol"))
        self.assertRaises(UnknownGroup, self.db.is_member, "enemies", "bob")
        self.assertEqual(
            [u.user_id for u in self.db.group_members("friends")], ["alice", "bob"]
        )
        self.assertRaises(UnknownGroup, self.db.group_members, "enemies")
        self.db.leave_group("friends", ["bob", "carol"])  # carol was not in it
        self.assertFalse(self.db.share_group("alice", "bob"))
        self.db.delete_group("friends")
        self.assertEqual(self.db.list_groups(), {})
        self.assertEqual(self.db.groups_of("alice"), [])
        self.assertRaises(UnknownGroup, self.db.delete_group, "friends")

    def test_call_check(self) -> None:
        """One query: the callee exists, and some group holds both."""
        self.users("alice", "bob", "carol")
        self.db.add_group("friends")
        self.db.add_group("others")
        self.db.join_group("friends", ["alice", "bob"])
        self.db.join_group("others", ["carol"])
        self.assertEqual(self.db.call_check("alice", "bob"), "ok")
        self.assertEqual(self.db.call_check("bob", "alice"), "ok")
        self.assertEqual(self.db.call_check("alice", "carol"), "no-group")
        self.assertEqual(self.db.call_check("alice", "nobody"), "unknown")
        self.assertEqual(self.db.call_check("nobody", "bob"), "no-group")
        self.db.leave_group("friends", ["bob"])
        self.assertEqual(self.db.call_check("alice", "bob"), "no-group")

    def test_join_is_all_or_nothing(self) -> None:
        self.users("alice")
        self.db.add_group("g")
        e = self.assertRaises(UnknownUser, self.db.join_group, "g", ["alice", "ghost"])
        self.assertIn("ghost", str(e))
        self.assertEqual(self.db.list_groups(), {"g": []})
        self.assertRaises(UnknownGroup, self.db.join_group, "nope", ["alice"])
        self.assertRaises(UnknownGroup, self.db.leave_group, "nope", ["alice"])

    def test_group_members_carry_all_their_groups(self) -> None:
        self.users("alice", "bob")
        for g in ("a", "b"):
            self.db.add_group(g)
        self.db.join_group("a", ["alice", "bob"])
        self.db.join_group("b", ["alice"])
        members = {u.user_id: u.groups for u in self.db.group_members("a")}
        self.assertEqual(members, {"alice": ("a", "b"), "bob": ("a",)})

    # -- observations ----------------------------------------------------

    def test_record_seen_and_nat(self) -> None:
        self.users("alice")
        self.db.record_seen("alice", "203.0.113.7", 40001, 1000.5)
        nat = {"mapping": "endpoint-dependent", "allocation": "sequential", "delta": 2,
               "public_ip": "203.0.113.7"}
        self.db.record_nat("alice", nat, 1001.0)
        user = self.db.get_user("alice")
        self.assertEqual((user.public_ip, user.public_port), ("203.0.113.7", 40001))
        self.assertEqual(user.nat, nat)
        self.assertEqual(user.last_seen, 1001.0)
        self.assertRaises(UnknownUser, self.db.record_seen, "bob", "1.2.3.4", 1, 1.0)
        self.assertRaises(UnknownUser, self.db.record_nat, "bob", {}, 1.0)
        self.assertRaises(InvalidValue, self.db.record_nat, "alice", {"x": object()}, 1.0)

    def test_get_ha1_many_answers_in_order(self) -> None:
        self.users("alice", "bob")
        wanted = [("bob", "SHA-256"), ("ghost", "MD5"), ("alice", "md5"), ("bob", "MD5")]
        self.assertEqual(
            self.db.get_ha1_many(wanted), [self.db.get_ha1(u, a) for u, a in wanted]
        )
        self.assertIsNotNone(self.db.get_ha1_many([("alice", "MD5")])[0])
        self.assertEqual(self.db.get_ha1_many([]), [])
        self.assertRaises(InvalidValue, self.db.get_ha1_many, [("alice", "SHA-1")])

    def test_record_seen_many_in_order_and_reports_unknown_users(self) -> None:
        self.users("alice", "bob")
        unknown = self.db.record_seen_many([
            ("alice", "203.0.113.7", 40001, 10.0),
            ("ghost", "203.0.113.8", 1, 10.0),
            ("bob", "198.51.100.2", 5000, 11.0),
            ("alice", "203.0.113.9", 40002, 12.0),  # a later row wins
            ("ghost", "203.0.113.8", 2, 13.0),
        ])
        self.assertEqual(unknown, ["ghost"])
        alice, bob = self.db.get_user("alice"), self.db.get_user("bob")
        self.assertEqual((alice.public_ip, alice.public_port, alice.last_seen), ("203.0.113.9", 40002, 12.0))
        self.assertEqual((bob.public_ip, bob.public_port, bob.last_seen), ("198.51.100.2", 5000, 11.0))
        self.assertEqual(self.db.record_seen_many([("alice", "203.0.113.7", 1, 14.0)]), [])
        self.assertEqual(self.db.record_seen_many([]), [])

    def test_set_stunt_state(self) -> None:
        self.users("alice")
        self.db.set_stunt_state("alice", "unreachable")
        self.assertEqual(self.db.get_user("alice").stunt_state, "unreachable")
        self.assertRaises(InvalidValue, self.db.set_stunt_state, "alice", "maybe")
        self.assertRaises(UnknownUser, self.db.set_stunt_state, "bob", "direct")

    # -- attempts and the flag rule ---------------------------------------

    def attempt(self, caller: str, callee: str, outcome: str, when: float,
                technique: str | None = None, witnesses: tuple[str, ...] | None = None) -> dict[str, str]:
        return self.db.record_attempt(
            f"call-{when}", caller, callee, technique, outcome,
            "198.51.100.1:5000", "198.51.100.1:5001", 12.5, when, witnesses,
        )

    def test_direct_outcome_marks_callee_direct(self) -> None:
        self.users("a", "b")
        self.assertEqual(self.attempt("a", "b", "direct", 100.0), {"a": "unknown", "b": "direct"})
        self.assertEqual(self.db.get_user("b").stunt_state, "direct")

    def test_stunt_outcome_marks_both_unless_caller_direct(self) -> None:
        self.users("a", "b", "c")
        self.db.set_stunt_state("c", "direct")
        self.assertEqual(self.attempt("a", "b", "stunt", 100.0, "sequential"),
                         {"a": "stunt", "b": "stunt"})
        self.assertEqual(self.attempt("c", "b", "stunt", 101.0), {"c": "direct", "b": "stunt"})
        self.assertEqual(self.db.get_user("a").stunt_state, "stunt")
        self.assertEqual(self.db.get_user("c").stunt_state, "direct")

    def test_failures_with_two_peers_make_callee_unreachable(self) -> None:
        self.users("a", "b", "c")
        self.assertEqual(self.attempt("a", "b", "failed", 100.0), {"a": "unknown", "b": "unknown"})
        self.assertEqual(self.attempt("c", "b", "failed", 101.0), {"c": "unknown", "b": "unreachable"})

    def test_one_attacker_does_not_make_a_user_unreachable(self) -> None:
        """Issue 13: three false ``failed`` reports from one peer only decide that pair's view."""
        self.users("mallory", "bob")
        for n in range(3):
            self.assertEqual(self.attempt("mallory", "bob", "failed", 100.0 + n, witnesses=("bob", "mallory"))["bob"],
                             "unknown")
        self.assertEqual(self.db.get_user("bob").stunt_state, "unknown")
        self.assertEqual(self.db.pair_outcomes("mallory", 0.0)["bob"].failures, 3)  # the pair's own record

    def test_one_sides_report_never_moves_the_others_flag(self) -> None:
        self.users("a", "b", "c")
        # Only the callers reported failed; bob never said so himself.
        self.attempt("a", "b", "failed", 100.0, witnesses=("a",))
        self.assertEqual(self.attempt("c", "b", "failed", 101.0, witnesses=("c",))["b"], "unknown")
        # A claimed success moves only the claimant's own flag, too.
        self.assertEqual(self.attempt("a", "b", "direct", 102.0, witnesses=("a",))["b"], "unknown")
        self.assertEqual(self.attempt("a", "b", "stunt", 103.0, witnesses=("a",)), {"a": "stunt", "b": "unknown"})
        self.assertEqual(self.attempt("a", "b", "stunt", 104.0, witnesses=("b",)), {"a": "stunt", "b": "stunt"})
        # Nobody reported (the outcome timer): nobody's flag moves.
        self.users("d")
        self.assertEqual(self.attempt("d", "c", "direct", 105.0, witnesses=()), {"d": "unknown", "c": "unknown"})

    def test_bobs_own_failures_with_two_peers_count(self) -> None:
        self.users("a", "b", "c")
        self.attempt("a", "b", "failed", 100.0, witnesses=("b",))
        self.assertEqual(self.attempt("c", "b", "failed", 101.0, witnesses=("b",))["b"], "unreachable")

    def test_failure_after_recent_success_changes_nothing(self) -> None:
        self.users("a", "b", "c")
        self.attempt("a", "b", "stunt", 100.0)
        self.assertEqual(self.attempt("c", "b", "failed", 200.0), {"c": "unknown", "b": "stunt"})
        # A success as caller counts too.
        self.users("d")
        self.attempt("d", "a", "direct", 300.0)
        self.assertEqual(self.attempt("b", "d", "failed", 301.0)["d"], "unknown")

    def test_only_the_last_three_attempts_count(self) -> None:
        self.users("a", "b", "c")
        self.attempt("a", "b", "stunt", 100.0)
        self.assertEqual(self.attempt("a", "b", "failed", 101.0)["b"], "stunt")
        self.assertEqual(self.attempt("c", "b", "failed", 102.0)["b"], "stunt")
        self.assertEqual(self.attempt("a", "b", "failed", 103.0)["b"], "unreachable")

    def test_success_older_than_window_does_not_count(self) -> None:
        self.users("a", "b", "c")
        self.attempt("a", "b", "direct", 100.0)
        self.attempt("a", "b", "failed", 100.0 + RECENT_WINDOW + 1)
        states = self.attempt("c", "b", "failed", 100.0 + RECENT_WINDOW + 2)
        self.assertEqual(states["b"], "unreachable")

    def test_attempt_for_deleted_user_is_kept(self) -> None:
        self.users("a")
        self.assertEqual(self.attempt("a", "gone", "failed", 5.0), {"a": "unknown"})
        self.assertEqual([r.callee for r in self.db.recent_attempts("gone")], ["gone"])
        self.assertRaises(InvalidValue, self.attempt, "a", "gone", "maybe", 6.0)

    def test_recent_attempts_newest_first(self) -> None:
        self.users("a", "b", "c")
        self.attempt("a", "b", "direct", 1.0)
        self.attempt("b", "c", "stunt", 3.0, "sequential")
        self.attempt("c", "a", "failed", 2.0)
        got = self.db.recent_attempts("b")
        self.assertEqual([(r.caller, r.callee, r.outcome) for r in got],
                         [("b", "c", "stunt"), ("a", "b", "direct")])
        r = got[0]
        self.assertEqual(
            (r.call_id, r.technique, r.predicted, r.actual, r.duration_ms, r.when),
            ("call-3.0", "sequential", "198.51.100.1:5000", "198.51.100.1:5001", 12.5, 3.0),
        )
        self.assertEqual(len(self.db.recent_attempts("a", limit=1)), 1)

    # -- import ----------------------------------------------------------

    def test_import_many_rows(self) -> None:
        rows = [
            {"user_id": f"user{i:05d}", "password": f"pw{i}", "groups": f"all g{i % 7}"}
            for i in range(5000)
        ]
        self.db.add_group("all")  # existing groups are reused
        self.assertEqual(self.db.import_users(rows, REALM), 5000)
        self.assertEqual(len(self.db.list_users()), 5000)
        groups = self.db.list_groups()
        self.assertEqual(len(groups["all"]), 5000)
        self.assertEqual(len(groups["g3"]), len(range(3, 5000, 7)))
        self.assertEqual(self.db.get_ha1("user04321", "SHA-256"),
                         sha256_ha1("user04321", REALM, "pw4321"))

    def test_import_ha1_columns(self) -> None:
        md5 = md5_ha1("bob", REALM, "x")
        sha = sha256_ha1("carol", REALM, "y")
        rows = [
            {"user_id": "bob", "password": "", "ha1_md5": md5, "ha1_sha256": ""},
            {"user_id": "carol", "password": "", "ha1_md5": "", "ha1_sha256": sha},
        ]
        self.assertEqual(self.db.import_users(rows, REALM), 2)
        self.assertEqual(self.db.get_ha1("bob", "MD5"), md5)
        self.assertIsNone(self.db.get_ha1("bob", "SHA-256"))
        self.assertEqual(self.db.get_ha1("carol", "SHA-256"), sha)

    def assert_import_fails(self, rows: list[dict], row: int, text: str) -> None:
        e = self.assertRaises(ImportRowError, self.db.import_users, rows, REALM)
        self.assertEqual(e.row, row)
        self.assertIn(text, str(e))

    def test_import_is_all_or_nothing(self) -> None:
        rows = [{"user_id": f"u{i}", "password": "p", "groups": "newgroup"} for i in range(3000)]
        rows[2500]["user_id"] = "bad name"
        self.assert_import_fails(rows, 2501, "user_id")
        self.assertEqual(self.db.list_users(), [])
        self.assertEqual(self.db.list_groups(), {})

    def test_import_existing_user_fails_whole_import(self) -> None:
        self.users("u7")
        rows = [{"user_id": f"u{i}", "password": "p", "groups": "g"} for i in range(10)]
        self.assert_import_fails(rows, 8, "already exists")
        self.assertEqual([u.user_id for u in self.db.list_users()], ["u7"])
        self.assertEqual(self.db.list_groups(), {})

    def test_import_row_errors(self) -> None:
        ok = {"user_id": "a", "password": "p"}
        cases = [
            ([ok, {"user_id": "a", "password": "q"}], 2, "repeats row 1"),
            ([{"user_id": "", "password": "p"}], 1, "user_id"),
            ([{"password": "p"}], 1, "user_id"),
            ([ok, {"user_id": "b"}], 2, "password"),
            ([{"user_id": "b", "password": "p", "ha1_md5": "a" * 32}], 1, "not both"),
            ([{"user_id": "b", "ha1_md5": "xyz"}], 1, "ha1_md5"),
            ([{"user_id": "b", "ha1_sha256": "a" * 63}], 1, "ha1_sha256"),
            ([ok, ok | {"user_id": "c", "groups": "ok bad/name"}], 2, "groups"),
            ([{"user_id": "b", "pasword": "p"}], 1, "unknown column 'pasword'"),
            ([{"user_id": "b", "password": "p", None: ["extra"]}], 1, "more fields"),
        ]
        for rows, row, text in cases:
            self.assert_import_fails(rows, row, text)
        self.assertEqual(self.db.list_users(), [])


class SQLiteStoreTests(StoreTestsMixin, unittest.TestCase):
    def make_database(self) -> Database:
        path = os.path.join(self.mktemp() + ".d", "store.sqlite")
        os.makedirs(os.path.dirname(path))
        db = Database(f"sqlite:///{path}")
        db.upgrade()
        return db

    def test_wal_and_foreign_keys(self) -> None:
        with self.db.engine.connect() as c:
            self.assertEqual(c.exec_driver_sql("PRAGMA journal_mode").scalar(), "wal")
            self.assertEqual(c.exec_driver_sql("PRAGMA foreign_keys").scalar(), 1)

    def test_in_memory_database_is_shared_between_threads(self) -> None:
        db = Database("sqlite://")
        self.addCleanup(db.close)
        db.upgrade()
        db.add_user("alice", REALM, password="p")
        seen = []
        t = threading.Thread(target=lambda: seen.append(db.get_user("alice").user_id))
        t.start()
        t.join()
        self.assertEqual(seen, ["alice"])

    def test_unreachable_database_is_a_store_error(self) -> None:
        db = Database("sqlite:////nonexistent-dir/sub/x.sqlite")
        self.addCleanup(db.close)
        self.assertRaises(StoreUnavailable, db.upgrade)
        self.assertRaises(StoreUnavailable, Database, "nosuchdialect://x")


class NextStatesTests(unittest.TestCase):
    """The flag rule as a pure function."""

    def test_rule(self) -> None:
        def r(outcome: str, partner: str = "p", own: bool = True) -> RecentAttempt:
            return RecentAttempt(outcome, partner, own)

        cases = [
            (("direct", "unknown", "unreachable", [r("direct")]), ("unknown", "direct")),
            (("direct", "stunt", "stunt", [r("direct")]), ("stunt", "direct")),
            (("stunt", "unknown", "unknown", [r("stunt")]), ("stunt", "stunt")),
            (("stunt", "unreachable", "direct", [r("stunt")]), ("stunt", "stunt")),
            (("stunt", "direct", "unknown", [r("stunt")]), ("direct", "stunt")),
            (("failed", "stunt", "direct", [r("failed")]), ("stunt", "direct")),  # one peer
            (("failed", "stunt", "direct", [r("failed", "p"), r("failed", "q")]), ("stunt", "unreachable")),
            (("failed", "stunt", "direct", [r("failed", "p"), r("failed", "p"), r("failed", "p")]),
             ("stunt", "direct")),
            (("failed", "stunt", "direct", [r("failed", "p"), r("failed", "q", own=False)]), ("stunt", "direct")),
            (("failed", "stunt", "direct", [r("failed", "p"), r("stunt", "q"), r("failed", "s")]),
             ("stunt", "direct")),
            (("failed", "unknown", "unknown", []), ("unknown", "unknown")),
        ]
        for args, expected in cases:
            self.assertEqual(next_states(*args), expected, args)
        self.assertEqual(next_states("direct", "unknown", "stunt", [], callee_reported=False), ("unknown", "stunt"))
        self.assertEqual(next_states("stunt", "unknown", "unknown", [], caller_reported=False), ("unknown", "stunt"))
