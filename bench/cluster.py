#!/usr/bin/env python
"""One instance against two on one PostgreSQL: REGISTER rate and calls that cross instances.

For N = 1 and N = 2 it starts N real servers (``twistd -n kerjostunt --db
postgresql://...``, one certificate directory, their own loopback ports),
then

1. registrations: ``--clients`` TLS peers REGISTER with digest auth (401,
   then 200) from ``--workers`` load generators (``registrations.py``'s
   worker), spread evenly over the instances; prints the aggregate rate and
   the servers' CPU per registration (all instances together);
2. calls: ``--pairs`` caller/callee pairs, callers on instance 1 and, with
   two instances, every callee on instance 2, so each call crosses
   instances both ways (``calls.py``'s worker); calls start at ``--rate``
   per second for ``--duration`` seconds; prints INVITE-to-200 p50 / p99 and
   the servers' CPU per call (and each instance's), and the CPU of
   the PostgreSQL backends serving ``--db``'s database (on this machine).

The database at ``--db`` is WIPED (its ``public`` schema is dropped) before
each run: give it a throwaway one, e.g. ``.ci/start-postgres``'s. Everything
runs on this machine's loopback and every process is stopped at the end.

Example: ``python bench/cluster.py --db $(.ci/start-postgres | tail -n 1)``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calls as calls_bench
import common

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="a THROWAWAY PostgreSQL URL (its public schema is dropped)")
    p.add_argument("--clients", type=int, default=2000, help="peers that REGISTER (default 2000)")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes per phase (default 2)")
    p.add_argument("--window", type=int, default=32, help="registrations in flight per worker (default 32)")
    p.add_argument("--pairs", type=int, default=200, help="caller/callee pairs of the call phase (default 200)")
    p.add_argument("--rate", type=float, default=200.0, help="calls started per second (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of calls (default 10)")
    p.add_argument("--instances", default="1,2", help="instance counts to compare (default 1,2)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit on the whole run, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server logs)")
    p.add_argument("--no-calls", action="store_true", help="registrations only (e.g. 30,000 peers held)")
    p.add_argument("--py-spy", metavar="DIR", type=Path,
                   help="record each instance with py-spy during the calls (DIR/calls-nN-instanceI.txt, raw)")
    calls_bench.add_outcome_option(p)
    return p.parse_args(argv)


@dataclass
class Instance(common.ServerProcess):
    """A server on the shared PostgreSQL, with the cluster's one certificate directory."""

    url: str = ""
    certs: Path = Path()

    @property
    def db_url(self) -> str:
        return self.url

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    def command(self) -> list[str]:
        return [*super().command(), "--certs", str(self.certs), "--advertise", "127.0.0.1"]


def reset_database(url: str, users: int) -> None:
    from kerjostunt.store import Database

    db = Database(url)
    try:
        with db.engine.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        db.upgrade()
        rows = ({"user_id": common.user_id(i), "password": common.password_of(common.user_id(i)),
                 "groups": common.GROUP} for i in range(users))
        db.import_users(rows, common.DOMAIN)
    finally:
        db.close()


def start_instances(base: Path, url: str, count: int, users: int, phase: str) -> list[Instance]:
    reset_database(url, users)
    servers = []
    for index in range(count):
        workdir = base / f"{phase}-n{count}-instance{index}"
        workdir.mkdir(parents=True)
        server = Instance(workdir, users=users, url=url, certs=base / "certs")
        server.start()  # one at a time: the first makes the CA the second reuses
        servers.append(server)
    return servers


def cpu(servers: list[Instance]) -> float:
    return sum(s.cpu() for s in servers)


def wait_quiet(servers: list[Instance]) -> None:
    for server in servers:
        server.wait_quiet()


def registrations(args: argparse.Namespace, base: Path, count: int, deadline: float) -> dict[str, Any]:
    servers = start_instances(base, args.db, count, args.clients, "register")
    workers = None
    try:
        ranges = common.split(args.clients, args.workers)
        sources = common.sources_for(args.clients)
        configs = [{"host": "127.0.0.1", "port": servers[i % count].port, "ca": str(servers[0].ca),
                    "indices": [r.start, r.stop], "warmup_from": args.clients, "sources": sources,
                    "window": args.window, "keepalive": 60.0, "deadline": deadline, "tls_only": False}
                   for i, r in enumerate(ranges)]
        workers = common.Workers(BENCH / "registrations.py", configs, base)
        workers.collect("ready", timeout=60)
        wait_quiet(servers)
        cpu0 = cpu(servers)
        workers.broadcast("go")
        reports = workers.collect("registered", timeout=max(300, args.clients / 50))
        wait_quiet(servers)
        cpu1 = cpu(servers)
        rss_mib = sum(s.rss() for s in servers) / 1024  # every peer still registered, all held at once
    finally:
        if workers is not None:
            workers.stop()
        for server in servers:
            server.stop()
    ok = sum(r["ok"] for r in reports)
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    span = max(r["last_end"] for r in reports) - min(r["first_start"] for r in reports if r["first_start"])
    latencies = [x for r in reports for x in r["latencies"]]
    return {"ok": ok, "errors": sum(errors.values()), "rate": ok / max(1e-9, span),
            "p99": common.percentile(latencies, 99), "cpu_ms": 1000 * (cpu1 - cpu0) / max(1, ok), "rss_mib": rss_mib}


NO_CALLS = {"completed": 0, "started": 0, "errors": 0, "p50": float("nan"), "p99": float("nan"),
            "cpu_ms": float("nan"), "each_ms": "n/a", "pg_ms": float("nan"), "error_kinds": {}}


def calls(args: argparse.Namespace, base: Path, count: int, deadline: float) -> dict[str, Any]:
    servers = start_instances(base, args.db, count, 2 * args.pairs, "calls")
    callee_port = servers[-1].port  # with two instances every callee is on the second
    workers = None
    spies: list[common.PySpy] = []
    try:
        configs = [{"host": "127.0.0.1", "port": servers[0].port, "callee_port": callee_port,
                    "ca": str(servers[0].ca), "pairs": [r.start, r.stop], "total_pairs": args.pairs,
                    "sources": common.sources_for(2 * args.pairs), "window": args.window,
                    "rate": args.rate / args.workers, "duration": args.duration, "deadline": deadline,
                    "outcome": args.outcome}
                   for r in common.split(args.pairs, args.workers)]
        workers = common.Workers(BENCH / "calls.py", configs, base)
        workers.collect("ready", timeout=60)
        workers.broadcast("register")
        workers.collect("registered", timeout=300)
        wait_quiet(servers)
        time.sleep(1.0)  # the bound broadcasts: every instance knows where every callee is
        # The registered peers' idle cost (keepalives, heartbeats), subtracted as calls.py does.
        idle0, idle_t0 = cpu(servers), time.time()
        time.sleep(2.0)
        idle_rate = (cpu(servers) - idle0) / (time.time() - idle_t0)
        spies = [common.PySpy(s.pid, args.py_spy / f"calls-n{count}-instance{i}.txt")
                 for i, s in enumerate(servers)] if args.py_spy else []
        pg0 = common.postgres_cpu(args.db)
        each0 = [s.cpu() for s in servers]
        cpu0, t0 = sum(each0), time.time()
        workers.broadcast(f"calls {time.time() + 0.5}")
        reports = workers.collect("calls-done", timeout=args.duration + 120)
        wait_quiet(servers)
        each1 = [s.cpu() for s in servers]
        cpu1, t1 = sum(each1), time.time()
        pg = common.postgres_spent(pg0, common.postgres_cpu(args.db))
    finally:
        for spy in spies:
            spy.stop()
        if workers is not None:
            workers.stop()
        for server in servers:
            server.stop()
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    latencies = [x for r in reports for x in r["latencies"]]
    completed = sum(r["completed"] for r in reports)
    return {"completed": completed, "started": sum(r["started"] for r in reports), "errors": sum(errors.values()),
            "p50": common.percentile(latencies, 50), "p99": common.percentile(latencies, 99),
            "cpu_ms": 1000 * max(0.0, cpu1 - cpu0 - idle_rate * (t1 - t0)) / max(1, completed),
            "each_ms": " / ".join(f"{1000 * (b - a) / max(1, completed):.2f}" for a, b in zip(each0, each1)),
            "pg_ms": 1000 * pg / max(1, completed), "error_kinds": dict(errors)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.instances.split(",")]
    base, cleanup = common.make_workdir(args.keep)
    deadline = time.time() + args.timeout
    load_start = os.getloadavg()[0]
    results = {n: (registrations(args, base, n, deadline),
                   NO_CALLS if args.no_calls else calls(args, base, n, deadline)) for n in counts}
    rows: list[tuple[str, Any]] = []
    for label, pick in (
        ("registered (401 then 200) / errors", lambda r, c: f"{r['ok']} / {r['errors']}"),
        ("REGISTER rate (all instances), /s", lambda r, c: r["rate"]),
        ("connect-to-200 p99, ms", lambda r, c: r["p99"]),
        ("server CPU per registration (sum), ms", lambda r, c: r["cpu_ms"]),
        ("server RSS with every peer held (sum), MiB", lambda r, c: r["rss_mib"]),
        ("calls completed / started / errors", lambda r, c: f"{c['completed']} / {c['started']} / {c['errors']}"),
        ("INVITE-to-200 p50, ms", lambda r, c: c["p50"]),
        ("INVITE-to-200 p99, ms", lambda r, c: c["p99"]),
        ("server CPU per call (sum, idle subtracted), ms", lambda r, c: c["cpu_ms"]),
        ("  each instance (idle included), ms", lambda r, c: c["each_ms"]),
        ("PostgreSQL backends' CPU per call, ms", lambda r, c: c["pg_ms"]),
    ):
        for n in counts:
            rows.append((f"{label} [{n} instance{'s' if n > 1 else ''}]", pick(*results[n])))
    if 1 in results and 2 in results:
        rows.append(("REGISTER rate, 2 instances / 1", results[2][0]["rate"] / max(1e-9, results[1][0]["rate"])))
    rows.append(("machine load average (1 min), start / end", f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"))
    common.print_table(f"cluster: {args.clients} REGISTERs, {args.rate:g} calls/s for {args.duration:g} s "
                       f"(callees on the second instance)", rows)
    for n in counts:
        for kind, number in sorted(results[n][1]["error_kinds"].items()):
            print(f"  [{n}] call error {kind}: {number}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
