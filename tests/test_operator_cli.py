"""``kerjostunt attempts`` and ``kerjostunt operator``: what an operator reads, who is one."""

from __future__ import annotations

import json

from twisted.trial import unittest

from kerjostunt.server.calls.detail import attempt_detail, refusal_detail
from kerjostunt.wire.kerjo import Outcome
from kerjostunt.wire.prediction import APD, EI, PRESERVING, RANDOM, SEQUENTIAL, NATDescription, Prediction
from tests import test_admin_cli

SEQ = NATDescription(True, APD, SEQUENTIAL, 1, "198.18.1.2")
RND = NATDescription(True, APD, RANDOM, None, "198.18.2.2")


class OperatorCommandTests(unittest.TestCase):
    # the admin tests' helpers, not their tests
    run_cli = test_admin_cli.AdminCommandTests.run_cli
    ok = test_admin_cli.AdminCommandTests.ok
    error = test_admin_cli.AdminCommandTests.error
    database = test_admin_cli.AdminCommandTests.database
    add = test_admin_cli.AdminCommandTests.add

    def setUp(self) -> None:
        test_admin_cli.AdminCommandTests.setUp(self)  # type: ignore[arg-type]
        for user in ("alice", "bob", "carol"):
            self.add(user)

    def record(self, caller: str, callee: str, outcome: str, when: float, detail: str | None,
               technique: str = "none", ms: float | None = 1000.0) -> None:
        self.database().record_attempt(f"c{when}", caller, callee, technique, outcome,
                                       "198.18.2.2:20001", None if outcome == "failed" else "198.18.2.2:20002",
                                       ms, when, detail=detail)

    def test_attempts_show_each_technique_in_order(self) -> None:
        reports = {"caller": Outcome("failed", "none", None, 10012, (("public", "refused"), ("punch", "timeout"))),
                   "callee": Outcome("failed", "none", None, 10020, (("punch", "timeout"), ("birthday", "skipped")))}
        predictions = {"caller": Prediction("198.18.1.2", (20005, 20006), 0.5, SEQ),
                       "callee": Prediction("198.18.2.2", (31337,), 0.05, RND)}
        self.record("alice", "bob", "failed", 1000.0, attempt_detail(reports, predictions))
        self.record("alice", "carol", "failed", 1001.0,
                    refusal_detail("488 no technique: both NATs allocate ports at random",
                                   (RND, RND), ("caller", "callee")), ms=0.0)
        self.record("bob", "carol", "stunt", 1002.0, None, technique="simultaneous-open", ms=381.0)
        out = self.ok("attempts", "alice", "--peer", "bob")
        self.assertEqual(out, (
            "1970-01-01 00:16:40 UTC  alice -> bob  failed via none  1000 ms  predicted 198.18.2.2:20001  "
            "actual -  call c1000.0\n"
            "  caller alice: NAT address-and-port-dependent/sequential, predicted 198.18.1.2:20005,20006; "
            "failed after 10012 ms; tried public refused, punch timeout\n"
            "  callee bob: NAT address-and-port-dependent/random, predicted 198.18.2.2:31337; "
            "failed after 10020 ms; tried punch timeout, birthday skipped\n"))
        out = self.ok("attempts", "alice")
        self.assertIn("  refused: 488 no technique: both NATs allocate ports at random\n", out)
        self.assertEqual(out.count(" -> "), 2)
        # --last keeps the newest, printed oldest first
        out = self.ok("attempts", "--last", "2")
        self.assertEqual([line.split("  ")[1] for line in out.splitlines() if " -> " in line],
                         ["alice -> carol", "bob -> carol"])
        self.assertIn("(no per-technique detail", out)
        rows = [json.loads(line) for line in self.ok("attempts", "bob", "--json").splitlines()]
        self.assertEqual([r["callee"] for r in rows], ["bob", "carol"])
        self.assertEqual(rows[0]["detail"]["caller"]["tried"], [["public", "refused"], ["punch", "timeout"]])
        self.assertEqual(self.ok("attempts", "nobody"), "no attempts\n")
        self.error("attempts", "bad name!")

    def test_operator_flag(self) -> None:
        self.assertEqual(self.ok("operator", "list"), "")
        self.assertEqual(self.ok("operator", "add", "alice", "carol"),
                         "alice is an operator\ncarol is an operator\n")
        self.assertEqual(self.ok("operator", "list"), "alice\ncarol\n")
        self.ok("operator", "del", "carol")
        self.assertEqual(self.ok("operator", "list"), "alice\n")
        db = self.database()
        self.assertTrue(db.is_operator("alice"))
        self.assertFalse(db.is_operator("bob"))
        self.assertFalse(db.is_operator("nobody"))
        self.assertIn("unknown user 'dave'", self.error("operator", "add", "dave"))

    def test_nat_labels(self) -> None:
        public = NATDescription(False, EI, PRESERVING, None, "198.18.100.10")
        detail = json.loads(refusal_detail("x", (public, None), ("caller", "callee")))
        self.assertEqual((detail["caller"]["nat"], detail["callee"]["nat"]), ("public", "unknown"))

