"""The peer manager on a Clock with a fake agent and a fake directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.client.backoff import Backoff
from kerjostunt.client.calls import ConnectFailed
from kerjostunt.client.manager import (
    BACKOFF,
    CONNECTED,
    CONNECTING,
    UNREACHABLE,
    ManagerConfig,
    PeerListLoaded,
    PeerManager,
    PeerStateChanged,
    SignalingChanged,
    SignalingState,
)
from kerjostunt.wire import kerjo


@dataclass(frozen=True)
class Entry:
    user_id: str
    use_stunt: Any = "unknown"
    ip: str | None = "198.51.100.7"
    port: int | None = 40000
    nat: Any = None
    online: bool | None = True


@dataclass(frozen=True)
class Conn:
    peer_id: str
    protocol: Any
    technique: str = "direct"
    outcome: str = "direct"
    remote: tuple[str, int] = ("198.51.100.7", 40000)
    elapsed_ms: float = 12.0


class App(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True


class FakeAgent:
    """start/stop/connect recorded; each dial returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.starts = 0
        self.stops = 0
        self.signaling_up = False
        self.public_ip: str | None = None
        self.dials: list[tuple[str, Any, dict[str, Any], defer.Deferred]] = []
        self.cancelled: list[str] = []
        self.start_results: list[Any] = []  # queued outcomes of start(); default success

    def start(self) -> defer.Deferred:
        self.starts += 1
        if self.start_results:
            outcome = self.start_results.pop(0)
            if isinstance(outcome, Exception):
                return defer.fail(outcome)
        self.signaling_up = True
        return defer.succeed("registration")

    def stop(self) -> defer.Deferred:
        self.stops += 1
        self.signaling_up = False
        return defer.succeed(None)

    def connect(self, peer_id: str, protocol_factory: Any, *, timeout: float = 20.0, prefer_stunt: bool = False) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred(lambda _: self.cancelled.append(peer_id))
        kwargs = {"timeout": timeout}
        if prefer_stunt:
            kwargs["prefer_stunt"] = prefer_stunt
        self.dials.append((peer_id, protocol_factory, kwargs, d))
        return d

    # -- test helpers

    def dials_to(self, peer_id: str) -> list[tuple[str, Any, dict[str, Any], defer.Deferred]]:
        return [dial for dial in self.dials if dial[0] == peer_id]

    def last_dial(self, peer_id: str) -> tuple[str, Any, dict[str, Any], defer.Deferred]:
        return self.dials_to(peer_id)[-1]

    def succeed(self, peer_id: str, technique: str = "direct") -> Any:
        _, factory, _, d = self.last_dial(peer_id)
        proto = factory.buildProtocol(("198.51.100.7", 40000))
        proto.makeConnection(StringTransport())
        d.callback(Conn(peer_id, proto, technique=technique))
        return proto

    def fail(self, peer_id: str, reason: str = "timeout") -> None:
        self.last_dial(peer_id)[3].errback(ConnectFailed(reason))


def drop(proto: Any) -> None:
    proto.connectionLost(Failure(ConnectionDone()))


class Harness:
    def __init__(self, case: unittest.TestCase, entries: list[Entry], agent: FakeAgent | None = None, user_id: str = "alice", **kwargs: Any) -> None:
        self.clock = Clock()
        self.agent = agent or FakeAgent()
        self.entries = list(entries)
        self.events: list[Any] = []
        self.directory_calls = 0
        self.apps: list[App] = []
        random = kwargs.pop("random", lambda: 0.0)
        # Most tests look at one peer's rules: every dial at once, no courtesy
        # wait (DialPacingTests cover those two).
        kwargs.setdefault("max_dials", 100)
        kwargs.setdefault("courtesy_delay", 0.0)
        self.manager = PeerManager(
            self.clock,
            group="friends",
            user_id=user_id,
            directory=self.directory,
            agent=self.agent,
            app_factory_for=self.app_factory,
            config=ManagerConfig(**kwargs),
            random=random,
            on_event=self.events.append,
        )

    def directory(self) -> defer.Deferred:
        self.directory_calls += 1
        return defer.succeed(list(self.entries))

    def app_factory(self, peer_id: str) -> Factory:
        def build() -> App:
            app = App()
            self.apps.append(app)
            return app

        return Factory.forProtocol(build)

    def signaling_events(self) -> list[SignalingChanged]:
        return [e for e in self.events if isinstance(e, SignalingChanged)]

    def states_of(self, peer_id: str) -> list[str]:
        return [e.new for e in self.events if isinstance(e, PeerStateChanged) and e.peer_id == peer_id]


def make(case: unittest.TestCase, *ids: str, **kwargs: Any) -> Harness:
    entries = [Entry("alice")] + [Entry(i) if isinstance(i, str) else i for i in ids]
    return Harness(case, entries, **kwargs)


class SignalingRuleTests(unittest.TestCase):
    def test_loads_list_without_self_and_opens_signaling(self) -> None:
        h = make(self, "bob", "carol")
        h.manager.start()
        self.assertEqual(h.manager.states(), {"bob": CONNECTING, "carol": CONNECTING})
        self.assertEqual(h.agent.starts, 1)
        self.assertEqual(h.signaling_events(), [SignalingChanged(True, "starting")])
        self.assertEqual(sorted(d[0] for d in h.agent.dials), ["bob", "carol"])
        loaded = [e for e in h.events if isinstance(e, PeerListLoaded)]
        self.assertEqual(loaded[0].peers, ("bob", "carol"))

    def test_closes_when_last_peer_connects(self) -> None:
        h = make(self, "bob", "carol")
        h.manager.start()
        h.agent.succeed("bob", "simultaneous-open")
        self.assertEqual(h.agent.stops, 0)
        self.assertEqual(h.manager.signaling, SignalingState.OPEN)
        h.agent.succeed("carol")
        self.assertEqual(h.agent.stops, 1)
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(False, "all 2 peers done"))
        connected = [e for e in h.events if isinstance(e, PeerStateChanged) and e.new == CONNECTED]
        self.assertEqual(connected[0].technique, "simultaneous-open")
        self.assertEqual(connected[0].detail, "via simultaneous-open")

    def test_closes_when_last_peer_marked_unreachable_locally(self) -> None:
        h = make(self, "bob", "carol", max_failures=3)
        h.manager.start()
        h.agent.succeed("bob")
        for attempt in range(3):
            self.assertEqual(h.manager.state_of("carol"), CONNECTING)
            h.agent.fail("carol", "no route")
            self.assertEqual(h.agent.stops, 0 if attempt < 2 else 1)
            h.clock.advance(h.manager.config.backoff_max)
        self.assertEqual(h.manager.state_of("carol"), UNREACHABLE)
        self.assertEqual(len(h.agent.dials_to("carol")), 3)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(False, "all 2 peers done"))

    def test_server_flagged_unreachable_counts_as_done_and_is_not_dialed(self) -> None:
        h = make(self, Entry("bob", "unreachable"), "carol")
        h.manager.start()
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE)
        self.assertEqual(h.agent.dials_to("bob"), [])
        h.agent.succeed("carol")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        self.assertEqual(h.agent.stops, 1)

    def test_all_unreachable_never_opens(self) -> None:
        h = make(self, Entry("bob", "unreachable"))
        h.manager.start()
        self.assertEqual(h.agent.starts, 0)
        self.assertEqual(h.signaling_events(), [])

    def test_empty_group_never_opens(self) -> None:
        h = make(self)
        h.manager.start()
        self.assertEqual(h.agent.starts, 0)
        self.assertTrue(h.manager.all_done())

    def test_reopens_when_a_peer_drops_and_redials(self) -> None:
        h = make(self, "bob", "carol")
        h.manager.start()
        bob = h.agent.succeed("bob")
        h.agent.succeed("carol")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        drop(bob)
        self.assertTrue(h.apps[0].lost, "the application saw the loss too")
        self.assertEqual(h.agent.starts, 2)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(True, "bob dropped"))
        self.assertEqual(h.manager.state_of("bob"), CONNECTING)
        self.assertEqual(len(h.agent.dials_to("bob")), 2)
        self.assertEqual(len(h.agent.dials_to("carol")), 1)
        h.agent.succeed("bob")
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(False, "all 2 peers done"))

    def test_refresh_adds_a_peer_and_reopens(self) -> None:
        h = make(self, "bob", refresh_interval=300.0)
        h.manager.start()
        h.agent.succeed("bob")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        h.entries.append(Entry("dave"))
        h.clock.advance(299)
        self.assertEqual(h.directory_calls, 1)
        self.assertEqual(h.agent.starts, 1)
        h.clock.advance(1)
        self.assertEqual(h.directory_calls, 2)
        self.assertEqual(h.agent.starts, 2)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(True, "list changed: new peer dave"))
        self.assertEqual(h.manager.state_of("dave"), CONNECTING)
        self.assertEqual(len(h.agent.dials_to("bob")), 1, "connected peers are left alone")
        h.agent.succeed("dave")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)

    def test_refresh_with_same_list_keeps_signaling_closed(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        h.agent.succeed("bob")
        for _ in range(5):
            h.clock.advance(300)
        self.assertEqual(h.directory_calls, 6)
        self.assertEqual(h.agent.starts, 1)

    def test_removed_peer_is_forgotten_and_its_connection_closed(self) -> None:
        h = make(self, "bob", "carol")
        h.manager.start()
        bob = h.agent.succeed("bob")
        h.entries = [Entry("alice"), Entry("carol")]
        h.manager.refresh()
        self.assertNotIn("bob", h.manager.states())
        self.assertTrue(bob.transport.disconnecting)
        drop(bob)  # its loss is not a drop of a tracked peer
        self.assertEqual(h.agent.starts, 1)
        h.agent.succeed("carol")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)

    def test_flag_turning_unreachable_while_backing_off_counts_as_done(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), BACKOFF)
        h.entries = [Entry("alice"), Entry("bob", "unreachable")]
        h.manager.refresh()
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE)
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)

    def test_offline_peer_is_dialed_and_absence_does_not_count(self) -> None:
        # The list's "online" is stale by nature: dial anyway. A 480 (not
        # registered) backs off but never makes the peer unreachable.
        h = make(self, Entry("bob", online=False), max_failures=2)
        h.manager.start()
        for attempt in range(1, 6):
            self.assertEqual(len(h.agent.dials_to("bob")), attempt)
            h.agent.last_dial("bob")[3].errback(ConnectFailed("480 Temporarily Unavailable", code=480))
            self.assertEqual(h.manager.state_of("bob"), BACKOFF)
            h.clock.advance(h.manager.config.backoff_max)
        self.assertEqual(h.manager.signaling, SignalingState.OPEN, "an absent peer keeps signaling open")
        h.agent.succeed("bob")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)

    def test_offline_after_the_pair_failed_counts_as_given_up(self) -> None:
        # Issue 12: the peer gave the pair up and closed its signaling; the
        # server's 480 says the pair's calls failed. Not an absence: the pair
        # is unreachable on this side too, and signaling closes.
        h = make(self, "bob", "carol")
        h.manager.start()
        h.agent.succeed("carol")
        reason = f"480 {kerjo.PAIR_FAILED_REASON}"
        h.agent.last_dial("bob")[3].errback(ConnectFailed(reason, code=480))
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE)
        self.assertEqual(len(h.agent.dials_to("bob")), 1)
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        self.assertIn("the pair failed", h.states_of("bob") and [e.detail for e in h.events
                      if isinstance(e, PeerStateChanged) and e.new == UNREACHABLE][-1])
        # Not called again until the long retry.
        h.clock.advance(h.manager.config.unreachable_retry - 1)
        self.assertEqual(len(h.agent.dials_to("bob")), 1)

    def test_signaling_start_failure_is_retried_with_backoff(self) -> None:
        agent = FakeAgent()
        agent.start_results = [RuntimeError("server down"), RuntimeError("still down")]
        h = make(self, "bob", agent=agent, backoff_base=2.0)
        h.manager.start()
        self.assertEqual(agent.starts, 1)
        h.clock.advance(1.9)
        self.assertEqual(agent.starts, 1)
        h.clock.advance(0.1)
        self.assertEqual(agent.starts, 2)
        h.clock.advance(3.9)
        self.assertEqual(agent.starts, 2)
        h.clock.advance(0.1)
        self.assertEqual(agent.starts, 3)
        self.assertEqual(h.manager.signaling, SignalingState.OPEN)
        self.assertEqual(len(agent.dials_to("bob")), 1)

    def test_directory_failure_at_start_is_retried(self) -> None:
        h = make(self, "bob")
        calls = []

        def flaky() -> defer.Deferred:
            calls.append(1)
            if len(calls) == 1:
                return defer.fail(RuntimeError("HTTP 503"))
            return h.directory()

        h.manager._directory = flaky
        h.manager.start()
        self.assertEqual(h.agent.starts, 0)
        h.clock.advance(1.0)
        self.assertEqual(len(calls), 2)
        self.assertEqual(h.agent.starts, 1)

    def test_stop_closes_signaling_and_connections(self) -> None:
        h = make(self, "bob", "carol")
        h.manager.start()
        bob = h.agent.succeed("bob")
        carol_dial = h.agent.last_dial("carol")[3]
        d = h.manager.stop()
        self.successResultOf(d)
        self.assertEqual(h.agent.stops, 1)
        self.assertTrue(bob.transport.disconnecting)
        self.assertEqual(h.agent.cancelled, ["carol"])
        self.assertTrue(carol_dial.called)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class DialPacingTests(unittest.TestCase):
    def test_one_dial_at_a_time_by_default(self) -> None:
        h = make(self, "bob", "carol", "dave", max_dials=1)
        h.manager.start()
        self.assertEqual(len(h.agent.dials), 1)
        first = h.agent.dials[0][0]
        h.agent.succeed(first)
        self.assertEqual(len(h.agent.dials), 2)
        second = h.agent.dials[1][0]
        self.assertNotEqual(first, second)
        h.agent.fail(second, "no route")
        self.assertEqual(len(h.agent.dials), 3)
        self.assertEqual(sorted({d[0] for d in h.agent.dials}), ["bob", "carol", "dave"])

    def test_peers_behind_our_public_address_are_dialed_first(self) -> None:
        """A LAN peer connects at once; a call through a sequential NAT may wait its turn long."""
        h = make(self, "bob", "carol", Entry("dave", ip="203.0.113.9"), Entry("erin", ip="203.0.113.9"), max_dials=2)
        h.agent.public_ip = "203.0.113.9"
        h.manager.start()
        self.assertEqual([d[0] for d in h.agent.dials], ["dave", "erin"])
        h.agent.succeed("dave")
        self.assertEqual([d[0] for d in h.agent.dials][2:], ["bob"])

    def test_without_our_public_address_the_list_order_holds(self) -> None:
        h = make(self, "bob", "carol", Entry("dave", ip="203.0.113.9"), max_dials=2)
        h.manager.start()
        self.assertEqual([d[0] for d in h.agent.dials], ["bob", "carol"])

    def test_lower_user_id_gets_to_call_first(self) -> None:
        h = make(self, "alice", "carol", user_id="bob", courtesy_delay=3.0)
        h.manager.start()
        # carol (higher ID) is dialed at once; alice (lower) is given time to call us.
        self.assertEqual([d[0] for d in h.agent.dials], ["carol"])
        self.assertEqual(h.manager.state_of("alice"), BACKOFF)
        h.clock.advance(2.9)
        self.assertEqual([d[0] for d in h.agent.dials], ["carol"])
        proto = h.manager.accept_factory.buildProtocol(("203.0.113.9", 5000))
        proto.makeConnection(StringTransport())
        h.manager.peer_arrived(Conn("alice", proto, technique="simultaneous-open"))
        self.assertEqual(h.manager.state_of("alice"), CONNECTED)
        h.clock.advance(1.0)
        self.assertEqual([d[0] for d in h.agent.dials], ["carol"])

    def test_courtesy_wait_ends_in_a_dial_when_nobody_calls(self) -> None:
        h = make(self, "alice", user_id="bob", courtesy_delay=3.0)
        h.manager.start()
        self.assertEqual(h.agent.dials, [])
        h.clock.advance(3.0)
        self.assertEqual([d[0] for d in h.agent.dials], ["alice"])


class SignalingLostTests(unittest.TestCase):
    def test_lost_while_open_reopens_for_the_peers_waiting(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        self.assertEqual(h.manager.signaling, SignalingState.OPEN)
        h.manager.signaling_lost("the server restarted")
        self.assertEqual(h.signaling_events()[-2:], [
            SignalingChanged(False, "the server restarted"),
            SignalingChanged(True, "reconnecting after: the server restarted"),
        ])
        self.assertEqual(h.agent.starts, 2)

    def test_lost_while_closed_is_nothing(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        h.agent.succeed("bob")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        before = list(h.events)
        h.manager.signaling_lost()
        self.assertEqual(h.events, before)

    def test_a_late_open_after_stop_is_ignored(self) -> None:
        h = make(self, "bob")
        opening: defer.Deferred = defer.Deferred()
        h.agent.start = lambda: opening  # type: ignore[method-assign]
        h.manager.start()
        self.assertEqual(h.manager.signaling, SignalingState.OPENING)
        self.successResultOf(h.manager.stop())
        self.assertEqual(h.agent.stops, 1)
        opening.callback("registration")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        self.assertNotIn(SignalingChanged(True, "starting"), h.signaling_events())


class StuntHintTests(unittest.TestCase):
    def test_stunt_flagged_peer_is_dialed_with_the_hint(self) -> None:
        h = make(self, Entry("bob", "stunt"), Entry("carol", "direct"), Entry("dave", "unknown"))
        h.manager.start()
        self.assertEqual(h.agent.last_dial("bob")[2], {"timeout": 20.0, "prefer_stunt": True})
        self.assertEqual(h.agent.last_dial("carol")[2], {"timeout": 20.0})
        self.assertEqual(h.agent.last_dial("dave")[2], {"timeout": 20.0})
        detail = [e.detail for e in h.events if isinstance(e, PeerStateChanged) and e.peer_id == "bob" and e.new == CONNECTING]
        self.assertEqual(detail, ["dialing through STUNT"])

    def test_boolean_flag_means_stunt(self) -> None:
        h = make(self, Entry("bob", True))
        h.manager.start()
        self.assertEqual(h.agent.last_dial("bob")[2].get("prefer_stunt"), True)


class UnreachableRetryTests(unittest.TestCase):
    def test_server_flagged_peer_retried_only_after_long_backoff(self) -> None:
        h = make(self, Entry("bob", "unreachable"), unreachable_retry=3600.0)
        h.manager.start()
        h.clock.advance(3599)
        self.assertEqual(h.agent.dials, [])
        self.assertEqual(h.agent.starts, 0)
        h.clock.advance(1)
        self.assertEqual(h.agent.starts, 1)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(True, "retrying bob"))
        self.assertEqual(len(h.agent.dials_to("bob")), 1)
        # One failed retry and it is unreachable again, for another long back-off.
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE)
        self.assertEqual(h.agent.stops, 1)
        h.clock.advance(3599)
        self.assertEqual(len(h.agent.dials_to("bob")), 1)
        h.clock.advance(1)
        self.assertEqual(len(h.agent.dials_to("bob")), 2)
        h.agent.succeed("bob")
        self.assertEqual(h.manager.state_of("bob"), CONNECTED)

    def test_locally_marked_peer_retried_only_after_long_backoff(self) -> None:
        h = make(self, "bob", max_failures=2, unreachable_retry=1000.0, backoff_max=10.0)
        h.manager.start()
        h.agent.fail("bob")
        h.clock.advance(10)
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE)
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        h.clock.advance(999)
        self.assertEqual(len(h.agent.dials_to("bob")), 2)
        h.clock.advance(1)
        self.assertEqual(len(h.agent.dials_to("bob")), 3)
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), UNREACHABLE, "a failed retry does not restart the count")

    def test_flag_cleared_by_server_retries_at_once(self) -> None:
        h = make(self, Entry("bob", "unreachable"))
        h.manager.start()
        h.entries = [Entry("alice"), Entry("bob", "stunt")]
        h.clock.advance(300)
        self.assertEqual(h.manager.state_of("bob"), CONNECTING)
        self.assertEqual(h.agent.last_dial("bob")[2].get("prefer_stunt"), True)


class BackoffTests(unittest.TestCase):
    def test_the_config_names_the_capped_backoff(self) -> None:
        """Redials wait 1, 2, 4 ... up to the cap, with up to ``jitter`` taken off (tests/test_backoff.py)."""
        backoff = ManagerConfig(backoff_base=1.0, backoff_max=60.0, jitter=0.5).backoff
        self.assertEqual(backoff, Backoff.capped(1.0, 60.0, 0.5))
        self.assertEqual([backoff.delay(n, 0.0) for n in range(9)], [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_manager_waits_the_jittered_delay_between_dials(self) -> None:
        rolls = iter([0.0, 0.5, 0.9, 0.25])
        h = make(self, "bob", random=lambda: next(rolls), max_failures=10, backoff_base=4.0, jitter=0.5)
        h.manager.start()
        expected = [4.0, 8 * 0.75, 16 * 0.55, 32 * 0.875]
        for attempt, delay in enumerate(expected, start=1):
            h.agent.fail("bob")
            self.assertEqual(h.manager.state_of("bob"), BACKOFF)
            event = [e for e in h.events if isinstance(e, PeerStateChanged) and e.new == BACKOFF][-1]
            self.assertAlmostEqual(event.delay, delay)
            h.clock.advance(delay - 0.01)
            self.assertEqual(len(h.agent.dials_to("bob")), attempt)
            h.clock.advance(0.01)
            self.assertEqual(len(h.agent.dials_to("bob")), attempt + 1)
        self.assertEqual(h.manager.signaling, SignalingState.OPEN, "backing off is not done")

    def test_success_resets_the_count(self) -> None:
        h = make(self, "bob", max_failures=3)
        h.manager.start()
        h.agent.fail("bob")
        h.clock.advance(1)
        h.agent.fail("bob")
        h.clock.advance(2)
        bob = h.agent.succeed("bob")
        drop(bob)
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), BACKOFF)
        ev = [e for e in h.events if isinstance(e, PeerStateChanged) and e.new == BACKOFF][-1]
        self.assertEqual(ev.delay, 1.0)


class IncomingTests(unittest.TestCase):
    def incoming(self, h: Harness, peer_id: str) -> Any:
        proto = h.manager.accept_factory.buildProtocol(("203.0.113.9", 5000))
        proto.makeConnection(StringTransport())
        h.manager.peer_arrived(Conn(peer_id, proto, technique="simultaneous-open"))
        return proto

    def test_incoming_counts_as_connected(self) -> None:
        h = make(self, Entry("bob", online=False))
        h.manager.start()
        self.assertEqual(h.manager.signaling, SignalingState.OPEN)
        self.incoming(h, "bob")
        self.assertEqual(h.manager.state_of("bob"), CONNECTED)
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        event = [e for e in h.events if isinstance(e, PeerStateChanged) and e.new == CONNECTED][0]
        self.assertTrue(event.incoming)
        self.assertEqual(event.detail, "incoming, via simultaneous-open")

    def test_incoming_drop_reopens(self) -> None:
        h = make(self, Entry("bob", online=False))
        h.manager.start()
        proto = self.incoming(h, "bob")
        drop(proto)
        self.assertEqual(h.signaling_events()[-1], SignalingChanged(True, "bob dropped"))

    def test_incoming_while_dialing_then_dial_fails(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        self.incoming(h, "bob")
        self.assertEqual(h.manager.signaling, SignalingState.CLOSED)
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), CONNECTED)

    def test_duplicates_keep_the_connection_dialed_by_the_lower_id(self) -> None:
        # alice < bob: alice keeps her outgoing one, closes bob's.
        h = make(self, "bob")
        h.manager.start()
        incoming = self.incoming(h, "bob")
        outgoing = h.agent.succeed("bob")
        self.assertTrue(incoming.transport.disconnecting)
        self.assertFalse(outgoing.transport.disconnecting)
        drop(incoming)
        self.assertEqual(h.manager.state_of("bob"), CONNECTED)
        self.assertIs(h.manager.connection_of("bob").protocol, outgoing)
        # bob's side of the same pair: he keeps alice's (his incoming one).
        hb = Harness(self, [Entry("alice"), Entry("bob")], user_id="bob")
        hb.manager.start()
        b_out = hb.agent.succeed("alice")
        b_in = self.incoming(hb, "alice")
        self.assertTrue(b_out.transport.disconnecting)
        self.assertFalse(b_in.transport.disconnecting)
        drop(b_out)
        self.assertEqual(hb.manager.state_of("alice"), CONNECTED)
        self.assertEqual(hb.agent.starts, 1)

    def test_unknown_caller_triggers_a_refresh(self) -> None:
        h = make(self, "bob")
        h.manager.start()
        self.incoming(h, "erin")
        self.assertEqual(h.manager.state_of("erin"), CONNECTED)
        h.entries.append(Entry("erin"))
        h.clock.advance(0)
        self.assertEqual(h.directory_calls, 2)
        self.assertEqual(h.manager.state_of("erin"), CONNECTED)


class SignalingDownTests(unittest.TestCase):
    def test_dial_failing_while_signaling_is_down_does_not_count(self) -> None:
        h = make(self, "bob", max_failures=2)
        h.manager.start()
        for _ in range(4):
            h.agent.signaling_up = False  # the agent is reconnecting on its own
            h.agent.fail("bob", "lost the signaling connection")
            self.assertEqual(h.manager.state_of("bob"), BACKOFF)
            h.clock.advance(1.0)
        self.assertEqual(len(h.agent.dials_to("bob")), 5)
        self.assertEqual(h.agent.starts, 1, "the manager leaves reconnecting to the agent")
        h.agent.signaling_up = True
        h.agent.fail("bob")
        self.assertEqual(h.manager.state_of("bob"), BACKOFF)


class OneShotAgent(FakeAgent):
    """Like PeerAgent: start once, stop for good."""

    made = 0

    def __init__(self) -> None:
        super().__init__()
        OneShotAgent.made += 1
        self.started = self.stopped = False

    def start(self) -> defer.Deferred:
        if self.started:
            return defer.fail(RuntimeError("agent already started"))
        self.started = True
        return super().start()

    def stop(self) -> defer.Deferred:
        self.stopped = True
        return super().stop()


class RestartingAgentTests(unittest.TestCase):
    def test_each_start_makes_a_fresh_agent(self) -> None:
        from kerjostunt.client.manager import RestartingAgent

        made: list[OneShotAgent] = []

        def make_agent() -> OneShotAgent:
            made.append(OneShotAgent())
            return made[-1]

        agent = RestartingAgent(make_agent)
        h = make(self, Entry("bob", "stunt"), agent=agent)  # type: ignore[arg-type]
        h.manager.start()
        self.assertEqual(len(made), 1)
        self.assertEqual(made[0].last_dial("bob")[2], {"timeout": 20.0, "prefer_stunt": True})
        bob = made[0].succeed("bob")
        self.assertTrue(made[0].stopped)
        self.assertFalse(agent.signaling_up)
        drop(bob)
        self.assertEqual(len(made), 2)
        self.assertEqual(h.manager.signaling, SignalingState.OPEN)
        self.assertEqual(len(made[1].dials_to("bob")), 1)

    def test_connect_without_an_agent_fails(self) -> None:
        from kerjostunt.client.manager import RestartingAgent

        agent = RestartingAgent(OneShotAgent)
        self.failureResultOf(agent.connect("bob", Factory()), RuntimeError)
