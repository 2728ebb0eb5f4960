"""The server's scheduling of calls through one sequential NAT, and its memory of failed pairs (issue 12).

``NATLanes`` (server/calls/lanes.py) lets one call at a time through a
sequential, address-dependent NAT until its dial moments are set, spaces
their dial moments, and counts the mappings each was going to open;
``shifted`` moves the prediction by them; ``PairBook`` (pairs.py) remembers
pairs whose calls failed.  All on a ``Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.calls.dialing import new_mappings, shifted
from kerjostunt.server.calls.lanes import NATLanes, lane_of
from kerjostunt.server.calls.pairs import PairBook
from kerjostunt.wire.prediction import (
    APD,
    EI,
    PRESERVING,
    RANDOM,
    SEQUENTIAL,
    NATDescription,
    Prediction,
    Sample,
    classify,
)
from kerjostunt.wire.sdp import Candidate, SessionDescription, candidate_priority, parse_sdp

SEQ = NATDescription(True, APD, SEQUENTIAL, 4, "198.18.2.2")


class LaneOfTests(unittest.TestCase):
    def test_only_sequential_address_dependent_nats_take_turns(self) -> None:
        self.assertEqual(lane_of(SEQ, "198.18.2.2"), "198.18.2.2")
        self.assertIsNone(lane_of(NATDescription(True, EI, PRESERVING, None, "198.18.1.2"), "198.18.1.2"))
        self.assertIsNone(lane_of(NATDescription(True, APD, RANDOM, None, "198.18.4.2"), "198.18.4.2"))
        self.assertIsNone(lane_of(NATDescription(False, EI, PRESERVING, None, "198.18.100.10"), "x"))
        self.assertIsNone(lane_of(None, "198.18.2.2"))


class NATLanesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lanes = NATLanes(self.clock, gap=0.1)
        self.went: list[str] = []

    def enter(self, name: str, *keys: str) -> bool:
        return self.lanes.enter(name, keys, lambda: self.went.append(name))

    def test_calls_through_one_nat_take_turns_others_run_in_parallel(self) -> None:
        self.assertTrue(self.enter("c1", "b"))
        self.assertFalse(self.enter("c2", "b"))
        self.assertTrue(self.enter("c3", "e"))
        self.assertTrue(self.enter("c4"))  # no lane at all
        self.assertEqual(self.went, ["c1", "c3", "c4"])
        # c1's dial moments are set: its turn ends, c2 goes.
        self.assertEqual(self.lanes.dialing("c1", 0.05, {"b": 3}), 0.0)
        self.assertEqual(self.went, ["c1", "c3", "c4", "c2"])

    def test_dial_moments_are_spaced_and_mappings_counted(self) -> None:
        self.enter("c1", "b")
        self.enter("c2", "b")
        self.lanes.dialing("c1", 0.05, {"b": 3})
        # c2 would dial at 0.08: after c1's 0.05 plus the gap, so 70 ms later.
        self.assertAlmostEqual(self.lanes.dialing("c2", 0.08, {"b": 2}), 0.07)
        self.assertEqual(self.lanes.shift("b", since=0.0), 5)
        self.assertEqual(self.lanes.shift("b", since=0.1), 2)
        self.assertEqual(self.lanes.shift("e", since=0.0), 0)

    def test_a_released_turn_lets_the_next_call_go_and_still_dials_in_order(self) -> None:
        """Its probes are in: the next turn begins; its dial moment, set later, is spaced and counted."""
        self.enter("c1", "b")
        self.enter("c2", "b")
        self.lanes.release("c1")
        self.assertEqual(self.went, ["c1", "c2"])
        self.assertEqual(self.lanes.dialing("c2", 0.05, {"b": 2}), 0.0)  # c2 answered first
        self.assertAlmostEqual(self.lanes.dialing("c1", 0.06, {"b": 3}), 0.09)  # after c2's + the gap
        self.assertEqual(self.lanes.shift("b", since=0.0), 5)
        self.assertEqual(self.lanes.calls(), [])

    def test_a_call_whose_prediction_is_made_early_waits_for_released_ones(self) -> None:
        self.lanes.enter("c1", ("b",), lambda: self.went.append("c1"))
        self.lanes.release("c1")
        self.assertFalse(self.lanes.enter("c2", ("b",), lambda: self.went.append("c2"), fixed_early=True))
        self.assertFalse(self.enter("c3", "b"), "no passing the older call waiting for lane b")
        self.lanes.dialing("c1", 0.05, {"b": 3})
        self.assertEqual(self.went, ["c1", "c2"])
        self.lanes.leave("c2")
        self.assertEqual(self.went, ["c1", "c2", "c3"])

    def test_a_call_waiting_for_two_lanes_goes_when_both_are_free(self) -> None:
        self.enter("c1", "b")
        self.enter("c2", "e")
        self.assertFalse(self.enter("c3", "b", "e"))
        self.lanes.leave("c1")
        self.assertNotIn("c3", self.went)
        self.lanes.leave("c2")
        self.assertEqual(self.went[-1], "c3")

    def test_a_call_that_ends_while_waiting_never_goes(self) -> None:
        self.enter("c1", "b")
        self.enter("c2", "b")
        self.lanes.leave("c2")  # cancelled
        self.lanes.leave("c1")
        self.assertEqual(self.went, ["c1"])
        self.assertEqual(self.lanes.waiting(), 0)
        self.assertFalse(self.lanes.busy("b"))


class ShiftedTests(unittest.TestCase):
    def test_nothing_unseen_starts_as_the_prediction_itself(self) -> None:
        p = Prediction("198.18.2.2", (20004, 20008, 20012, 20016), 0.8, SEQ)
        self.assertEqual(shifted(p, 20000, 0).ports[:4], p.ports)
        self.assertEqual(len(shifted(p, 20000, 0).ports), 8, "a lane's window is wider")

    def test_counts_from_the_nats_newest_port_and_the_unseen_mappings(self) -> None:
        p = Prediction("198.18.2.2", (20004, 20008, 20012, 20016), 0.8, SEQ)
        # Another host probed up to 20040, then a call there opened 3 mappings.
        self.assertEqual(shifted(p, 20040, 3).ports,
                         (20056, 20060, 20064, 20068, 20072, 20076, 20080, 20052))


def _sdp(host_passive: int) -> SessionDescription:
    cands = [Candidate("so", 1, "TCP", candidate_priority("host", "so"), "10.1.0.11", 41000, "host", "so")]
    cands += [Candidate(f"h{i}", 1, "TCP", candidate_priority("host", "passive"), "10.1.0.11", 50000 + i,
                        "host", "passive") for i in range(host_passive)]
    return SessionDescription("alice", "10.1.0.11", cands, punch_port=41000)


class NewMappingsTests(unittest.TestCase):
    def test_punch_endpoints_plus_direct_ones(self) -> None:
        # A preserving NAT looks like no NAT from the server's probes: the SDP's punch address tells.
        peer = Prediction("198.18.1.2", (41000,), 0.95, NATDescription(False, EI, PRESERVING, None, "198.18.1.2"))
        self.assertEqual(new_mappings(_sdp(1), peer, "198.18.1.2"), 3)  # its predicted port, punch port, app port

    def test_no_punch_towards_a_public_or_random_peer(self) -> None:
        public = Prediction("10.1.0.11", (41000,), 0.95, NATDescription(False, EI, PRESERVING, None, "x"))
        self.assertEqual(new_mappings(_sdp(1), public, "10.1.0.11"), 1)
        random = Prediction("198.18.4.2", (41000,), 0.05, NATDescription(True, APD, RANDOM, None, "x"))
        self.assertEqual(new_mappings(_sdp(2), random, "198.18.4.2"), 2)


class ClassifyBusyNATTests(unittest.TestCase):
    def test_a_busy_sequential_nat_is_still_sequential(self) -> None:
        # One host's probes while eleven others use the NAT: steps of many d.
        ports = [20000, 20004, 20100, 20104, 20260, 20264, 20300]
        samples = [Sample(40000 + i // 2, "198.18.2.2", port, f"198.18.0.1{i % 2}", 3478, float(i))
                   for i, port in enumerate(ports)]
        nat = classify(samples)
        self.assertEqual((nat.allocation, nat.delta), (SEQUENTIAL, 4))


class PairBookTests(unittest.TestCase):
    def test_failures_since_the_last_success(self) -> None:
        clock = Clock()
        book = PairBook(clock, memory=100.0)
        ips = {"a": "1.1.1.1", "b": "2.2.2.2"}
        self.assertEqual(book.failed("a", "b", "1.1.1.1"), 0)
        book.recorded("a", "b", False, ips)
        book.recorded("b", "a", False, ips)
        self.assertEqual(book.failed("b", "a", "2.2.2.2"), 2)
        self.assertEqual(book.failed("a", "b", "9.9.9.9"), 0, "the caller moved: something changed")
        book.recorded("a", "b", True, ips)
        self.assertEqual(book.failed("a", "b", "1.1.1.1"), 0)
        book.recorded("a", "b", False, ips)
        clock.advance(101)
        self.assertEqual(book.failed("a", "b", "1.1.1.1"), 0, "forgotten after memory seconds")


class CallManagerLaneTests(unittest.SynchronousTestCase):
    """The call table: two hosts behind one sequential NAT call two peers; a random NAT meets it."""

    def setUp(self) -> None:
        from kerjostunt.server.calls import CallManager
        from kerjostunt.server.registrar import Registrar
        from tests.support import DOMAIN
        from tests.test_calls import FakeConn, FakeObservations, FakeStore

        self.clock = Clock()
        self.clock.advance(1000)
        self.registrar = Registrar(self.clock)
        self.observations = FakeObservations()
        self.store = store = FakeStore()
        store.users = {"a1", "a2", "b1", "b2", "d1"}
        self.manager = CallManager(self.clock, DOMAIN, self.registrar, store, self.observations)
        self.conns = {}
        for user, ip, port in (("b1", "198.18.2.2", 4001), ("b2", "198.18.2.2", 4002),
                               ("a1", "198.18.1.2", 5001), ("a2", "198.18.1.2", 5002), ("d1", "198.18.4.2", 6001)):
            conn = self.conns[user] = FakeConn(user, ip, port, rtt=0.04)
            self.registrar.bind(user, conn, f"<sips:{user}@x>", 3600)
        # b1 and b2 probed through one sequential NAT (d=4), turn about; the a's are preserving.
        ports = iter(range(20000, 20100, 4))
        for t, user in enumerate(["b1", "b2", "b1", "b2"]):
            self.observations.by_user.setdefault(user, []).extend(
                Sample(40001, "198.18.2.2", next(ports), f"198.18.0.1{k}", 3478, 990.0 + t) for k in (0, 1))
        for user in ("a1", "a2"):
            self.observations.by_user[user] = [Sample(50001, "198.18.1.2", 50001, f"198.18.0.1{k}", 3478, 990.0)
                                               for k in (0, 1)]
        self.observations.by_user["d1"] = [Sample(40001, "198.18.4.2", p, f"198.18.0.1{k}", 3478 + k, 990.0 + k)
                                           for k, p in enumerate((43797, 11165, 55521))]

    def invite(self, caller: str, callee: str, call_id: str) -> None:
        from tests.test_calls import invite_request

        request = invite_request(caller, callee, call_id)
        self.manager.handle_request(self.conns[caller], request)

    def invites_to(self, user: str) -> list[Any]:
        return [m for m in self.conns[user].sent if getattr(m, "method", None) == "INVITE"]

    def test_calls_through_one_sequential_nat_take_turns(self) -> None:
        from tests.test_calls import answer

        self.invite("b1", "a1", "c1")
        self.invite("b2", "a2", "c2")
        self.clock.advance(0.3)  # the NAT has been quiet long enough
        self.assertEqual((len(self.invites_to("a1")), len(self.invites_to("a2"))), (1, 0))
        first = parse_sdp(self.invites_to("a1")[0].body)
        self.assertEqual([c.port for c in first.of_type("prflx")][:2], [20032, 20036])  # the NAT's newest port was b2's 20028
        self.manager.handle_response(self.conns["a1"], answer(self.invites_to("a1")[0], punch=50001))
        # b1's turn ended with its answer: b2's call goes, counted past b1's mappings.
        self.clock.advance(0.3)
        self.assertEqual(len(self.invites_to("a2")), 1)
        second = [c.port for c in parse_sdp(self.invites_to("a2")[0].body).of_type("prflx")]
        self.assertEqual(second[0], 20028 + 4 * (1 + 3))  # b1's punch and app-port dials
        self.assertEqual(len(second), 8)

    def test_a_call_waiting_for_its_turn_hears_queued(self) -> None:
        """182 Queued at once and every queued_notice seconds while it waits; none once it went."""
        from tests.test_calls import answer

        self.invite("b1", "a1", "c1")
        self.invite("b2", "a2", "c2")
        queued = [m for m in self.conns["b2"].sent if getattr(m, "code", None) == 182]
        self.assertEqual(len(queued), 1)
        self.assertEqual([m for m in self.conns["b1"].sent if getattr(m, "code", None) == 182], [])
        self.clock.advance(10.0)
        self.assertEqual(len([m for m in self.conns["b2"].sent if getattr(m, "code", None) == 182]), 2)
        self.manager.handle_response(self.conns["a1"], answer(self.invites_to("a1")[0], punch=50001))
        self.clock.advance(0.3)
        self.assertEqual(len(self.invites_to("a2")), 1)
        self.clock.advance(30.0)
        self.assertEqual(len([m for m in self.conns["b2"].sent if getattr(m, "code", None) == 182]), 2)

    def test_two_hosts_behind_one_random_nat_are_forwarded(self) -> None:
        """One public address is one LAN: host candidates join them, so no 488 (the 40-peer run)."""
        from tests.test_calls import FakeConn

        self.store.users.add("d2")
        conn = self.conns["d2"] = FakeConn("d2", "198.18.4.2", 6002, rtt=0.04)
        self.registrar.bind("d2", conn, "<sips:d2@x>", 3600)
        self.observations.by_user["d2"] = [Sample(40001, "198.18.4.2", p, f"198.18.0.1{k}", 3478 + k, 990.0 + k)
                                           for k, p in enumerate((31797, 2165, 45521))]
        self.invite("d1", "d2", "c4")
        self.clock.advance(0.3)
        self.assertEqual(len(self.invites_to("d2")), 1)
        self.assertNotIn(488, [getattr(m, "code", None) for m in self.conns["d1"].sent])

    def test_host_of_a_crowded_preserving_nat_is_judged_by_all_its_hosts(self) -> None:
        """a3's own probes collided with a1's and a2's ports (they look random); its NAT keeps ports."""
        from tests.test_calls import FakeConn

        self.store.users.add("a3")
        conn = self.conns["a3"] = FakeConn("a3", "198.18.1.2", 5003, rtt=0.04)
        self.registrar.bind("a3", conn, "<sips:a3@x>", 3600)
        for user, local in (("a1", 50003), ("a2", 50005), ("a1", 50007), ("a2", 50009)):
            self.observations.by_user[user] += [Sample(local, "198.18.1.2", local, f"198.18.0.1{k}", 3478, 991.0)
                                                for k in (0, 1)]
        self.observations.by_user["a3"] = [
            Sample(local, "198.18.1.2", mapped, f"198.18.0.1{k}", 3478, 992.0 + i)
            for i, (local, mapped) in enumerate(((40001, 61234), (40001, 40001), (41001, 23456)))
            for k in (0, 1)]
        self.invite("a3", "b1", "c5")
        self.clock.advance(0.3)
        self.assertNotIn(488, [getattr(m, "code", None) for m in self.conns["a3"].sent])
        forwarded = self.invites_to("b1")
        self.assertEqual(len(forwarded), 1)
        prflx = [c.port for c in parse_sdp(forwarded[0].body).of_type("prflx")]
        self.assertEqual(prflx[0], 40001, "the punch port itself first: the NAT keeps ports")

    def test_a_callee_with_a_port_mapping_is_called_whatever_the_nats(self) -> None:
        """Its REGISTER named its gateway's mapping (issue 17): the caller dials it there, no 488."""
        self.registrar.lookup("b1").port_mapping = ("198.18.2.2", 7000)  # type: ignore[union-attr]
        self.invite("d1", "b1", "c3")
        self.clock.advance(0.3)
        self.assertNotIn(488, [getattr(m, "code", None) for m in self.conns["d1"].sent])
        self.assertEqual(len(self.invites_to("b1")), 1)

    def test_random_facing_sequential_is_refused_before_anyone_dials(self) -> None:
        self.invite("d1", "b1", "c3")
        final = self.conns["d1"].sent[-1]
        self.assertEqual(final.code, 488)  # type: ignore[union-attr]
        self.assertIn("no technique joins these NATs", final.reason)  # type: ignore[union-attr]
        self.assertEqual(self.invites_to("b1"), [])
        # Recorded as the pair's failed attempt, as a dial would have been.
        self.assertEqual([(a["caller"], a["callee"], a["outcome"]) for a in self.store.attempts],
                         [("d1", "b1", "failed")])
