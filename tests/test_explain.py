"""The ``failed:`` line's end: the closest technique and what to try (client/calls/explain.py)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from kerjostunt.client.calls.explain import closest, explain, word_of
from kerjostunt.wire.prediction import APD, EI, PRESERVING, RANDOM, SEQUENTIAL, NATDescription

RND = NATDescription(True, APD, RANDOM, None, "198.18.2.2")
SEQ = NATDescription(True, APD, SEQUENTIAL, 1, "198.18.1.2")
EIP = NATDescription(True, EI, PRESERVING, None, "198.18.3.2")


class ExplainTests(TestCase):
    def test_words(self) -> None:
        self.assertEqual(word_of("public 1.2.3.4:5: Connection was refused by other side"), "refused")
        self.assertEqual(word_of("no connection within 10 s after 12 attempts from 10.0.0.1:4000 "
                                 "(1.2.3.4:5 no answer)"), "timeout")
        self.assertEqual(word_of("punch: not tried: both NATs allocate ports at random"), "skipped")
        self.assertEqual(word_of("lan 10.0.0.2:4000: handshake timed out"), "handshake")
        self.assertEqual(word_of("something odd"), "failed")

    def test_closest(self) -> None:
        self.assertEqual(closest([("public", "refused"), ("punch", "timeout"), ("birthday", "skipped")]),
                         ("punch", "timeout"))
        self.assertEqual(closest([("punch", "timeout"), ("lan", "handshake")]), ("lan", "handshake"))
        self.assertIsNone(closest([]))

    def test_both_random_needs_a_relay(self) -> None:
        self.assertEqual(explain([("punch", "skipped")], RND, RND),
                         "closest: punch (skipped); both NATs allocate ports at random: a relay is needed")

    def test_random_facing_sequential(self) -> None:
        self.assertIn("a random NAT facing an address-dependent one", explain([], RND, SEQ))
        self.assertTrue(explain([], RND, SEQ).endswith(": a relay is needed"))

    def test_punch_timeout(self) -> None:
        self.assertEqual(explain([("public", "refused"), ("punch", "timeout")], SEQ, EIP),
                         "closest: punch (timeout); the punch got no answer: run `kerjostunt netcheck` on both "
                         "sides (a NAT that drops SYNs and moves ports fast needs a relay)")
        self.assertIn("at random and the prediction missed", explain([("birthday", "timeout")], RND, EIP))

    def test_public_closed(self) -> None:
        self.assertIn("the peer's public port is closed", explain([("public", "refused")], None, None))

    def test_a_488_says_a_relay_is_needed(self) -> None:
        from kerjostunt.client.calls.explain import refusal_text
        from kerjostunt.wire.kerjo import NO_TECHNIQUE_REASON

        self.assertEqual(refusal_text(488, f"{NO_TECHNIQUE_REASON}: both NATs allocate ports at random"),
                         f"488 {NO_TECHNIQUE_REASON}: both NATs allocate ports at random: a relay is needed")
        self.assertEqual(refusal_text(480, "Temporarily Unavailable"), "480 Temporarily Unavailable")
