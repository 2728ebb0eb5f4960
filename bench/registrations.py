#!/usr/bin/env python
"""How many TLS peers one server registers per second, at what CPU, and what holding them costs.

Starts the real server (``twistd -n kerjostunt``) in a temporary directory
with ``--clients`` users created beforehand in bulk, then ``--workers``
load-generator processes open TLS connections (the server certificate is
verified against the generated CA), REGISTER with digest authentication
(401, then 200) and stay registered for ``--hold`` seconds, answering the
server's keepalive pings and sending their own every ``--keepalive`` seconds.

Reports registrations per second, server CPU milliseconds per registration
(utime+stime of the server process over the registration phase, TLS
handshakes and the SQL thread included), server RSS per held connection
((RSS held - RSS idle) / N) and errors, as a table.

Example: ``python bench/registrations.py --clients 15000 --workers 4``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2000, help="registered TLS peers to hold (up to 15000; default 2000)")
    p.add_argument("--workers", type=int, default=0,
                   help="load-generator processes (default: one per 4000 clients, at least 2)")
    p.add_argument("--window", type=int, default=32,
                   help="registrations in flight per worker (default 32)")
    p.add_argument("--sources", type=int, default=0,
                   help="client source addresses 127.0.0.2.. (default: one per 900 clients)")
    p.add_argument("--max-per-ip", type=int, default=1000, help="server --max-per-ip (default 1000, the server's)")
    p.add_argument("--hold", type=float, default=20.0, help="seconds to hold every peer registered (default 20)")
    p.add_argument("--keepalive", type=float, default=15.0,
                   help="seconds between each client's own CRLFCRLF pings while holding (default 15)")
    p.add_argument("--warmup", type=int, default=20,
                   help="registrations made and closed before measuring the idle RSS (default 20)")
    p.add_argument("--tls-only", action="store_true",
                   help="only connect and finish the TLS handshake, no REGISTER: the TLS floor of the CPU cost")
    p.add_argument("--generator", choices=("twisted", "lean"), default="twisted",
                   help="load generator: this script's Twisted workers (default) or leanreg.py's "
                        "(pyOpenSSL and selectors, a fraction of the CPU per registration)")
    p.add_argument("--timeout", type=float, default=900.0, help="hard limit on the whole run, seconds (default 900)")
    common.add_run_options(p, "the registration phase")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 15000:
        p.error("--clients must be 1..15000")
    if args.workers <= 0:
        args.workers = max(2, math.ceil(args.clients / 4000))
    if args.generator == "lean" and args.tls_only:
        p.error("--tls-only needs the Twisted workers")
    if args.sources <= 0:
        args.sources = common.sources_for(args.clients + args.warmup)
    if math.ceil(args.clients / args.workers) > 15000:
        p.error("too many clients per worker (a process may open at most 20,000 files)")
    return args


# -- coordinator ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    workdir, cleanup = common.make_workdir(args.keep)
    load_start = os.getloadavg()[0]
    server = common.ServerProcess(workdir, users=args.clients + args.warmup, max_per_ip=args.max_per_ip,
                                  extra_args=list(args.server_arg))
    workers: common.Workers | None = None
    spy: common.PySpy | None = None
    started = time.time()
    deadline = started + args.timeout
    try:
        created = server.create_users()
        print(f"created {server.users} users in {created:.1f} s; starting server in {workdir}", file=sys.stderr)
        server.start()
        configs = [
            {
                "host": "127.0.0.1", "port": server.port, "ca": str(server.ca), "indices": [r.start, r.stop],
                "warmup_from": args.clients, "sources": args.sources, "window": args.window,
                "keepalive": args.keepalive, "deadline": deadline, "tls_only": args.tls_only,
            }
            for r in common.split(args.clients, args.workers)
        ]
        script = Path(__file__).resolve()
        workers = common.Workers(script.with_name("leanreg.py") if args.generator == "lean" else script, configs,
                                 workdir)
        workers.collect("ready", timeout=60)
        if args.warmup:
            workers.send(0, f"warmup {args.warmup}")
            workers.collect("warm", count=1, timeout=120)
        server.wait_quiet()
        time.sleep(1.0)
        rss_idle, fds_idle = server.rss(), common.open_fds(server.pid)
        if args.py_spy:
            spy = common.PySpy(server.pid, args.py_spy, native=args.py_spy_native, rate=args.py_spy_rate)
        cpu0, threads0, t0, gen0 = server.cpu(), server.threads_cpu(), time.time(), workers.cpu()
        workers.broadcast("go")
        reports = workers.collect("registered", timeout=max(60.0, deadline - time.time() - 30))
        t_registered, gen1 = time.time(), workers.cpu()
        server.wait_quiet()
        cpu1, threads1, t1 = server.cpu(), server.threads_cpu(), time.time()
        if spy is not None:
            spy.stop()
        rss_registered, fds_registered = server.rss(), common.open_fds(server.pid)

        workers.broadcast("hold")
        rss_max = rss_registered
        hold_end = time.time() + args.hold
        while time.time() < hold_end:
            time.sleep(min(1.0, max(0.0, hold_end - time.time())))
            rss_max = max(rss_max, server.rss())
        cpu2, t2 = server.cpu(), time.time()
        rss_held, fds_held = server.rss(), common.open_fds(server.pid)
        workers.broadcast("stop")
        done = workers.collect("done", timeout=60)
    finally:
        common.shut_down(server, workers, spy)

    ok = sum(r["ok"] for r in reports)
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    for r in done:
        errors.update({f"hold: {k}": v for k, v in r["errors"].items()})
    latencies = [x for r in reports for x in r["latencies"]]
    first = min(r["first_start"] for r in reports if r["first_start"])
    last = max(r["last_end"] for r in reports if r["last_end"])
    span = max(1e-9, last - first)
    cpu_reg = cpu1 - cpu0
    held = sum(r["held"] for r in done)
    pings = sum(r["pings"] for r in done)
    pongs = sum(r["pongs"] for r in done)
    rows: list[tuple[str, Any]] = [
        ("clients (TLS peers)", args.clients),
        ("load-generator processes", args.workers),
        ("client source addresses", args.sources),
        ("registered (401 then 200)" if not args.tls_only else "TLS handshakes only (no REGISTER)", ok),
        ("errors", sum(errors.values())),
        ("registration phase, s", span),
        ("registrations per second", ok / span),
        ("connect-to-200 p50, ms", common.percentile(latencies, 50)),
        ("connect-to-200 p99, ms", common.percentile(latencies, 99)),
        ("connect-to-200 max, ms", max(latencies) if latencies else float("nan")),
        ("server CPU, registration phase, s", cpu_reg),
        ("server CPU per registration, ms", 1000 * cpu_reg / max(1, ok)),
        ("  of which reactor thread, ms", 1000 * (threads1[0] - threads0[0]) / max(1, ok)),
        ("  of which SQL thread(s), ms", 1000 * (threads1[1] - threads0[1]) / max(1, ok)),
        (f"load generators' CPU per registration ({args.generator}), ms", 1000 * (gen1 - gen0) / max(1, ok)),
        ("server core use while registering, %", 100 * cpu_reg / max(1e-9, t1 - t0)),
        ("server RSS idle, MiB", rss_idle / 1024),
        ("server RSS all registered, MiB", rss_registered / 1024),
        ("server RSS end of hold, MiB", rss_held / 1024),
        ("server open files held", fds_held),
        ("server RSS per held peer, KiB", (max(rss_held, rss_registered) - rss_idle) / max(1, held or ok)),
        ("hold, s", t2 - t1),
        ("peers still registered at end of hold", held),
        ("client keepalive pings / pongs", f"{pings:,} / {pongs:,}"),
        ("server CPU while holding, % of a core", 100 * (cpu2 - cpu1) / max(1e-9, t2 - t1)),
    ]
    common.report(args, f"registrations: {args.clients} TLS peers, {args.workers} workers", rows, errors, load_start,
                  fds={"idle": fds_idle, "registered": fds_registered, "held": fds_held},
                  rss_kib={"idle": rss_idle, "registered": rss_registered, "held": rss_held, "max": rss_max},
                  wait_after_registered_s=t1 - t_registered)
    cleanup()
    return 0 if ok == args.clients and not errors else 1


# -- worker -----------------------------------------------------------------------


def worker(config: dict[str, Any]) -> int:
    rt = common.worker_runtime()
    reactor = rt.reactor
    connector = rt.Connector(config["host"], config["port"], config["ca"])
    sources = config["sources"]

    class Run:
        def __init__(self) -> None:
            self.clients: list[Any] = []
            self.todo: list[Any] = []
            self.inflight = 0
            self.tally = common.RegistrationTally()
            self.hold_errors: Counter[str] = Counter()
            self.phase = "idle"  # warmup, register, hold, stopping
            self.finished: set[Any] = set()
            self.done_event = "registered"

        # commands
        def command(self, line: str) -> None:
            word, _, rest = line.partition(" ")
            if word == "warmup":
                start = config["warmup_from"]
                self.start([rt.LoadClient(self, common.user_id(i), common.source_address(i, sources))
                            for i in range(start, start + int(rest))], "warm")
            elif word == "go":
                lo, hi = config["indices"]
                self.start([rt.LoadClient(self, common.user_id(i), common.source_address(i, sources))
                            for i in range(lo, hi)], "registered")
            elif word == "hold":
                self.phase = "hold"
                interval = config["keepalive"]
                for client in self.clients:
                    reactor.callLater(random.uniform(0, interval), self.keepalive, client, interval)
            elif word == "stop" and self.phase != "stopping":
                self.phase = "stopping"
                held = sum(1 for c in self.clients if c.registered and not c.closed)
                common.emit({"event": "done", "held": held, "errors": dict(self.hold_errors),
                             "pings": sum(c.pings for c in self.clients),
                             "pongs": sum(c.pongs for c in self.clients)})
                for client in self.clients:
                    if not client.closed and client.transport is not None:
                        client.transport.abortConnection()
                reactor.callLater(0.5, reactor.stop)

        def start(self, clients: list[Any], event: str) -> None:
            self.phase = "warmup" if event == "warm" else "register"
            self.done_event = event
            self.clients, self.todo = clients, list(reversed(clients))
            self.tally, self.finished = common.RegistrationTally(), set()
            self.pump()

        def pump(self) -> None:
            while self.inflight < config["window"] and self.todo:
                client = self.todo.pop()
                self.inflight += 1
                connector.connect(client)
                self.tally.started(client.connect_started)
            if not self.todo and self.inflight == 0 and self.phase in ("warmup", "register"):
                self.report()

        def report(self) -> None:
            if self.phase == "warmup":
                for client in self.clients:
                    if client.transport is not None and not client.closed:
                        client.transport.loseConnection()
                self.phase = "idle"
                self.tally.report(warmup=True)
                return
            self.phase = "registered"
            self.tally.report(warmup=False)

        def finish(self, client: Any, error: str | None) -> None:
            if client in self.finished:
                return
            self.finished.add(client)
            if error is None:
                client.registered = True
                self.tally.succeeded(client.connect_started)
            else:
                self.tally.failed(error)
            self.inflight -= 1
            self.pump()

        # LoadClient callbacks
        def secured(self, client: Any) -> None:
            if config["tls_only"] and self.phase == "register":
                self.finish(client, None)
            else:
                client.register(self.registered)

        def registered(self, client: Any, response: Any) -> None:
            self.finish(client, None if response.code == 200 else f"REGISTER {response.code}")

        def request(self, client: Any, request: Any) -> None:
            if request.method != "ACK":
                client.respond(request, 501)

        def error(self, client: Any, what: str) -> None:
            if client.registered:
                self.hold_errors[what] += 1
            else:
                self.finish(client, what)

        def connect_failed(self, client: Any, reason: Any) -> None:
            self.finish(client, f"connect: {reason.type.__name__}")

        def lost(self, client: Any, reason: Any) -> None:
            if client.registered:
                if self.phase in ("registered", "hold"):
                    self.hold_errors["connection lost"] += 1
            elif self.phase != "stopping":
                self.finish(client, f"lost before 200: {reason.type.__name__}")

        def keepalive(self, client: Any, interval: float) -> None:
            if self.phase == "hold" and not client.closed:
                client.ping()
                reactor.callLater(interval, self.keepalive, client, interval)

    run = Run()
    reactor.callWhenRunning(common.emit, {"event": "ready"})
    rt.run_worker(run.command, config["deadline"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
