"""Time named functions inside the running server (``--inside`` of calls.py and registrations.py).

Code costs several times more inside the server than in a loop of its own
(docs/performance.rst, "Inside the running server"), so the only honest
price of a function is taken where it runs. The bench starts the server as
``python -c "import inside; inside.install(...); twistd ..."``; each
``module:Qualified.name`` is wrapped to add up ``time.perf_counter_ns``
around every call (inclusive: what it calls counts too, the reactor is one
thread), SIGUSR2 starts the count afresh (twistd keeps SIGUSR1 for its log),
and the totals are written as JSON when the reactor shuts down. A wrapper
costs well under a microsecond per call; wrap a few functions, not every
one.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_totals: dict[str, list[int]] = {}


def _wrapped(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    clock = time.perf_counter_ns

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return function(*args, **kwargs)
        finally:
            entry = _totals[label]
            entry[0] += clock() - started
            entry[1] += 1

    return timed


def _install_one(spec: str) -> None:
    module_name, _, path = spec.partition(":")
    if not path:
        raise SystemExit(f"--inside takes module:Qualified.name, not {spec!r}")
    owner: Any = importlib.import_module(module_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    original = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name)
    if original is None:
        raise SystemExit(f"--inside: {spec} is not defined there (inherited names are not wrapped)")
    _totals[spec] = [0, 0]
    if isinstance(original, (classmethod, staticmethod)):
        setattr(owner, name, type(original)(_wrapped(spec, original.__func__)))
        return
    timed = _wrapped(spec, original)
    setattr(owner, name, timed)
    if not isinstance(owner, type):  # a module function others imported by name
        for module in list(sys.modules.values()):
            if module is not None and module is not owner and vars(module).get(name) is original:
                setattr(module, name, timed)


def _reset(_signum: int, _frame: object) -> None:
    for entry in _totals.values():
        entry[0] = entry[1] = 0


def install(specs: list[str], report: str) -> None:
    """Wrap ``specs``; write ``{spec: [ns, calls]}`` to ``report`` when the reactor shuts down."""
    for spec in specs:
        _install_one(spec)
    signal.signal(signal.SIGUSR2, _reset)
    from twisted.internet import reactor

    def write() -> None:
        Path(report).write_text(json.dumps(_totals))

    reactor.addSystemEventTrigger("before", "shutdown", write)  # type: ignore[attr-defined]


def rows(report: Path, operations: int, what: str) -> list[tuple[str, str]]:
    """Table rows: per call of the function, and per ``what`` (call, registration) of the run."""
    totals: dict[str, list[int]] = json.loads(report.read_text())
    out = []
    for spec, (ns, calls) in sorted(totals.items(), key=lambda item: -item[1][0]):
        each = ns / 1000 / calls if calls else float("nan")
        out.append((f"  inside {spec.partition(':')[2]}, us each / per {what} (calls per {what})",
                    f"{each:.1f} / {ns / 1000 / max(1, operations):.0f} ({calls / max(1, operations):.1f})"))
    return out
