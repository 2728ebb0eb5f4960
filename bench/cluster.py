#!/usr/bin/env python
"""One instance against two on one PostgreSQL: REGISTER rate and calls that cross instances.

For N = 1 and N = 2 it starts N real servers (``twistd -n kerjostunt --db
postgresql://...``, one certificate directory, their own loopback ports),
then

1. registrations: ``--clients`` TLS peers REGISTER with digest auth (401,
   then 200), spread evenly over the instances, each connection held open;
   the load generator (``--generator``) is the lean Python worker
   (``leanreg.py``, the default), SIPp (``sipp/register_hold.xml``,
   ``sippreg.py``; a sipp built with TLS, ``sipp/build-sipp.sh``) or
   ``registrations.py``'s Twisted workers.
   Each instance is pinned to a CPU of its own (``--pin``; with one
   instance the generators get the other CPU). Prints the aggregate rate
   and, per registration, the CPU of the servers (all instances together),
   of the generators and of PostgreSQL, and the bound these put on the
   ratio on this machine: 2 instances / 1 <= 2 s1 / (s2 + g + pg) when the
   two-instance run uses every core (``machine.py``);
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
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calls as calls_bench
import common
import machine
import sippreg

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="a THROWAWAY PostgreSQL URL (its public schema is dropped)")
    p.add_argument("--clients", type=int, default=2000, help="peers that REGISTER (default 2000)")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes per phase (default 2)")
    p.add_argument("--window", type=int, default=32,
                   help="registrations in flight per Python worker (default 32)")
    p.add_argument("--generator", choices=("lean", "sipp", "twisted"), default="lean",
                   help="REGISTER load generator: lean (default; leanreg.py: pyOpenSSL, no Twisted, the "
                        "cheapest here), sipp (a sipp with TLS, sipp/build-sipp.sh; one handshake in flight "
                        "per process, so it drives one instance to about 75 %% of its CPU), twisted "
                        "(registrations.py's workers)")
    p.add_argument("--sipp", metavar="PATH", help="the sipp binary (default: sipp on PATH)")
    p.add_argument("--sipp-per-instance", type=int, default=4,
                   help="sipp processes per instance (one TLS handshake in flight each; default 4)")
    p.add_argument("--no-verify", action="store_true",
                   help="the generators do not verify the server's certificate (default: they check the chain)")
    p.add_argument("--pin", choices=("on", "off"), default="on",
                   help="registrations: each instance on a CPU of its own (the last CPU for one instance, "
                        "the generators then on the others; with two, CPU 0 and 1, generators anywhere); "
                        "default on")
    p.add_argument("--pairs", type=int, default=200, help="caller/callee pairs of the call phase (default 200)")
    p.add_argument("--rate", type=float, default=200.0, help="calls started per second (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of calls (default 10)")
    p.add_argument("--instances", default="1,2", help="instance counts to compare (default 1,2)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit on the whole run, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server logs)")
    p.add_argument("--no-calls", action="store_true", help="registrations only (e.g. 30,000 peers held)")
    p.add_argument("--refresh", type=float, default=0.0, metavar="SECONDS",
                   help="after the registrations, every held peer registers again on its TLS connection for "
                        "SECONDS (digest, the nonce reused: no handshake), lean generator only (default 0: no)")
    p.add_argument("--py-spy", metavar="DIR", type=Path,
                   help="record each instance with py-spy during the calls (DIR/calls-nN-instanceI.txt, raw)")
    calls_bench.add_outcome_option(p)
    args = p.parse_args(argv)
    if args.refresh > 0 and args.generator != "lean":
        p.error("--refresh needs --generator lean")
    return args


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


def start_instances(base: Path, url: str, count: int, users: int, phase: str,
                    cpus: list[frozenset[int] | None] | None = None) -> list[Instance]:
    reset_database(url, users)
    servers = []
    for index in range(count):
        workdir = base / f"{phase}-n{count}-instance{index}"
        workdir.mkdir(parents=True)
        server = Instance(workdir, users=users, url=url, certs=base / "certs",
                          cpus=cpus[index] if cpus else None)
        server.start()  # one at a time: the first makes the CA the second reuses
        servers.append(server)
    return servers


def cpu(servers: list[Instance]) -> float:
    return sum(s.cpu() for s in servers)


def wait_quiet(servers: list[Instance]) -> None:
    for server in servers:
        server.wait_quiet()


def pinning(args: argparse.Namespace, count: int) -> tuple[list[frozenset[int] | None] | None, frozenset[int] | None]:
    """(each instance's CPUs, the generators' CPUs) of the registration phase; None: anywhere."""
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin == "off" or len(cpus) < max(2, count):
        return None, None
    if count == 1:  # the instance on the last CPU, everything we start on the others
        return [frozenset({cpus[-1]})], frozenset(cpus[:-1])
    return [frozenset({cpus[i]}) for i in range(count)], None


def describe_pinning(servers: list[frozenset[int] | None] | None, generators: frozenset[int] | None) -> str:
    if servers is None:
        return "off"
    where = ", ".join(f"CPU {min(c)}" for c in servers if c)
    return f"instances on {where}; generators on {common._cpus(generators) if generators else 'any CPU'}"


class PythonGenerators:
    """``registrations.py``'s Twisted workers or ``leanreg.py``'s, behind SippGenerators' interface."""

    def __init__(self, args: argparse.Namespace, servers: list[Instance], base: Path,
                 cpus: frozenset[int] | None, deadline: float) -> None:
        self.script = BENCH / ("leanreg.py" if args.generator == "lean" else "registrations.py")
        ranges = common.split(args.clients, args.workers)
        sources = common.sources_for(args.clients)
        self.configs = [{"host": "127.0.0.1", "port": servers[i % len(servers)].port, "ca": str(servers[0].ca),
                         "indices": [r.start, r.stop], "warmup_from": args.clients, "sources": sources,
                         "window": args.window, "keepalive": 60.0, "deadline": deadline, "tls_only": False,
                         "verify": not args.no_verify}
                        for i, r in enumerate(ranges)]
        self.base, self.cpus = base, cpus
        self.workers: common.Workers | None = None

    def prepare(self) -> None:
        self.workers = common.Workers(self.script, self.configs, self.base, cpus=self.cpus)
        self.workers.collect("ready", timeout=60)

    def go(self, hold_s: float, timeout: float) -> None:
        assert self.workers is not None
        self.workers.broadcast("go")

    def cpu(self) -> float:
        return self.workers.cpu() if self.workers is not None else 0.0

    def wait_registered(self, timeout: float) -> dict[str, Any]:
        assert self.workers is not None
        reports = self.workers.collect("registered", timeout=timeout)
        errors: Counter[str] = Counter()
        for r in reports:
            errors.update(r["errors"])
        return {"ok": sum(r["ok"] for r in reports), "errors": dict(errors),
                "latencies": [x for r in reports for x in r["latencies"]],
                "first_start": min((r["first_start"] for r in reports if r["first_start"]), default=0.0),
                "last_end": max(r["last_end"] for r in reports)}

    def refresh(self, seconds: float) -> list[dict[str, Any]]:
        """leanreg.py's ``refresh``: the held peers REGISTER again for ``seconds``; its workers' reports."""
        assert self.workers is not None
        self.workers.broadcast(f"refresh {seconds}")
        return self.workers.collect("refreshed", timeout=seconds + 60)

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()


def generator_for(args: argparse.Namespace, servers: list[Instance], base: Path, cpus: frozenset[int] | None,
                  deadline: float) -> PythonGenerators | sippreg.SippGenerators:
    if args.generator != "sipp":
        return PythonGenerators(args, servers, base, cpus, deadline)
    workdir = base / f"sipp-n{len(servers)}"
    workdir.mkdir()
    return sippreg.SippGenerators(args.sipp_path, workdir, [("127.0.0.1", s.port) for s in servers], args.clients,
                                  str(servers[0].ca), verify=not args.no_verify, per_target=args.sipp_per_instance,
                                  cpus=cpus)


def registrations(args: argparse.Namespace, base: Path, count: int, deadline: float) -> dict[str, Any]:
    server_cpus, generator_cpus = pinning(args, count)
    servers = start_instances(base, args.db, count, args.clients, "register", server_cpus)
    generators = generator_for(args, servers, base, generator_cpus, deadline)
    try:
        generators.prepare()
        wait_quiet(servers)
        cpu0, gen0, pg0, busy0, t0 = cpu(servers), generators.cpu(), machine.postgres_cpu(args.db), \
            machine.busy_seconds(), time.time()
        generators.go(hold_s=max(10.0, deadline - time.time()), timeout=deadline - time.time())
        report = generators.wait_registered(timeout=max(300, args.clients / 50))
        gen1, busy1, t1 = generators.cpu(), machine.busy_seconds(), time.time()
        wait_quiet(servers)
        cpu1, pg1 = cpu(servers), machine.postgres_cpu(args.db)
        rss_mib = sum(s.rss() for s in servers) / 1024  # every peer still registered, all held at once
        held = sum(common.open_fds(s.pid) for s in servers)
        refresh = refreshes(args, servers, generators) if args.refresh > 0 else NO_REFRESH
    finally:
        generators.stop()
        for server in servers:
            server.stop()
    ok = max(1, report["ok"])
    span = report["last_end"] - report["first_start"]
    return {"ok": report["ok"], "errors": sum(report["errors"].values()), "error_kinds": report["errors"],
            "rate": report["ok"] / max(1e-9, span), "p99": common.percentile(report["latencies"], 99),
            "cpu_ms": 1000 * (cpu1 - cpu0) / ok, "gen_ms": 1000 * (gen1 - gen0) / ok,
            "pg_ms": 1000 * machine.cpu_delta(pg0, pg1) / ok,
            "busy": 100 * (busy1 - busy0) / max(1e-9, (t1 - t0) * len(os.sched_getaffinity(0))),
            "rss_mib": rss_mib, "fds": held, "pinning": describe_pinning(server_cpus, generator_cpus), **refresh}


NO_REFRESH = {"refresh_rate": float("nan"), "refresh_errors": 0, "refresh_cpu_ms": float("nan"),
              "refresh_gen_ms": float("nan"), "refresh_pg_ms": float("nan")}


def refreshes(args: argparse.Namespace, servers: list[Instance], generators: PythonGenerators) -> dict[str, Any]:
    """``--refresh``: the held peers REGISTER again on their connections; rate and CPU per refresh.

    What a first registration costs is mostly the two TLS handshakes (the
    generators' side alone about 1 ms); a refresh has none, so the
    generators' share of the two cores is small and the instances' own cost
    shows.
    """
    wait_quiet(servers)
    cpu0, gen0, pg0 = cpu(servers), generators.cpu(), machine.postgres_cpu(args.db)
    reports = generators.refresh(args.refresh)
    cpu1, gen1, pg1 = cpu(servers), generators.cpu(), machine.postgres_cpu(args.db)
    count = sum(r["count"] for r in reports)
    span = max(r["last"] for r in reports) - min(r["first"] for r in reports)
    per = 1000 / max(1, count)
    return {"refresh_rate": count / max(1e-9, span), "refresh_errors": sum(sum(r["errors"].values()) for r in reports),
            "refresh_cpu_ms": per * (cpu1 - cpu0), "refresh_gen_ms": per * (gen1 - gen0),
            "refresh_pg_ms": per * machine.cpu_delta(pg0, pg1)}


NO_CALLS = {"completed": 0, "started": 0, "errors": 0, "p50": float("nan"), "p99": float("nan"),
            "cpu_ms": float("nan"), "each_ms": "n/a", "pg_ms": float("nan"), "error_kinds": {},
            "steal": "n/a"}


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
        pg0 = machine.postgres_cpu(args.db)
        each0 = [s.cpu() for s in servers]
        cpu0, t0 = sum(each0), time.time()
        steal = machine.StealWatch()
        workers.broadcast(f"calls {time.time() + 0.5}")
        reports = workers.collect("calls-done", timeout=args.duration + 120)
        wait_quiet(servers)
        each1 = [s.cpu() for s in servers]
        cpu1, t1 = sum(each1), time.time()
        stolen = steal.stop()
        pg = machine.cpu_delta(pg0, machine.postgres_cpu(args.db))
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
            "pg_ms": 1000 * pg / max(1, completed), "error_kinds": dict(errors),
            "steal": f"{100 * stolen / (t1 - t0):.1f} / {100 * steal.worst / steal.interval:.0f}"}


def choose_generator(args: argparse.Namespace) -> str:
    """Check the generator asked for (a sipp with TLS for ``sipp``); returns the table's description."""
    found = sippreg.find_sipp(args.sipp) if args.generator == "sipp" else None
    if args.generator == "sipp" and found is None:
        raise SystemExit(f"{args.sipp or 'sipp'}: not a sipp with TLS (Debian's sip-tester has none); "
                         "build one with bench/sipp/build-sipp.sh and pass --sipp PATH")
    if args.generator == "twisted" and args.no_verify:
        raise SystemExit("--no-verify: the Twisted workers always verify")
    check = "not verified" if args.no_verify else "chain verified against the CA"
    if args.generator == "sipp":
        assert found is not None
        args.sipp_path = found[0]
        return f"sipp {found[1]}, {args.sipp_per_instance} per instance, one TLS connection per peer; {check}"
    if args.generator == "lean":
        return f"leanreg.py x {args.workers} (pyOpenSSL, selectors); {check} and the name localhost"
    return f"registrations.py's Twisted workers x {args.workers}; {check} and the name localhost"


def per_instance_count(label: str, pick: Callable[[dict[str, Any]], Any], counts: list[int],
                       results: dict[int, dict[str, Any]]) -> list[tuple[str, Any]]:
    """One table row per instance count: ``label [N instance(s)]`` and what ``pick`` reads of its run."""
    return [(f"{label} [{n} instance{'s' if n > 1 else ''}]", pick(results[n])) for n in counts]


def registration_rows(counts: list[int], regs: dict[int, dict[str, Any]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for label, pick in (
        ("registered (401 then 200) / errors", lambda r: f"{r['ok']} / {r['errors']}"),
        ("REGISTER rate (all instances), /s", lambda r: r["rate"]),
        ("connect-to-200 p99, ms", lambda r: r["p99"]),
        ("server CPU per registration (sum) s, ms", lambda r: r["cpu_ms"]),
        ("load generators' CPU per registration g, ms", lambda r: r["gen_ms"]),
        ("PostgreSQL CPU per registration pg, ms", lambda r: r["pg_ms"]),
        ("s + g + pg, ms", lambda r: r["cpu_ms"] + r["gen_ms"] + r["pg_ms"]),
        (f"machine busy while registering, % of {len(os.sched_getaffinity(0))} CPUs", lambda r: r["busy"]),
        ("pinning", lambda r: r["pinning"]),
        ("server RSS with every peer held (sum), MiB", lambda r: r["rss_mib"]),
    ):
        rows += per_instance_count(label, pick, counts, regs)
    if any(not math.isnan(r["refresh_rate"]) for r in regs.values()):
        for label, pick in (
            ("refresh REGISTERs on held connections (200) / errors, /s",
             lambda r: f"{r['refresh_rate']:.0f} / {r['refresh_errors']}"),
            ("  server / generators' / PostgreSQL CPU per refresh, ms",
             lambda r: f"{r['refresh_cpu_ms']:.3f} / {r['refresh_gen_ms']:.3f} / {r['refresh_pg_ms']:.3f}"),
        ):
            rows += per_instance_count(label, pick, counts, regs)
        if 1 in regs and 2 in regs:
            rows.append(("refresh rate, 2 instances / 1", regs[2]["refresh_rate"] / max(1e-9, regs[1]["refresh_rate"])))
    if 1 in regs and 2 in regs:
        one, two = regs[1], regs[2]
        rows.append(("REGISTER rate, 2 instances / 1", two["rate"] / max(1e-9, one["rate"])))
        cores = len(os.sched_getaffinity(0))
        ceiling = 1000 * cores / max(1e-9, two["cpu_ms"] + two["gen_ms"] + two["pg_ms"])
        rows.append((f"2-instance rate with all {cores} CPUs busy, {cores}/(s2 + g2 + pg2), /s", ceiling))
        rows.append(("  / the 1-instance rate measured: bound on the ratio", ceiling / max(1e-9, one["rate"])))
        rows.append(("  / 1/s1 (one instance filling its CPU): 2 s1/(s2 + g2 + pg2)", ceiling * one["cpu_ms"] / 1000))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = choose_generator(args)
    counts = [int(c) for c in args.instances.split(",")]
    base, cleanup = common.make_workdir(args.keep)
    deadline = time.time() + args.timeout
    load_start = os.getloadavg()[0]
    results = {n: (registrations(args, base, n, deadline),
                   NO_CALLS if args.no_calls else calls(args, base, n, deadline)) for n in counts}
    rows: list[tuple[str, Any]] = [("REGISTER load generator", generator)]
    rows += registration_rows(counts, {n: r for n, (r, _) in results.items()})
    for label, pick in (
        ("calls completed / started / errors", lambda c: f"{c['completed']} / {c['started']} / {c['errors']}"),
        ("INVITE-to-200 p50, ms", lambda c: c["p50"]),
        ("INVITE-to-200 p99, ms", lambda c: c["p99"]),
        ("server CPU per call (sum, idle subtracted), ms", lambda c: c["cpu_ms"]),
        ("  each instance (idle included), ms", lambda c: c["each_ms"]),
        ("PostgreSQL backends' CPU per call, ms", lambda c: c["pg_ms"]),
        ("host steal, % of a CPU: phase / worst 0.5 s", lambda c: c["steal"]),
    ):
        rows += per_instance_count(label, pick, counts, {n: c for n, (_, c) in results.items()})
    rows.append(("machine load average (1 min), start / end", f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"))
    common.print_table(f"cluster: {args.clients} REGISTERs, {args.rate:g} calls/s for {args.duration:g} s "
                       f"(callees on the second instance)", rows)
    for n in counts:
        for kind, number in sorted(results[n][0]["error_kinds"].items()):
            print(f"  [{n}] registration error {kind}: {number}")
        for kind, number in sorted(results[n][1]["error_kinds"].items()):
            print(f"  [{n}] call error {kind}: {number}")
    cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
