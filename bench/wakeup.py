#!/usr/bin/env python
"""What an idle gap costs the code that runs after it: the same function timed back to back and after sleeps.

A server at 200 calls/s on two cores is idle more than half the time and
wakes about 600 times a second; ``calls.py --inside`` finds its functions
costing several times what they cost in a loop (docs/performance.rst,
"Inside the running server"). This measures the machine's part of that:
``parse_sdp`` of a client's offer (a typical piece of the call path, pure
Python) timed with ``perf_counter_ns`` right after a ``time.sleep`` of each
``--gaps`` length, pinned to one CPU. On a bare-metal core the numbers
stay close; on a virtual machine whose idle vCPU halts (KVM/Firecracker
guests with ``haltpoll.guest_halt_poll_ns=0``, as here) the CPU caches are
cold after the gap and the first code runs several times slower.

Example: ``python bench/wakeup.py``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calls
import common

from kerjostunt.wire.sdp import parse_sdp

OFFER = calls.sdp("b1", "127.0.0.1", 40000)  # what calls.py's peers send


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gaps", default="0,0.1,0.5,1,2,5", help="idle gaps before each call, ms (default 0,0.1,0.5,1,2,5)")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per gap (default 1,000)")
    p.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU to pin to (default the last)")
    return p.parse_args(argv)


def after_gap(gap_s: float, calls: int) -> float:
    """Mean microseconds of one ``parse_sdp`` right after sleeping ``gap_s``."""
    total = 0
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter_ns()
        parse_sdp(OFFER)
        total += time.perf_counter_ns() - started
    return total / calls / 1000


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    if any(g < 0 or g > 50 for g in gaps) or args.calls < 1 or args.calls > 100_000:
        raise SystemExit("gaps from 0 to 50 ms, calls from 1 to 100,000")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    after_gap(0, 2000)  # warm up: the interpreter's caches and specializations
    rows = []
    base = None
    for gap in gaps:
        cost = after_gap(gap / 1000, args.calls)
        base = cost if base is None else base
        rows.append((f"parse_sdp after {gap:g} ms idle, us", f"{cost:.1f} ({cost / base:.1f} x)"))
    halt_poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    rows.append(("guest halt polling, ns", halt_poll.read_text().strip() if halt_poll.exists() else "n/a"))
    rows.append(("pinned to CPU", args.cpu))
    common.print_table(f"wakeup: {args.calls} calls per gap", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
