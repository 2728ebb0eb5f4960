#!/usr/bin/env python
"""Calls at a fixed rate: INVITE-to-200 latency and server CPU per call.

Starts the real server (``twistd -n kerjostunt``) in a temporary directory,
registers ``--pairs`` caller/callee pairs (TLS, digest) from ``--workers``
load-generator processes, then starts calls at ``--rate`` calls per second
for ``--duration`` seconds (open loop: a call starts on schedule on a pair
that is not in a call; when every pair of a worker is busy the call is
counted as skipped).  Each call is the whole signaling exchange of
docs/protocol.rst:

caller: INVITE (SDP) -> 200 (SDP + predictions; a 100 before it only when the answer
takes over 0.2 s) -> ACK -> BYE (outcome) -> 200;
callee: INVITE -> 200 (SDP) -> ACK (X-Kerjo-Dial-In) -> INFO (outcome) -> 200.

``--outcome info`` makes the callers send the older form, INFO (outcome) ->
200 -> BYE -> 200: two messages more per call, for comparison.

The callees answer at once with a valid SDP and do not probe (the server
then predicts from the signaling address).  Reports INVITE-to-200 latency
as the caller sees it (p50, p99, max), server CPU milliseconds per call
(utime+stime of the server over the call phase, SQL thread and the stored
traversal attempts included) and errors, as a table.

Example: ``python bench/calls.py --rate 200 --duration 20``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import inside


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=200.0, help="calls started per second (default 200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of calls (default 20)")
    p.add_argument("--pairs", type=int, default=200,
                   help="caller/callee pairs (default 200; a caller may start at most 5 calls/s)")
    p.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--window", type=int, default=32, help="registrations in flight per worker (default 32)")
    p.add_argument("--timeout", type=float, default=600.0, help="hard limit on the whole run, seconds (default 600)")
    add_outcome_option(p)
    common.add_pinning_option(p)
    common.add_run_options(p, "the call phase")
    common.add_inside_option(p, "the call phase")
    args = p.parse_args(argv)
    if args.pairs < args.workers or args.rate <= 0 or args.duration <= 0:
        p.error("need --pairs >= --workers, --rate > 0 and --duration > 0")
    if args.rate / args.pairs > 4.0:
        p.error("more than 4 calls/s per caller would hit the server's INVITE limit (5/s): raise --pairs")
    return args


# -- coordinator ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    workdir, cleanup = common.make_workdir(args.keep)
    load_start = os.getloadavg()[0]
    clients = 2 * args.pairs
    plan = common.cpu_plan(args.server_cpu)
    server = common.ServerProcess(workdir, users=clients, extra_args=list(args.server_arg), cpus=plan.server,
                                  inside=list(args.inside))
    workers: common.Workers | None = None
    spy: common.PySpy | None = None
    deadline = time.time() + args.timeout
    try:
        server.create_users()
        server.start()
        sources = common.sources_for(clients)
        configs = [
            {
                "host": "127.0.0.1", "port": server.port, "ca": str(server.ca), "pairs": [r.start, r.stop],
                "total_pairs": args.pairs, "sources": sources, "window": args.window,
                "rate": args.rate / args.workers, "duration": args.duration, "deadline": deadline,
                "outcome": args.outcome,
            }
            for r in common.split(args.pairs, args.workers)
        ]
        workers = common.Workers(Path(__file__).resolve(), configs, workdir, cpus=plan.generators)
        workers.collect("ready", timeout=60)
        workers.broadcast("register")
        registered = workers.collect("registered", timeout=300)
        failed = sum(sum(r["errors"].values()) for r in registered)
        if failed:
            raise RuntimeError(f"{failed} registrations failed: {[r['errors'] for r in registered]}")
        server.wait_quiet()
        time.sleep(1.0)
        # Idle cost of the registered peers (server keepalive pings), to subtract.
        idle_c0, idle_t0 = server.cpu(), time.time()
        time.sleep(2.0)
        idle_rate = (server.cpu() - idle_c0) / (time.time() - idle_t0)
        if args.py_spy:
            with common.affinity(plan.generators):
                spy = common.PySpy(server.pid, args.py_spy, native=args.py_spy_native, rate=args.py_spy_rate)
        cpu0, threads0, gen0, t0 = server.cpu(), server.threads_cpu(), workers.cpu(), time.time()
        kernel0 = server.kernel_cpu()
        server.inside_restart()
        start_at = t0 + 0.5
        workers.broadcast(f"calls {start_at}")
        reports = workers.collect("calls-done", timeout=args.duration + 120)
        gen_use = (workers.cpu() - gen0) / max(1e-9, time.time() - t0)
        server.wait_quiet()
        cpu1, threads1, t1 = server.cpu(), server.threads_cpu(), time.time()
        kernel_ms = 1000 * (server.kernel_cpu() - kernel0)
        if spy is not None:
            spy.stop()
            spy = None
        attempts = count_attempts(server.db_url)
    finally:
        common.shut_down(server, workers, spy)

    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    latencies = [x for r in reports for x in r["latencies"]]
    started = sum(r["started"] for r in reports)
    completed = sum(r["completed"] for r in reports)
    skipped = sum(r["skipped"] for r in reports)
    span = max(r["last_start"] for r in reports) - min(r["first_start"] for r in reports)
    cpu_calls = max(0.0, (cpu1 - cpu0) - idle_rate * (t1 - t0))
    reactor_ms = 1000 * (threads1[0] - threads0[0]) / max(1, completed)
    sql_ms = 1000 * (threads1[1] - threads0[1]) / max(1, completed)
    rows: list[tuple[str, Any]] = [
        ("pairs (registered TLS peers)", f"{args.pairs} ({clients})"),
        ("load-generator processes", args.workers),
        ("CPU pinning", plan.describe()),
        ("caller's outcome on", args.outcome.upper()),
        ("target rate, calls/s", args.rate),
        ("calls started", started),
        ("achieved start rate, calls/s", started / max(1e-9, span) if started > 1 else float("nan")),
        ("calls skipped (all pairs busy)", skipped),
        ("calls completed (through BYE 200)", completed),
        ("traversal attempts stored", attempts),
        ("errors", sum(errors.values())),
        ("INVITE-to-200 p50, ms", common.percentile(latencies, 50)),
        ("INVITE-to-200 p99, ms", common.percentile(latencies, 99)),
        ("INVITE-to-200 max, ms", max(latencies) if latencies else float("nan")),
        ("  calls that heard a 100 Trying (answer over 0.2 s)", sum(len(r["to_trying"]) for r in reports)),
        ("  INVITE to callee p50 / p99, ms", pair_of(reports, "to_callee")),
        ("  callee's 200 to caller p50 / p99, ms", pair_of(reports, "answer_back")),
        ("server CPU per call, ms", 1000 * cpu_calls / max(1, completed)),
        ("  of which reactor thread, ms", reactor_ms),
        ("  of which SQL thread(s), ms", sql_ms),
        ("  of which in the kernel (stime), ms", kernel_ms / max(1, completed)),
        ("server core use during calls, %", 100 * (cpu1 - cpu0) / max(1e-9, t1 - t0)),
        ("load generators' core use during calls, %", 100 * gen_use),
    ]
    if args.inside:
        rows += inside.rows(server.inside_path, completed, "call")
    common.report(args, f"calls: {args.rate:g} calls/s for {args.duration:g} s, {args.pairs} pairs", rows, errors,
                  load_start, idle_cpu_rate=idle_rate,
                  samples_ms={key: [x for r in reports for x in r[key]]
                              for key in ("latencies", "to_trying", "to_callee", "answer_back")})
    cleanup()
    return 0 if completed == started and not errors else 1


def add_outcome_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outcome", choices=("bye", "info"), default="bye",
                   help="the caller's outcome on its BYE (default) or in an INFO before a plain BYE (the older form)")


def pair_of(reports: list[dict[str, Any]], key: str) -> str:
    values = [x for r in reports for x in r[key]]
    return f"{common.percentile(values, 50):.1f} / {common.percentile(values, 99):.1f}"


def count_attempts(db_url: str) -> int:
    from sqlalchemy import create_engine, func, select

    from kerjostunt.store.models import Attempt

    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(Attempt)).scalar() or 0)
    finally:
        engine.dispose()


# -- worker -----------------------------------------------------------------------


def sdp(user: str, host: str, punch_port: int) -> bytes:
    """A client offer/answer per docs/protocol.rst: one ``host so`` punch candidate."""
    lines = [
        "v=0", f"o={user} 0 0 IN IP4 {host}", "s=kerjostunt", f"c=IN IP4 {host}", "t=0 0",
        f"m=application {punch_port} TCP kerjo",
        f"a=candidate:1 1 TCP 2128609279 {host} {punch_port} typ host tcptype so",
        f"a=x-kerjo-punch-port:{punch_port}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def outcome(remote_port: int) -> bytes:
    return (f"outcome=stunt\r\ntechnique=simultaneous-open\r\nremote=127.0.0.1:{remote_port}\r\n"
            "elapsed_ms=12\r\n").encode()


OUTCOME_TYPE = ("Content-Type", "application/x-kerjo-outcome")


def worker(config: dict[str, Any]) -> int:
    import secrets
    from random import Random

    from kerjostunt.wire.sip.headers import parse_name_addr

    rt = common.worker_runtime()
    reactor = rt.reactor
    connector = rt.Connector(config["host"], config["port"], config["ca"])
    # bench/cluster.py: callees on another instance of the cluster, so every call crosses instances
    callee_connector = rt.Connector(config["host"], config.get("callee_port", config["port"]), config["ca"])
    lo, hi = config["pairs"]
    total_pairs, sources = config["total_pairs"], config["sources"]
    rng = Random(lo)

    class Pair:
        def __init__(self, index: int) -> None:
            # caller i, callee total_pairs + i: both in this worker
            self.caller_id = common.user_id(index)
            self.callee_id = common.user_id(total_pairs + index)
            self.caller = rt.LoadClient(run, self.caller_id, common.source_address(index, sources))
            self.callee = rt.LoadClient(run, self.callee_id, common.source_address(total_pairs + index, sources))
            self.busy = False

    class Run:
        def __init__(self) -> None:
            self.pairs: list[Pair] = []
            self.todo: list[Any] = []
            self.inflight = 0
            self.reg_ok = 0
            self.errors: Counter[str] = Counter()
            self.phase = "idle"
            self.latencies: list[float] = []
            self.started = self.completed = self.skipped = 0
            self.first_start = self.last_start = 0.0
            self.live_calls = 0
            # where the INVITE-to-200 time goes (ms): to the callee, callee's 200 to the caller (and the
            # 100 Trying's, sent only when the answer is slow)
            self.to_trying: list[float] = []
            self.to_callee: list[float] = []
            self.answer_back: list[float] = []
            self.invite_sent: dict[str, float] = {}  # callee user ID -> when its caller sent the INVITE
            self.answer_sent: dict[str, float] = {}  # callee user ID -> when it sent its 200
            self.schedule_done = False
            self.finished: set[Any] = set()

        # commands
        def command(self, line: str) -> None:
            word, _, rest = line.partition(" ")
            if word == "register":
                self.phase = "register"
                self.pairs = [Pair(i) for i in range(lo, hi)]
                self.todo = [c for p in self.pairs for c in (p.callee, p.caller)]
                self.todo.reverse()
                self.pump()
            elif word == "calls":
                self.phase = "calls"
                delay = max(0.0, float(rest) - time.time())
                reactor.callLater(delay, self.schedule)
            elif word == "stop" and self.phase != "stopping":
                self.phase = "stopping"
                for p in self.pairs:
                    for c in (p.caller, p.callee):
                        if not c.closed and c.transport is not None:
                            c.transport.abortConnection()
                reactor.callLater(0.5, reactor.stop)

        # registration
        def pump(self) -> None:
            while self.inflight < config["window"] and self.todo:
                self.inflight += 1
                client = self.todo.pop()
                callee = int(client.user_id[1:]) >= total_pairs  # user IDs are b00000.. (common.user_id)
                (callee_connector if callee else connector).connect(client)
            if not self.todo and self.inflight == 0 and self.phase == "register":
                self.phase = "registered"
                common.emit({"event": "registered", "ok": self.reg_ok, "errors": dict(self.errors)})

        def reg_finish(self, client: Any, error: str | None) -> None:
            if client in self.finished:
                return
            self.finished.add(client)
            if error is None:
                client.registered = True
                self.reg_ok += 1
            else:
                self.errors[f"register: {error}"] += 1
            self.inflight -= 1
            self.pump()

        def secured(self, client: Any) -> None:
            client.register(lambda c, r: self.reg_finish(c, None if r.code == 200 else f"REGISTER {r.code}"))

        def connect_failed(self, client: Any, reason: Any) -> None:
            self.reg_finish(client, f"connect: {reason.type.__name__}")

        def lost(self, client: Any, reason: Any) -> None:
            if self.phase == "stopping":
                return
            if client.registered:
                self.errors["connection lost"] += 1
            else:
                self.reg_finish(client, f"lost: {reason.type.__name__}")

        def error(self, client: Any, what: str) -> None:
            if not client.registered:
                self.reg_finish(client, what)
            else:
                self.errors[what] += 1

        # the call schedule: open loop at a fixed rate
        def schedule(self) -> None:
            rate, duration = config["rate"], config["duration"]
            total = int(rate * duration)
            t0 = time.time()
            free = list(self.pairs)
            rng.shuffle(free)
            state = {"next": 0}

            def tick() -> None:
                now = time.time()
                while state["next"] < total and t0 + state["next"] / rate <= now:
                    state["next"] += 1
                    pair = next((p for p in self.pairs_rr() if not p.busy), None)
                    if pair is None:
                        self.skipped += 1
                    else:
                        self.start_call(pair)
                if state["next"] < total:
                    reactor.callLater(max(0.0, t0 + state["next"] / rate - time.time()), tick)
                else:
                    self.schedule_done = True
                    self.maybe_done()

            self._rr = 0
            tick()

        def pairs_rr(self) -> Any:
            n = len(self.pairs)
            for _k in range(n):
                self._rr = (self._rr + 1) % n
                yield self.pairs[self._rr]

        def start_call(self, pair: Pair) -> None:
            pair.busy = True
            self.started += 1
            self.live_calls += 1
            caller = pair.caller
            call_id = secrets.token_hex(10) + "@bench"
            invite = caller.build(
                "INVITE", caller.uri_of(pair.callee_id), caller.uri_of(pair.callee_id), call_id,
                [("Contact", f"<sips:{caller.user_id}@{caller.local[0]}:{caller.local[1]};transport=tls>"),
                 ("Content-Type", "application/sdp")],
                sdp(caller.user_id, caller.local[0], 40000 + caller.local[1] % 20000),
            )
            sent = time.perf_counter()
            now = time.time()
            self.first_start = self.first_start or now
            self.last_start = now

            def trying(response: Any) -> None:
                if response.code == 100:
                    self.to_trying.append(1000 * (time.perf_counter() - sent))

            def answered(response: Any) -> None:
                if response.code != 200:
                    self.fail(pair, f"INVITE {response.code}")
                    return
                now = time.perf_counter()
                self.latencies.append(1000 * (now - sent))
                if pair.callee_id in self.answer_sent:
                    self.answer_back.append(1000 * (now - self.answer_sent.pop(pair.callee_id)))
                to_tag = parse_name_addr(response.headers.get("To") or "").tag
                cseq = int((invite.headers.get("CSeq") or "1").split()[0])
                caller.send(caller.build("ACK", caller.uri_of(pair.callee_id), caller.uri_of(pair.callee_id), call_id,
                                         cseq=cseq, to_tag=to_tag), None)
                if config.get("outcome", "bye") == "bye":  # one request: the outcome rides on the BYE
                    caller.send(caller.build("BYE", caller.uri_of(pair.callee_id), caller.uri_of(pair.callee_id),
                                             call_id, [OUTCOME_TYPE], outcome(pair.callee.local[1])), ended)
                    return
                info = caller.build("INFO", f"sips:{common.DOMAIN}", caller.uri_of(pair.callee_id), call_id,
                                    [OUTCOME_TYPE], outcome(pair.callee.local[1]))
                caller.send(info, reported)

            def reported(response: Any) -> None:
                if response.code != 200:
                    self.errors[f"caller INFO {response.code}"] += 1
                caller.send(caller.build("BYE", caller.uri_of(pair.callee_id), caller.uri_of(pair.callee_id), call_id),
                            ended)

            def ended(response: Any) -> None:
                if response.code != 200:
                    self.fail(pair, f"BYE {response.code}")
                    return
                self.completed += 1
                self.release(pair)

            self.invite_sent[pair.callee_id] = sent
            caller.send(invite, answered, timeout=20.0, on_provisional=trying)
            pair.timer = reactor.callLater(30.0, self.stuck, pair)

        def stuck(self, pair: Pair) -> None:
            if pair.busy:
                self.fail(pair, "call not finished in 30 s")

        def fail(self, pair: Pair, why: str) -> None:
            self.errors[why] += 1
            self.release(pair)

        def release(self, pair: Pair) -> None:
            if not pair.busy:
                return
            pair.busy = False
            if pair.timer.active():
                pair.timer.cancel()
            self.live_calls -= 1
            self.maybe_done()

        def maybe_done(self) -> None:
            if self.schedule_done and self.live_calls == 0 and self.phase == "calls":
                self.phase = "reported"
                common.emit({"event": "calls-done", "latencies": [round(x, 3) for x in self.latencies],
                             "to_trying": self.to_trying, "to_callee": self.to_callee,
                             "answer_back": self.answer_back,
                             "started": self.started, "completed": self.completed, "skipped": self.skipped,
                             "errors": dict(self.errors), "first_start": self.first_start,
                             "last_start": self.last_start})

        # requests from the server (to callees, mostly)
        def request(self, client: Any, request: Any) -> None:
            method = request.method
            if method == "INVITE":
                now = time.perf_counter()
                if client.user_id in self.invite_sent:
                    self.to_callee.append(1000 * (now - self.invite_sent.pop(client.user_id)))
                self.answer_sent[client.user_id] = now
                client.respond(request, 200, [("Content-Type", "application/sdp")],
                               sdp(client.user_id, client.local[0], 40000 + client.local[1] % 20000),
                               to_tag=client.tag)
            elif method == "ACK":
                if request.headers.get("X-Kerjo-Dial-In") is None:
                    self.errors["callee ACK without X-Kerjo-Dial-In"] += 1
                caller_id = parse_name_addr(request.headers.get("From") or "").uri.user or ""
                info = client.build("INFO", f"sips:{common.DOMAIN}", client.uri_of(caller_id),
                                    request.headers.get("Call-ID") or "", [OUTCOME_TYPE], outcome(1))

                def callee_reported(response: Any) -> None:
                    if response.code != 200:
                        self.errors[f"callee INFO {response.code}"] += 1

                client.send(info, callee_reported)
            elif method in ("BYE", "CANCEL"):
                client.respond(request, 200)
            else:
                client.respond(request, 501)

    run = Run()
    reactor.callWhenRunning(common.emit, {"event": "ready"})
    rt.run_worker(run.command, config["deadline"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
