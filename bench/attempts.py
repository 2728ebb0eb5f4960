#!/usr/bin/env python
"""The store's cost per call attempt: one transaction each against written behind in batches.

Issue 16 measured 0.69 ms of server CPU per call in the attempt's SQL (one
transaction and one hand-off to the store's thread per call). This script
writes ``--calls`` attempts through the real ``AsyncStore`` (its thread
pool, a real reactor, SQLite in WAL mode in a temporary directory, or
``--db`` PostgreSQL, whose public schema is WIPED) at ``--rate`` per second,
twice: each attempt in a transaction of its own (``Database.record_attempt``
through the write lane, the old path) and as the server writes them now
(``AsyncStore.record_attempt``: gathered for 50 ms, ``store/behind.py``).
Prints the process's CPU (all threads: the reactor's hand-offs and the SQL)
per attempt, and how long the last one took to be written.

Example: ``python bench/attempts.py --calls 4000 --rate 200``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common


def prepare(url: str, users: int) -> None:
    from kerjostunt.store import Database

    db = Database(url)
    try:
        if not db.is_sqlite:
            with db.engine.begin() as c:
                c.exec_driver_sql("DROP SCHEMA public CASCADE")
                c.exec_driver_sql("CREATE SCHEMA public")
        db.upgrade()
        rows = ({"user_id": common.user_id(i), "password": "x", "groups": common.GROUP} for i in range(users))
        db.import_users(rows, common.DOMAIN)
    finally:
        db.close()


def one_run(url: str, calls: int, rate: float, pairs: int, mode: str) -> tuple[float, float]:
    """CPU seconds per attempt and the seconds from the last attempt to its write."""
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, succeed
    from twisted.internet.task import deferLater

    from kerjostunt.store import Database
    from kerjostunt.store.api import BUSY_TIMEOUT, USAGE, AsyncStore

    store = AsyncStore(Database(url, busy_timeout=BUSY_TIMEOUT), reactor)  # type: ignore[arg-type]
    store.start()
    result: dict[str, float] = {}

    def write(i: int) -> Any:
        row = (f"c{i}", common.user_id(i % pairs), common.user_id(pairs + i % pairs), "simultaneous-open",
               "stunt", "127.0.0.1:4000", "127.0.0.1:4000", 12.0, time.time(), None, None)
        if mode == "behind":
            return store.record_attempt(*row)
        if mode == "each":
            return store._submit(Database.record_attempt, row, {}, flush_seen=False, kind=USAGE)
        return succeed(None)  # "none": the drive loop's own cost, subtracted

    async def drive() -> None:
        cpu0 = time.process_time()
        written = []
        for i in range(calls):
            written.append(write(i))
            await deferLater(reactor, 1.0 / rate, lambda: None)  # type: ignore[arg-type]
        last = time.perf_counter()
        await gatherResults(written)
        result["lag"] = time.perf_counter() - last
        result["cpu"] = (time.process_time() - cpu0) / calls
        await store.stop()

    from twisted.internet.defer import Deferred

    done = Deferred.fromCoroutine(drive())
    done.addErrback(lambda f: (f.printTraceback(), None)[1])
    done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return result["cpu"], result["lag"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4000, help="attempts per run (default 4000)")
    p.add_argument("--rate", type=float, default=200.0, help="attempts per second (default 200)")
    p.add_argument("--pairs", type=int, default=200, help="caller/callee pairs (default 200)")
    p.add_argument("--db", default="", help="a THROWAWAY PostgreSQL URL (default: SQLite in a temporary directory)")
    p.add_argument("--mode", choices=("none", "each", "behind"), help="(internal) one run, printed as two numbers")
    args = p.parse_args(argv)
    if args.mode:  # one run per process: Twisted's reactor runs once
        url = args.db or f"sqlite:///{Path(tempfile.mkdtemp(prefix='kerjo-attempts-')) / 'k.sqlite'}"
        prepare(url, 2 * args.pairs)
        cpu, lag = one_run(url, args.calls, args.rate, args.pairs, args.mode)
        print(f"{cpu} {lag}")
        return 0
    import subprocess

    load_start = os.getloadavg()[0]
    rows: list[tuple[str, Any]] = [("database", "PostgreSQL" if args.db else "SQLite (WAL)"),
                                   ("attempts per run, rate", f"{args.calls}, {args.rate:g}/s")]
    def run(mode: str) -> list[str]:
        return subprocess.run([sys.executable, __file__, "--mode", mode, "--calls", str(args.calls),
                               "--rate", str(args.rate), "--pairs", str(args.pairs), "--db", args.db],
                              check=True, capture_output=True, text=True).stdout.split()

    loop = float(run("none")[0])
    rows.append(("the drive loop alone (subtracted), ms per attempt", 1000 * loop))
    for mode, label in (("each", "one transaction each"), ("behind", "written behind (50 ms batches)")):
        out = run(mode)
        rows.append((f"CPU per attempt, ms: {label}", 1000 * (float(out[0]) - loop)))
        rows.append((f"  last attempt written after, ms: {label}", 1000 * float(out[1])))
    rows.append(("machine load average (1 min), start / end", f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"))
    common.print_table("call attempts through AsyncStore", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
