"""The server's scheduling of calls through one sequential NAT, and its memory of failed pairs (issue 12).

``NATLanes`` (server/calls/lanes.py) lets one call at a time through a
sequential, address-dependent NAT until its dial moments are set, spaces
their dial moments, and counts the mappings each was going to open;
``shifted`` moves the prediction by them; ``PairBook`` (pairs.py) remembers
pairs whose calls failed.  All on a ``Clock``.
"""

from __future__ import annotations

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
from kerjostunt.wire.sdp import Candidate, SessionDescription, candidate_priority

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
        peer = Prediction("198.18.1.2", (41000,), 0.95, NATDescription(True, EI, PRESERVING, None, "198.18.1.2"))
        self.assertEqual(new_mappings(_sdp(1), peer), 3)  # its predicted port, its punch port, its app port

    def test_no_punch_towards_a_public_or_random_peer(self) -> None:
        public = Prediction("198.18.100.10", (41000,), 0.95, NATDescription(False, EI, PRESERVING, None, "x"))
        self.assertEqual(new_mappings(_sdp(1), public), 1)
        random = Prediction("198.18.4.2", (41000,), 0.05, NATDescription(True, APD, RANDOM, None, "x"))
        self.assertEqual(new_mappings(_sdp(2), random), 2)


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
