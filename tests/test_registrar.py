"""The registrar's bindings: expiry, replacement, lost connections."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.registrar import Registrar


class FakeConnection:
    def __init__(self, port: int) -> None:
        self.peer = ("192.0.2.1", port)
        self.user_ids: set[str] = set()
        self.sent: list[object] = []

    @property
    def rtt(self) -> float | None:
        return None

    def send(self, message: object) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass

    def bound(self, user_id: str) -> None:
        self.user_ids.add(user_id)

    def unbound(self, user_id: str) -> None:
        self.user_ids.discard(user_id)


class RegistrarTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registrar = Registrar(self.clock)
        self.events: list[tuple[str, bool]] = []
        self.registrar.subscribe(lambda user, online: self.events.append((user, online)))

    def test_binding_expires(self) -> None:
        conn = FakeConnection(1)
        self.registrar.bind("alice", conn, "<sips:alice@x>", 60)
        self.clock.advance(59)
        self.assertIsNotNone(self.registrar.lookup("alice"))
        self.clock.advance(1)
        self.assertIsNone(self.registrar.lookup("alice"))
        self.assertEqual(conn.user_ids, set())
        self.assertEqual(self.events, [("alice", True), ("alice", False)])

    def test_refresh_extends(self) -> None:
        conn = FakeConnection(1)
        self.registrar.bind("alice", conn, "<sips:alice@x>", 60)
        self.clock.advance(50)
        self.registrar.bind("alice", conn, "<sips:alice@x>", 60)
        self.clock.advance(50)
        self.assertIsNotNone(self.registrar.lookup("alice"))
        self.assertEqual(self.events, [("alice", True)])

    def test_other_connection_replaces(self) -> None:
        old, new = FakeConnection(1), FakeConnection(2)
        self.registrar.bind("alice", old, "<sips:alice@x>", 60)
        self.registrar.bind("alice", new, "<sips:alice@y>", 60)
        self.assertIs(self.registrar.lookup("alice").connection, new)
        self.assertEqual(old.user_ids, set())
        # The old connection going away must not remove the new binding.
        self.assertEqual(self.registrar.connection_lost(old), [])
        self.assertIsNotNone(self.registrar.lookup("alice"))
        # Nor may the old binding's timer.
        self.clock.advance(30)
        self.registrar.bind("alice", new, "<sips:alice@y>", 60)
        self.clock.advance(45)
        self.assertIsNotNone(self.registrar.lookup("alice"))

    def test_connection_lost_unbinds_all_its_users(self) -> None:
        conn = FakeConnection(1)
        self.registrar.bind("alice", conn, "<sips:alice@x>", 60)
        self.registrar.bind("bob", conn, "<sips:bob@x>", 60)
        self.assertEqual(sorted(self.registrar.connection_lost(conn)), ["alice", "bob"])
        self.assertEqual(len(self.registrar), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unbind_only_from_named_connection(self) -> None:
        a, b = FakeConnection(1), FakeConnection(2)
        self.registrar.bind("alice", a, "<sips:alice@x>", 60)
        self.assertFalse(self.registrar.unbind("alice", b))
        self.assertTrue(self.registrar.unbind("alice", a))
        self.assertFalse(self.registrar.unbind("alice"))
