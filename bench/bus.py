#!/usr/bin/env python
"""The cluster bus alone: NOTIFY round trips to oneself, one at a time, on a PostgreSQL.

Sends ``--count`` notifications, each after the previous one came back
(``store/channels.py``), and prints the wall time and this process's CPU
per round trip. Example: ``python bench/bus.py --db $(.ci/start-postgres | tail -n 1)``
"""

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor

from kerjostunt.store.channels import Channels

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--db", required=True, help="a PostgreSQL URL")
parser.add_argument("--count", type=int, default=2000, help="round trips (default 2000)")
args = parser.parse_args()
N = args.count
got: list[str] = []
done: defer.Deferred[None] = defer.Deferred()


def received(channel: str, payload: str) -> None:
    got.append(payload)
    if len(got) < N:
        chan.notify("kerjostunt_bench", f"x{len(got)}")
    else:
        done.callback(None)


def lost(why: str) -> None:
    print(f"bus lost: {why}", file=sys.stderr)
    if reactor.running:
        reactor.stop()


chan = Channels(reactor, args.db, ["kerjostunt_bench"], received, lost)


@defer.inlineCallbacks
def main():  # type: ignore[no-untyped-def]
    yield chan.start()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    chan.notify("kerjostunt_bench", "x0")
    yield done.addTimeout(max(30.0, N * 0.05), reactor)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(f"{N} sequential round trips: {1000 * (t1 - t0) / N:.3f} ms each (wall), {1000 * cpu / N:.3f} ms CPU each")
    chan.close()
    reactor.stop()


reactor.callWhenRunning(main)
reactor.run()
