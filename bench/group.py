"""A whole group meshing in the NAT lab: twelve ``kerjostunt join`` over five sites (issue 12).

Each run builds a fresh lab (``tests/natlab/group.py``: five hosts behind a
preserving NAT, three behind a sequential one with step 4, two behind a
preserving NAT that answers RST, one behind a random NAT, one public host),
starts the real server and every member's ``kerjostunt join`` at once, and
reports: joinable pairs connected, the time to the full mesh of joinable
pairs and until every member's signaling was closed (from starting the
members), the techniques the members printed, and the server's CPU.  A run
ends when both are reached or at ``--deadline``.

Needs root (the lab does); run as ``python3 bench/group.py --runs 3``.
Traffic stays inside the lab's own network namespaces.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task

from tests.natlab.group import LARGE_SITES, SITES, GroupRun, run_group, stamp, summary
from tests.natlab.lab import lab_unavailable

HEADER = ["run", "pairs", "full mesh", "all signaling closed", "server CPU", "techniques"]


def _s(value: float | None, deadline: float) -> str:
    return f"not in {deadline:g} s" if value is None else f"{value:.1f} s"


def row(i: int, run: GroupRun, deadline: float) -> list[str]:
    closed = _s(run.all_closed_s, deadline)
    if run.signaling_open:
        closed += f" ({len(run.signaling_open)} open)"
    return [str(i), f"{run.pairs_ok}/{len(run.joinable)}", _s(run.mesh_s, deadline), closed,
            f"{run.server_cpu_s:.1f} s", ", ".join(f"{t} {n}" for t, n in sorted(run.techniques.items()))]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in rows)) for i, h in enumerate(HEADER)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in rows]
    lines.append(rule)
    return "\n".join(lines)


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    base = Path(tempfile.mkdtemp(prefix="kerjostunt-bench-group-"))
    rows, runs = [], []
    for i in range(1, args.runs + 1):
        sites = LARGE_SITES if args.large else SITES
        result = yield run_group(reactor, base / f"run{i}", deadline=args.deadline, sites=sites)
        runs.append(result)
        rows.append(row(i, result, args.deadline))
        print(f"[run {i}/{args.runs}] {summary(result)}", file=sys.stderr, flush=True)
        (base / f"run{i}" / "members.json").write_text(json.dumps(result.outputs, indent=1))
    size = "40 peers of one group over 5 sites (20 behind one NAT)" if args.large else \
        "12 peers of one group over 5 sites"
    print(f"{size}, 20 ms one-way per access link, {args.runs} runs, {stamp()} (logs in {base})\n")
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each in a fresh lab (default 3)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds a run may take from starting the members (default 150, 600 with --large)")
    parser.add_argument("--large", action="store_true",
                        help="40 peers: 20 behind a preserving NAT, 8 behind the sequential one, 6 behind the "
                             "RST one, 5 behind the random one, and the public host")
    args = parser.parse_args(argv)
    if args.deadline is None:
        args.deadline = 600.0 if args.large else 150.0
    reason = lab_unavailable()
    if reason:
        print(f"group bench: {reason}", file=sys.stderr)
        return 2
    task.react(run, (args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
