"""The one backoff of the client (kerjostunt/client/backoff.py): pure arithmetic."""

from __future__ import annotations

from twisted.trial import unittest

from kerjostunt.client.backoff import Backoff


class NominalTests(unittest.TestCase):
    def test_doubles_from_initial_up_to_the_cap(self) -> None:
        backoff = Backoff(1.0, 60.0)
        self.assertEqual([backoff.nominal(n) for n in range(9)], [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_huge_attempts_stay_at_the_cap(self) -> None:
        self.assertEqual(Backoff(1.0, 60.0).nominal(10_000), 60.0)
        self.assertEqual(Backoff(1.0, 60.0).nominal(-3), 1.0)


class SpreadTests(unittest.TestCase):
    def test_around_the_nominal_delay(self) -> None:
        """(0.5, 1.5), the agent's reconnect: 0.5x..1.5x."""
        backoff = Backoff(1.0, 8.0)
        self.assertEqual([backoff.delay(n, 0.5) for n in range(6)], [1, 2, 4, 8, 8, 8])
        self.assertEqual(backoff.delay(2, 0.0), 2.0)
        self.assertEqual(backoff.delay(3, 0.999), 8.0 * 1.499)

    def test_capped_never_exceeds_the_maximum(self) -> None:
        """Jitter taken off the top, the manager's retries: within [(1 - j) d, d]."""
        backoff = Backoff.capped(1.0, 60.0, 0.5)
        self.assertEqual([backoff.delay(n, 0.0) for n in range(9)], [1, 2, 4, 8, 16, 32, 60, 60, 60])
        for n in range(11):
            top = min(60.0, 2.0**n)
            for i in range(100):
                d = backoff.delay(n, i / 100)
                self.assertTrue(0.5 * top <= d <= top, (n, i, d))
        self.assertEqual(backoff.delay(2, 0.5), 3.0)
        self.assertEqual(Backoff.capped(1.0, 60.0, 0.0).delay(10_000, 0.3), 60.0)

    def test_refuses_nonsense(self) -> None:
        self.assertRaises(ValueError, Backoff.capped, 1.0, 60.0, 1.5)
        self.assertRaises(ValueError, Backoff, -1.0, 60.0)
        self.assertRaises(ValueError, Backoff, 1.0, 60.0, -0.5)
