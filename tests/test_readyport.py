"""ReadyPort: the next call's punch port, probed ahead of time (client/readyport.py)."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.client.nat.readyport import PreparedPort, ReadyPort


class Preparations:
    """A prepare function whose preparations the test finishes by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[defer.Deferred] = []
        self.made: list[PreparedPort] = []

    def __call__(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, mapped: tuple[int, ...] = (50000,)) -> PreparedPort:
        holder = socket.socket()
        results = [ProbeResult(("192.0.2.1", 3478 + i), 40000, "198.51.100.7", port) for i, port in enumerate(mapped)]
        port = PreparedPort(holder, "127.0.0.1", 40000 + len(self.made), results, self.clock.seconds())
        self.made.append(port)
        self.pending.pop(0).callback(port)
        return port


def closed(port: PreparedPort) -> bool:
    return port.holder.fileno() == -1


class ReadyPortTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.prep = Preparations(self.clock)
        self.ready = ReadyPort(self.clock, self.prep, max_age=30.0, settle=0.5)
        self.addCleanup(self.ready.clear)
        self.addCleanup(lambda: [p.close() for p in self.prep.made])

    def test_refill_now_prepares_and_take_hands_the_port_over_once(self) -> None:
        self.ready.refill(0)
        self.assertEqual(len(self.prep.pending), 1)
        port = self.prep.finish()
        self.assertTrue(self.ready.ready)
        self.assertIs(self.successResultOf(self.ready.take()), port)
        self.assertIsNone(self.successResultOf(self.ready.take()))
        self.assertFalse(closed(port))  # the call owns it now

    def test_refill_waits_for_the_settle_time(self) -> None:
        """After a call: no probes while another might still be punching."""
        self.ready.refill()
        self.assertEqual(self.prep.pending, [])
        self.clock.advance(0.49)
        self.assertEqual(self.prep.pending, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.prep.pending), 1)

    def test_take_cancels_a_scheduled_refill(self) -> None:
        """A call that starts in the settle time probes for itself; no probes run beside it."""
        self.ready.refill()
        self.assertIsNone(self.successResultOf(self.ready.take()))
        self.clock.advance(5)
        self.assertEqual(self.prep.pending, [])

    def test_take_during_a_preparation_waits_for_it(self) -> None:
        self.ready.refill(0)
        first, second = self.ready.take(), self.ready.take()
        self.assertNoResult(first)
        port = self.prep.finish()
        self.assertIs(self.successResultOf(first), port)
        self.assertIsNone(self.successResultOf(second))  # only one call gets it
        self.assertFalse(self.ready.ready)

    def test_a_stale_port_is_closed_not_handed_out(self) -> None:
        self.ready.refill(0)
        port = self.prep.finish()
        self.clock.advance(30.5)
        self.assertFalse(self.ready.ready)
        self.assertIsNone(self.successResultOf(self.ready.take()))
        self.assertTrue(closed(port))

    def test_an_address_dependent_mapping_ages_faster(self) -> None:
        """Its prediction extrapolates the NAT's counter, which other connections move on."""
        self.ready.refill(0)
        port = self.prep.finish(mapped=(50000, 50001, 50002))
        self.assertFalse(port.endpoint_independent)
        self.assertTrue(port.extrapolated)
        self.clock.advance(5.5)
        self.assertFalse(self.ready.ready)
        self.assertIsNone(self.successResultOf(self.ready.take()))
        self.assertTrue(closed(port))

    def test_a_random_allocation_keeps_for_max_age(self) -> None:
        """No counter to extrapolate: a random NAT's port is as good at 29 s as at 1 s."""
        self.ready.refill(0)
        port = self.prep.finish(mapped=(50000, 13377, 61234))
        self.assertFalse(port.endpoint_independent)
        self.assertFalse(port.extrapolated)
        self.clock.advance(29)
        self.assertIs(self.successResultOf(self.ready.take()), port)

    def test_an_endpoint_independent_mapping_keeps_for_max_age(self) -> None:
        self.ready.refill(0)
        port = self.prep.finish(mapped=(50000, 50000, 50000))
        self.assertTrue(port.endpoint_independent)
        self.clock.advance(29)
        self.assertIs(self.successResultOf(self.ready.take()), port)

    def test_refill_replaces_a_stale_port(self) -> None:
        self.ready.refill(0)
        old = self.prep.finish()
        self.clock.advance(31)
        self.ready.refill(0)
        self.assertTrue(closed(old))
        new = self.prep.finish()
        self.assertIs(self.successResultOf(self.ready.take()), new)

    def test_no_second_preparation_while_one_is_ready_or_running(self) -> None:
        self.ready.refill(0)
        self.ready.refill(0)
        self.assertEqual(len(self.prep.pending), 1)
        self.prep.finish()
        self.ready.refill(0)
        self.assertEqual(self.prep.pending, [])

    def test_when_ready_fires_after_the_preparation_and_leaves_the_port(self) -> None:
        self.ready.refill(0)
        waited = self.ready.when_ready()
        self.assertNoResult(waited)
        port = self.prep.finish()
        self.successResultOf(waited)
        self.assertIs(self.successResultOf(self.ready.take()), port)

    def test_failed_preparation_leaves_nothing_and_wakes_takers(self) -> None:
        self.ready.refill(0)
        taker = self.ready.take()
        self.prep.pending.pop(0).errback(OSError("probe server unreachable"))
        self.assertIsNone(self.successResultOf(taker))
        self.assertFalse(self.ready.ready)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_failed_preparation_is_remembered_until_max_age_or_a_success(self) -> None:
        """Calls then skip probing instead of waiting out the same timeouts."""
        self.ready.refill(0)
        self.prep.pending.pop(0).errback(OSError("no probe server answers"))
        self.assertTrue(self.ready.failed_recently())
        self.clock.advance(29)
        self.assertTrue(self.ready.failed_recently())
        self.clock.advance(1)
        self.assertFalse(self.ready.failed_recently())
        self.ready.refill(0)
        self.prep.pending.pop(0).errback(OSError("still nothing"))
        self.ready.refill(0)
        self.prep.finish()
        self.assertFalse(self.ready.failed_recently())

    def test_clear_closes_the_port_and_discards_a_late_preparation(self) -> None:
        self.ready.refill(0)
        port = self.prep.finish()
        self.ready.clear()
        self.assertTrue(closed(port))
        self.ready.refill(0)
        taker = self.ready.take()
        self.ready.clear()  # signaling lost while probing
        self.assertIsNone(self.successResultOf(taker))
        late = self.prep.finish()
        self.assertTrue(closed(late))
        self.assertIsNone(self.successResultOf(self.ready.take()))


class AgentStartTests(unittest.TestCase):
    """PeerAgent.start fires only once the first punch port is prepared."""

    def test_start_waits_for_the_first_port(self) -> None:
        from kerjostunt.client.agent import PeerAgent

        clock = Clock()
        agent = PeerAgent(clock, server=("127.0.0.1", 5061), user_id="alice", password="x", domain="d",
                          ca_path="unused", listen_port=None)
        prep = Preparations(clock)
        agent.ready_port.prepare = prep
        registered: defer.Deferred = defer.Deferred()

        def connect_and_register() -> defer.Deferred:
            def up(result: Any) -> Any:
                agent.state = "up"
                agent.ready_port.refill(0)
                return result
            return registered.addCallback(up)

        agent._connect_and_register = connect_and_register  # type: ignore[method-assign]
        started = agent.start()
        registered.callback("registration")
        self.assertNoResult(started)
        port = prep.finish()
        self.assertEqual(self.successResultOf(started), "registration")
        self.assertIs(self.successResultOf(agent.ready_port.take()), port)
        port.close()

    def test_start_does_not_wait_out_silent_probe_ports(self) -> None:
        from kerjostunt.client.agent import START_PROBE_WAIT, PeerAgent

        clock = Clock()
        agent = PeerAgent(clock, server=("127.0.0.1", 5061), user_id="alice", password="x", domain="d",
                          ca_path="unused", listen_port=None)
        prep = Preparations(clock)
        agent.ready_port.prepare = prep

        def connect_and_register() -> defer.Deferred:
            agent.state = "up"
            agent.ready_port.refill(0)
            return defer.succeed("registration")

        agent._connect_and_register = connect_and_register  # type: ignore[method-assign]
        started = agent.start()
        self.assertNoResult(started)
        clock.advance(START_PROBE_WAIT)
        self.assertEqual(self.successResultOf(started), "registration")
        # The preparation goes on; a call would wait for it.
        taker = agent.ready_port.take()
        self.assertNoResult(taker)
        port = prep.finish()
        self.assertIs(self.successResultOf(taker), port)
        port.close()
