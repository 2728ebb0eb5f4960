"""The store's core operations against a real PostgreSQL server.

Set KERJOSTUNT_TEST_POSTGRES_URL (``.ci/start-postgres`` prints one) to run
them; each test starts from an empty ``public`` schema, migrated by Alembic.
"""

from __future__ import annotations

import os
import threading

from twisted.trial import unittest

from kerjostunt.store import Database, StoreBusy
from kerjostunt.store import database as database_module
from tests.test_store import StoreTestsMixin

URL = os.environ.get("KERJOSTUNT_TEST_POSTGRES_URL", "")


class PostgresStoreTests(StoreTestsMixin, unittest.TestCase):
    if not URL:
        skip = (
            "KERJOSTUNT_TEST_POSTGRES_URL is not set "
            "(run .ci/start-postgres and export the URL it prints)"
        )

    def make_database(self) -> Database:
        db = Database(URL)
        with db.engine.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        db.upgrade()
        return db

    def test_it_is_postgres(self) -> None:
        self.assertFalse(self.db.is_sqlite)
        self.assertEqual(self.db.engine.dialect.driver, "psycopg2")

    def test_concurrent_outcomes_for_one_user(self) -> None:
        """Row locks serialize the read-modify-write of the flags: many
        threads failing towards one callee all end up recorded."""
        self.users("target", *[f"c{i}" for i in range(8)])
        self.db.record_attempt("ok", "c0", "target", None, "stunt", None, None, 1.0, 1.0)
        errors: list[BaseException] = []

        def fail_towards(i: int) -> None:
            try:
                self.db.record_attempt(f"x{i}", f"c{i}", "target", None, "failed",
                                       None, None, 1.0, 2.0 + i)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=fail_towards, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(self.db.recent_attempts("target", limit=100)), 9)
        self.assertEqual(self.db.get_user("target").stunt_state, "unreachable")


class IdlePingTests(unittest.TestCase):
    """A pooled connection is pinged only when idle over ``PING_AFTER`` (store/database.py)."""

    if not URL:
        skip = "KERJOSTUNT_TEST_POSTGRES_URL is not set (run .ci/start-postgres and export the URL it prints)"

    def setUp(self) -> None:
        self.db = Database(URL)
        self.addCleanup(self.db.close)
        self.db.upgrade()
        self.db.list_users()  # one connection in the pool, just used

    def kill_the_pooled_connection(self) -> None:
        admin = Database(URL)
        try:
            with admin.engine.begin() as c:
                c.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            admin.close()

    def test_an_idle_connection_is_pinged_and_replaced(self) -> None:
        self.patch(database_module, "PING_AFTER", 0.0)
        self.kill_the_pooled_connection()
        self.assertIsInstance(self.db.list_users(), list)  # the ping found it dead: a new one served

    def test_a_connection_just_used_is_not_pinged(self) -> None:
        self.patch(database_module, "PING_AFTER", 3600.0)
        self.kill_the_pooled_connection()
        with self.assertRaises(StoreBusy):  # the cost of no ping: one failure, retried by the lanes
            self.db.list_users()
        self.assertIsInstance(self.db.list_users(), list)  # SQLAlchemy dropped the dead one
