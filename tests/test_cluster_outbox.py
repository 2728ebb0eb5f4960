"""The cluster bus: payloads gathered per reactor turn, packed per channel, one query in flight on one connection."""

from __future__ import annotations

import psycopg2
from psycopg2.extensions import POLL_OK, POLL_READ, Notify
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from kerjostunt.store.channels import Channels
from kerjostunt.store.outbox import Outbox, pack, unpack


class PackTests(unittest.TestCase):
    def test_each_channels_payloads_share_notifications_in_order(self) -> None:
        items = [("a", "1", 1), ("b", "2", 1), ("a", "3", 1)]
        self.assertEqual(pack(items), [("a", "1\n3"), ("b", "2")])
        self.assertEqual(unpack("1\n3"), ["1", "3"])

    def test_a_notification_never_exceeds_the_limit(self) -> None:
        items = [("a", "x" * 4, 4) for _ in range(5)]
        notes = pack(items, limit=9)  # two payloads and a separator fit, a third does not
        self.assertEqual(notes, [("a", "xxxx\nxxxx"), ("a", "xxxx\nxxxx"), ("a", "xxxx")])
        self.assertEqual(sum(len(unpack(text)) for _, text in notes), 5)


class Harness:
    def __init__(self, spacing: float = 0.001, batch: int = 200, limit: int = 7900, at_once: bool = False) -> None:
        self.clock = Clock()
        self.sends: list[list[tuple[str, str]]] = []
        self.failures: list[str] = []
        self.outbox = Outbox(self.clock, self.sends.append, self.failures.append, limit=limit, batch=batch,
                             spacing=spacing, at_once=at_once)
        self.outbox.start()


class OutboxTests(unittest.TestCase):
    def test_an_idle_outbox_sends_at_once_and_gathers_while_a_round_trip_is_out(self) -> None:
        h = Harness(spacing=0.0, at_once=True)
        h.outbox.add("a", "1")
        self.assertEqual(h.sends, [[("a", "1")]])
        h.outbox.add("a", "2")
        h.outbox.add("b", "3")
        h.outbox.add("a", "4")
        self.assertEqual(len(h.sends), 1)
        h.outbox.sent()  # the next batch goes as the first comes back
        self.assertEqual(h.sends[1:], [[("a", "2\n4"), ("b", "3")]])
        self.assertEqual(h.clock.getDelayedCalls(), [])  # no timers at all

    def test_one_turns_payloads_go_as_one_send_at_the_end_of_the_turn(self) -> None:
        h = Harness()
        self.assertTrue(h.outbox.add("a", "1"))
        self.assertTrue(h.outbox.add("b", "2"))
        self.assertTrue(h.outbox.add("a", "3"))
        self.assertEqual(h.sends, [])  # never inside add: the caller's step finishes first
        h.clock.advance(0)
        self.assertEqual(h.sends, [[("a", "1\n3"), ("b", "2")]])

    def test_one_send_in_flight_then_the_rest_together_no_sooner_than_the_spacing(self) -> None:
        h = Harness(spacing=0.001)
        h.outbox.add("a", "1")
        h.clock.advance(0)
        h.outbox.add("a", "2")
        h.outbox.add("a", "3")
        h.clock.advance(0.01)
        self.assertEqual(len(h.sends), 1)  # the first round trip is still out
        h.outbox.sent()
        h.clock.advance(0)
        self.assertEqual(h.sends[1:], [[("a", "2\n3")]])  # its spacing was over: at once

    def test_a_busy_sender_waits_for_the_spacing(self) -> None:
        h = Harness(spacing=0.001)
        h.outbox.add("a", "1")
        h.clock.advance(0)
        h.outbox.sent()  # back within the same instant
        h.outbox.add("a", "2")
        h.clock.advance(0)
        self.assertEqual(len(h.sends), 1)
        h.outbox.add("a", "3")
        h.clock.advance(0.001)
        self.assertEqual(h.sends[1:], [[("a", "2\n3")]])

    def test_nothing_goes_before_the_connection_is_up(self) -> None:
        h = Harness()
        outbox = Outbox(h.clock, h.sends.append, h.failures.append, at_once=False)
        outbox.add("a", "1")
        h.clock.advance(1)
        self.assertEqual(h.sends, [])
        outbox.start()
        h.clock.advance(0)
        self.assertEqual(h.sends, [[("a", "1")]])

    def test_too_large_or_multi_line_payloads_are_refused(self) -> None:
        h = Harness(limit=10)
        self.assertFalse(h.outbox.add("a", "x" * 11))
        self.assertFalse(h.outbox.add("a", "é" * 6))  # 12 bytes in UTF-8
        self.assertFalse(h.outbox.add("a", "1\n2"))
        self.assertTrue(h.outbox.add("a", "x" * 10))
        h.clock.advance(0)
        self.assertEqual(h.sends, [[("a", "x" * 10)]])

    def test_more_than_a_batch_waits_for_the_next_round_trip_in_order(self) -> None:
        h = Harness(batch=2, limit=3)
        for channel, payload in [("a", "1"), ("b", "2"), ("a", "3"), ("a", "4"), ("b", "5")]:
            h.outbox.add(channel, payload)
        h.clock.advance(0)
        self.assertEqual(h.sends, [[("a", "1\n3"), ("a", "4")]])
        self.assertEqual(len(h.outbox), 2)
        h.outbox.sent()
        h.clock.advance(1)
        self.assertEqual(h.sends[1:], [[("b", "2\n5")]])

    def test_flushed_fires_once_everything_is_sent(self) -> None:
        h = Harness()
        self.successResultOf(h.outbox.flushed())  # nothing queued
        h.outbox.add("a", "1")
        d = h.outbox.flushed()
        h.clock.advance(0)
        self.assertNoResult(d)
        h.outbox.sent()
        self.successResultOf(d)

    def test_close_drops_what_waits_and_fires_the_waiters(self) -> None:
        h = Harness()
        h.outbox.add("a", "1")
        d = h.outbox.flushed()
        h.outbox.close()
        self.successResultOf(d)
        h.clock.advance(1)
        self.assertEqual(h.sends, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_send_that_raises_is_a_failure(self) -> None:
        clock = Clock()
        failures: list[str] = []

        def broken(batch: list[tuple[str, str]]) -> None:
            raise OSError("connection reset")

        outbox = Outbox(clock, broken, failures.append)
        outbox.start()
        outbox.add("a", "1")
        self.assertEqual(failures, ["sending: connection reset"])


class FakeCursor:
    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection

    def mogrify(self, query: str, args: tuple[str, str]) -> bytes:
        return (query % tuple(f"'{a}'" for a in args)).encode()

    def execute(self, query: bytes) -> None:
        self.connection.queries.append(query)
        self.connection.states = [POLL_READ, POLL_OK]


class FakeConnection:
    """psycopg2's asynchronous connection as ``Channels`` drives it."""

    closed = False

    def __init__(self) -> None:
        self.queries: list[bytes] = []
        self.states: list[int] = []
        self.notifies: list[Notify] = []
        #: what the socket holds: the next poll reads it into ``notifies``
        self.read_by_next_poll: list[Notify] = []
        self.broken = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def poll(self) -> int:
        if self.broken:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        self.notifies += self.read_by_next_poll
        self.read_by_next_poll = []
        return self.states.pop(0) if self.states else POLL_OK

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


class ChannelsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.got: list[tuple[str, str]] = []
        self.lost: list[str] = []
        self.channels = Channels(self.reactor, "postgresql://x@127.0.0.1/db", ["me"],
                                 lambda c, p: self.got.append((c, p)), self.lost.append)
        self.connection = FakeConnection()
        self.channels._connected(self.connection)

    def test_one_query_in_flight_and_what_came_meanwhile_in_the_next(self) -> None:
        self.assertIn(self.channels, self.reactor.getReaders())
        self.channels.notify("other", "a")
        self.assertEqual(self.connection.queries, [b"SELECT pg_notify('other', 'a')"])
        self.channels.notify("other", "b")
        self.channels.notify("other", "c")
        self.reactor.advance(0.01)
        self.assertEqual(len(self.connection.queries), 1)  # the round trip is out
        self.channels.doRead()  # its result came: the next goes from there
        self.assertEqual(self.connection.queries[1:], [b"SELECT pg_notify('other', 'b\nc')"])
        self.assertIn(self.channels, self.reactor.getReaders())  # watched between queries too

    def test_a_notification_is_split_into_its_payloads(self) -> None:
        self.connection.notifies.append(Notify(1, "me", "x\ny"))
        self.channels.doRead()
        self.assertEqual(self.got, [("me", "x"), ("me", "y")])

    def test_a_send_from_a_handler_never_delivers_the_next_notification_inside_it(self) -> None:
        order: list[str] = []

        def received(channel: str, payload: str) -> None:
            order.append(f"begin {payload}")
            self.channels.notify("other", "answer")  # sends at once: polls the connection
            order.append(f"end {payload}")

        self.channels._received = received
        self.connection.notifies.extend([Notify(1, "me", "x"), Notify(1, "me", "y")])
        self.channels.doRead()
        self.assertEqual(order, ["begin x", "end x", "begin y", "end y"])

    def test_a_notification_read_by_a_send_is_handed_over_in_a_later_turn(self) -> None:
        """The send's own poll may read one off the socket along with its query's result;
        the socket is not readable again for it, so it must not wait for the next one."""

        self.connection.read_by_next_poll.append(Notify(2, "me", "from the other instance"))
        self.channels.notify("other", "out")
        self.assertEqual((len(self.connection.queries), self.got), (1, []))  # not inside notify
        self.reactor.advance(0)
        self.assertEqual(self.got, [("me", "from the other instance")])

    def test_a_broken_connection_is_lost_once_and_closed(self) -> None:
        self.connection.broken = True
        self.channels.doRead()
        self.channels.doRead()
        self.assertEqual(len(self.lost), 1)
        self.assertTrue(self.connection.closed)
        self.assertNotIn(self.channels, self.reactor.getReaders())
        self.assertTrue(self.channels.notify("other", "late"))  # dropped quietly: the owner reconnects
        self.reactor.advance(1)
        self.assertEqual(self.connection.queries, [])
