#!/usr/bin/env python
"""The cluster bus alone (``store/channels.py``) on a PostgreSQL: round trips, then a flood.

1. ``--count`` notifications to oneself, each after the previous one came
   back: the wall time and this process's CPU per round trip;
2. ``--flood`` messages of ``--size`` characters at ``--rate`` per second,
   ``--burst`` of them per reactor turn (a crossing call is about ten
   messages, a few per turn): this process's CPU per message (sending and
   receiving both, as two instances would share it) and the CPU of the
   PostgreSQL backends serving ``--db``'s database (this machine's), and
   how late the messages arrive (p50 / p99).

Example: ``python bench/bus.py --db $(.ci/start-postgres | tail -n 1)``
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import machine
from twisted.internet import defer, reactor, task

from kerjostunt.store.channels import Channels

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--db", required=True, help="a PostgreSQL URL")
parser.add_argument("--count", type=int, default=2000, help="round trips (default 2000)")
parser.add_argument("--flood", type=int, default=20000, help="messages of the flood (default 20000, 0: none)")
parser.add_argument("--rate", type=float, default=2000.0, help="flood messages per second (default 2000)")
parser.add_argument("--burst", type=int, default=3, help="flood messages per reactor turn (default 3)")
parser.add_argument("--spacing", type=float, default=None, help="the outbox's spacing, s (default its own)")
parser.add_argument("--size", type=int, default=1200, help="characters per flood message (default 1200)")
args = parser.parse_args()
CHANNEL = "kerjostunt_bench"


class Bench:
    def __init__(self) -> None:
        self.got = 0
        self.want = args.count
        self.done: defer.Deferred[None] = defer.Deferred()
        self.flooding = False
        self.late: list[float] = []
        extra = {} if args.spacing is None else {"spacing": args.spacing}
        self.chan = Channels(reactor, args.db, [CHANNEL], self.received, self.lost, **extra)

    def received(self, channel: str, payload: str) -> None:
        self.got += 1
        if self.flooding:
            self.late.append(time.time() - float(payload[:payload.index(" ")]))
        elif self.got < self.want:
            self.chan.notify(CHANNEL, f"x{self.got}")
        if self.got == self.want and not self.done.called:
            self.done.callback(None)

    def lost(self, why: str) -> None:
        print(f"bus lost: {why}", file=sys.stderr)
        if reactor.running:
            reactor.stop()

    def round_trips(self) -> defer.Deferred[None]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        self.chan.notify(CHANNEL, "x0")

        def report(_: object) -> None:
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
            cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            print(f"{args.count} sequential round trips: {1000 * (t1 - t0) / args.count:.3f} ms each (wall), "
                  f"{1000 * cpu / args.count:.3f} ms CPU each")

        return self.done.addTimeout(max(30.0, args.count * 0.05), reactor).addCallback(report)

    @defer.inlineCallbacks
    def flood(self):  # type: ignore[no-untyped-def]
        self.got, self.want, self.flooding = 0, args.flood, True
        self.done = defer.Deferred()
        filler = "y" * args.size
        sent = 0

        def burst() -> None:
            nonlocal sent
            for _ in range(min(args.burst, args.flood - sent)):
                self.chan.notify(CHANNEL, f"{time.time():.6f} {sent} {filler}")
                sent += 1
            if sent >= args.flood:
                loop.stop()

        pg0 = machine.postgres_cpu(args.db)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        loop = task.LoopingCall(burst)
        loop.start(args.burst / args.rate)
        yield self.done.addTimeout(args.flood / args.rate + 60, reactor)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
        pg = machine.cpu_delta(pg0, machine.postgres_cpu(args.db))
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        n = args.flood
        print(f"flood of {n} x {args.size} chars, {args.rate:g}/s in bursts of {args.burst}: "
              f"{t1 - t0:.1f} s; CPU per message {1000 * cpu / n:.4f} ms here, "
              f"{1000 * pg / n:.4f} ms in PostgreSQL; late p50 / p99 "
              f"{common.percentile([1000 * x for x in self.late], 50):.2f} / "
              f"{common.percentile([1000 * x for x in self.late], 99):.2f} ms")


@defer.inlineCallbacks
def main():  # type: ignore[no-untyped-def]
    bench = Bench()
    yield bench.chan.start()
    yield bench.round_trips()
    if args.flood:
        yield bench.flood()
    bench.chan.close()
    reactor.stop()


reactor.callWhenRunning(main)
reactor.run()
