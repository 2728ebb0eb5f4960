"""Time to a working peer-to-peer connection in the NAT lab, per NAT pair.

For every pair of NAT behaviours (``tests.natlab.matrix``), the real server
and real ``kerjostunt echo-server``/``echo-client`` processes run in a fresh
lab; each try times ``connect`` (the INVITE and its answer, the dial
moment, the punch and the peer handshake; with ``--cold callee|both`` also
those sides' probes, which an agent otherwise makes ahead of the call: a
callee idle for longer than its punch port's maximum age is cold) and, from the client's log,
the punch alone (dial moment to verified connection). The table gives p50 and
p99 of both, and the floor the lab's link delays allow (twice the RTT to the
server for the INVITE and its answer, plus a TCP and the peer handshake
between the peers), with p50 / floor.  With ``--relay`` (coturn in the
server namespace) the pairs no technique joins connect through it; a relayed
row's floor counts the relay's round trips instead (``relay_floor_ms``).

Needs root (the lab does); run as ``python3 bench/traversal.py --tries 10``.
Traffic stays inside the lab's own network namespaces.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, task

from tests.natlab.lab import lab_unavailable
from tests.natlab.matrix import Row, pairs, run_pair


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def cells(row: Row) -> list[str]:
    p50 = percentile(row.connect_ms, 0.50)
    technique = row.techniques.most_common(1)[0][0] if row.techniques else "-"
    return [
        row.nat_a,
        row.nat_b,
        f"{row.ok}/{row.tries}",
        technique,
        _ms(p50),
        _ms(percentile(row.connect_ms, 0.99)),
        _ms(percentile(row.punch_ms, 0.50)),
        _ms(percentile(row.punch_ms, 0.99)),
        f"{row.floor_ms:.0f}",
        "-" if p50 is None or not row.floor_ms else f"{p50 / row.floor_ms:.2f}",
    ]


HEADER = ["NAT A", "NAT B", "ok", "technique", "connect p50", "connect p99",
          "punch p50", "punch p99", "floor", "p50/floor"]


def table(rows: list[Row]) -> str:
    body = [cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADER)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in body]
    lines.append(rule)
    return "\n".join(lines)


@defer.inlineCallbacks
def run(reactor, args):  # type: ignore[no-untyped-def]
    chosen = [p for p in pairs() if not args.only or any(o in f"{p.nat_a} {p.label_b()}" for o in args.only)]
    base = Path(tempfile.mkdtemp(prefix="kerjostunt-bench-traversal-"))
    started = time.monotonic()
    rows = []
    for i, pair in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {pair.nat_a} -> {pair.label_b()}", file=sys.stderr, flush=True)
        cold = ("--punch-port-max-age", "0")
        caller_args = cold if args.cold == "both" else ()
        callee_args = cold if args.cold in ("both", "callee") else ()
        rows.append((yield run_pair(reactor, pair, args.tries, args.delay_ms, args.timeout, base / f"pair{i}", False,
                                    caller_args, callee_args, relay=args.relay)))
    mode = {"none": "punch ports probed ahead of the call",
            "callee": "the callee probes at call time (cold), the caller ahead of it",
            "both": "both sides probe at call time (cold)"}[args.cold]
    relay = ", coturn relay on" if args.relay else ""
    print(f"time to connect in the NAT lab, ms: {args.tries} tries per pair{relay}, {args.delay_ms:g} ms one-way "
          f"per access link, {mode}; {time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s\n")
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=10, help="connections per NAT pair (default 10)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per access link (default 20)")
    parser.add_argument("--timeout", type=float, default=30.0, help="echo-client --timeout per try (default 30)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only pairs whose NAT names contain TEXT (repeatable)")
    parser.add_argument("--cold", choices=("none", "callee", "both"), default="none",
                        help="which peers probe their punch port at call time (--punch-port-max-age 0), "
                             "as an agent idle for longer than that does (default none)")
    parser.add_argument("--relay", action="store_true",
                        help="coturn in the server namespace, the server with --relay: pairs no technique "
                             "joins relay (their floor: tests.natlab.matrix.relay_floor_ms)")
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"traversal bench: {reason}", file=sys.stderr)
        return 2
    task.react(run, (args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
