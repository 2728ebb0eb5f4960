"""Built machines with indexed transitions (kerjostunt.machines): Automat's answers, found faster."""

from __future__ import annotations

from typing import Any

from automat import NoTransition
from automat._core import Automaton
from twisted.trial import unittest

from kerjostunt.machines import indexed
from kerjostunt.server.calls.machine import CallMachine
from kerjostunt.server.probe import _ProbeLifeMachine
from kerjostunt.server.signaling import _ConnectionLifeMachine

MACHINES: list[Any] = [CallMachine, _ConnectionLifeMachine, _ProbeLifeMachine]


class IndexedTests(unittest.TestCase):
    def test_every_transition_answers_as_automat_does(self) -> None:
        for machine in MACHINES:
            automaton: Any = machine.__automat_automaton__
            self.assertIn("outputForInput", vars(automaton), machine)  # indexed: the instance's own lookup
            states = {t[0] for t in automaton._transitions} | {t[2] for t in automaton._transitions}
            symbols = {t[1] for t in automaton._transitions}
            self.assertGreater(len(automaton._transitions), 3)
            for state in states:
                for symbol in symbols:
                    try:
                        expected: Any = Automaton.outputForInput(automaton, state, symbol)
                    except NoTransition:
                        self.assertRaises(NoTransition, automaton.outputForInput, state, symbol)
                    else:
                        self.assertEqual(automaton.outputForInput(state, symbol), expected)

    def test_a_machine_without_automat_internals_is_left_alone(self) -> None:
        thing = object()
        self.assertIs(indexed(thing), thing)
