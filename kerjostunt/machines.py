"""Automat's built machines with their transitions looked up in a table.

Automat 25.4's ``Automaton.outputForInput`` finds an input's transition by
comparing ``(state, input)`` with every transition of the machine in turn.
The server's call machine has dozens of transitions and takes about twelve
inputs per call, so this scan was the largest single cost of the call path
measured alone (``bench/callpath.py``: 0.07 ms of 0.51 per call, most of it
the states' generated ``__eq__``). ``indexed`` gives a built machine's
automaton a lookup in a dict made once from the same transitions, with
Automat's own answers: the same ``(outState, outputs)`` and the same
``NoTransition`` or unhandled transition.

It relies on two Automat internals (``__automat_automaton__`` of a built
``TypeMachine`` and the automaton's ``_transitions`` and
``_unhandledTransition``); ``tests.test_machines`` holds them to their
meaning, and a machine without them (another Automat) is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from automat import NoTransition

__all__ = ["indexed"]

_M = TypeVar("_M")


def indexed(machine: _M) -> _M:
    """``machine`` (a ``TypeMachineBuilder.build()`` result), its transitions found by a dict lookup."""
    automaton: Any = getattr(machine, "__automat_automaton__", None)
    transitions = getattr(automaton, "_transitions", None)
    if automaton is None or transitions is None or not hasattr(automaton, "_unhandledTransition"):
        return machine
    table: dict[tuple[Any, Any], tuple[Any, tuple[Any, ...]]] = {}
    try:
        for in_state, symbol, out_state, outputs in transitions:
            table[(in_state, symbol)] = (out_state, tuple(outputs))
    except TypeError:  # an unhashable state: keep Automat's scan
        return machine

    def output_for_input(in_state: Any, symbol: Any) -> tuple[Any, Sequence[Any]]:
        found = table.get((in_state, symbol))
        if found is None:
            unhandled = automaton._unhandledTransition
            if unhandled is None:
                raise NoTransition(state=in_state, symbol=symbol)
            return unhandled  # type: ignore[no-any-return]
        return found[0], list(found[1])

    automaton.outputForInput = output_for_input
    return machine
