"""The outcome on the BYE (docs/protocol.rst): one request instead of INFO then BYE.

A side that ends its dialog anyway puts its outcome report on the BYE; the
old form, an INFO and then a plain BYE, is still taken from older clients
(tests/test_calls.py covers it).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.calls import CallManager
from kerjostunt.server.registrar import Registrar

from .callsupport import OUTCOME_TYPE
from .test_calls import DOMAIN, FakeConn, FakeObservations, FakeStore, answer, invite_request, request_in

SUCCESS_OF_ALICE = b"outcome=stunt\ntechnique=low-ttl\nremote=198.51.100.9:50001\nelapsed_ms=180\n"
SUCCESS_OF_BOB = b"outcome=stunt\ntechnique=low-ttl\nremote=203.0.113.7:40001\n"


class ByeOutcomeTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registrar = Registrar(self.clock)
        self.store = FakeStore()
        self.manager = CallManager(self.clock, DOMAIN, self.registrar, self.store, FakeObservations(),
                                   lambda what: None)
        self.alice = FakeConn("alice", "203.0.113.7", 4000, rtt=0.020)
        self.bob = FakeConn("bob", "198.51.100.9", 5000, rtt=0.200)
        self.registrar.bind("alice", self.alice, "<sips:alice@x>", 3600)
        self.registrar.bind("bob", self.bob, "<sips:bob@x>", 3600)

    def connect(self) -> str:
        """Alice calls bob, bob answers: both dial. The callee leg's Call-ID."""
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "c1"))
        forwarded = self.bob.last()
        self.manager.handle_response(self.bob, answer(forwarded))  # type: ignore[arg-type]
        return forwarded.call_id  # type: ignore[union-attr,return-value]

    def test_the_callers_bye_carries_its_outcome(self) -> None:
        leg = self.connect()
        sent_to_bob = len(self.bob.sent)
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob", SUCCESS_OF_ALICE, OUTCOME_TYPE))
        self.assertEqual(self.alice.last().code, 200)  # type: ignore[union-attr]
        self.assertEqual(len(self.bob.sent), sent_to_bob)  # connected: no BYE to bob, the peers talk
        self.manager.handle_request(self.bob, request_in(leg, "INFO", "bob", "alice", SUCCESS_OF_BOB, OUTCOME_TYPE))
        self.assertEqual(self.bob.last().code, 200)  # type: ignore[union-attr]
        self.assertEqual(len(self.store.attempts), 1)  # both reports: recorded at once
        a = self.store.attempts[0]
        self.assertEqual((a["outcome"], a["technique"], a["actual"], a["witnesses"]),
                         ("stunt", "low-ttl", "198.51.100.9:50001", ("alice", "bob")))

    def test_both_outcomes_on_byes(self) -> None:
        leg = self.connect()
        self.manager.handle_request(self.bob, request_in(leg, "BYE", "bob", "alice", SUCCESS_OF_BOB, OUTCOME_TYPE))
        self.assertEqual(self.store.attempts, [])  # a callee's success waits for the caller's word
        self.assertEqual(self.alice.last().code, 200)  # the 200 OK of the INVITE; no BYE to alice
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob", SUCCESS_OF_ALICE, OUTCOME_TYPE))
        self.assertEqual([(a["outcome"], sorted(a["witnesses"])) for a in self.store.attempts], [("stunt", ["alice", "bob"])])

    def test_a_lone_outcome_on_a_bye_is_recorded_by_the_timer(self) -> None:
        self.connect()
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob", SUCCESS_OF_ALICE, OUTCOME_TYPE))
        self.assertEqual(self.store.attempts, [])
        self.clock.advance(2.0)  # report_grace: bob never said
        self.assertEqual([(a["outcome"], a["witnesses"]) for a in self.store.attempts], [("stunt", ("alice",))])

    def test_a_failure_on_a_bye_ends_the_other_side_too(self) -> None:
        leg = self.connect()
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob",
                                                           b"outcome=failed\ntechnique=none\n", OUTCOME_TYPE))
        bye = self.bob.last()
        self.assertEqual((bye.method, bye.call_id), ("BYE", leg))  # type: ignore[union-attr]
        self.clock.advance(40)  # the outcome timer records alice's lone report
        self.assertEqual([(a["outcome"], a["witnesses"]) for a in self.store.attempts], [("failed", ("alice",))])

    def test_a_bad_outcome_on_a_bye_is_400_and_ends_nothing(self) -> None:
        leg = self.connect()
        sent_to_bob = len(self.bob.sent)
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob",
                                                           b"outcome=maybe\ntechnique=none\n", OUTCOME_TYPE))
        self.assertEqual(self.alice.last().code, 400)  # type: ignore[union-attr]
        self.assertEqual(len(self.bob.sent), sent_to_bob)
        self.manager.handle_request(self.alice, request_in("c1", "INFO", "alice", "bob", SUCCESS_OF_ALICE, OUTCOME_TYPE))
        self.manager.handle_request(self.bob, request_in(leg, "INFO", "bob", "alice", SUCCESS_OF_BOB, OUTCOME_TYPE))
        self.assertEqual(len(self.store.attempts), 1)  # the call went on as before

    def test_a_bye_with_another_body_is_a_plain_bye(self) -> None:
        self.connect()
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob", b"hello", "text/plain"))
        self.assertEqual(self.alice.last().code, 200)  # type: ignore[union-attr]
        self.assertEqual(self.bob.last().method, "BYE")  # type: ignore[union-attr]  # not connected: ended there too
        self.clock.advance(40)
        self.assertEqual([a["outcome"] for a in self.store.attempts], ["failed"])

    def test_an_outcome_on_a_bye_before_the_answer_is_a_cancel(self) -> None:
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "c1"))
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob", SUCCESS_OF_ALICE, OUTCOME_TYPE))
        self.assertEqual(self.bob.last().method, "CANCEL")  # type: ignore[union-attr]
        self.clock.advance(40)
        self.assertEqual(self.store.attempts, [])
