#!/usr/bin/env python
"""The server's call path alone, in one process: CPU per call without TLS, sockets or the store.

``calls.py`` measures the whole server (TLS records, sockets, the SQL
thread), which is what users get but is slow to run and noisy on a shared
machine.  This script runs the code a call goes through between the TLS
layer and the store, exactly as the server does, and nothing else: the
bytes of each message into a ``StreamParser``, the router, the
``CallManager`` and its ``Call`` machines, every outgoing message serialized
with ``to_bytes``; the store answers at once (``succeed``) and the clock is
a ``Clock``.  So a change to the SIP, SDP or call code can be measured in a
few seconds, back to back, with little noise from other processes
(``time.process_time``, best of ``--repeat`` runs).

It also reports what the lingering calls cost the garbage collector: every
call stays in the call table for ``linger`` (32) seconds after it ends, so at
200 calls/s about 6,400 ended calls are alive, and a full (generation 2)
collection walks every object they hold.

Example: ``python bench/callpath.py --calls 4000``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from twisted.internet.defer import succeed
from twisted.internet.selectreactor import SelectReactor

from kerjostunt.server.calls import CallManager
from kerjostunt.server.register import RegisterHandler
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.router import SignalingRouter
from kerjostunt.wire.sip.message import Request, Response, make_response
from kerjostunt.wire.sip.parser import SIPParseError, StreamParser

DOMAIN = common.DOMAIN


class BenchClock(SelectReactor):
    """The reactor's own timer heap (not ``Clock``, whose list is re-sorted on every ``callLater``),
    on a time that only ``advance`` moves; never run."""

    now = 1000.0

    def seconds(self) -> float:
        return self.now

    def advance(self, amount: float) -> None:
        self.now += amount
        self.runUntilCurrent()


class Store:
    """Answers at once, as if the SQL thread were infinitely fast."""

    def call_check(self, caller: str, callee: str) -> Any:
        return succeed("ok")

    def record_attempt(self, **attempt: Any) -> Any:
        return succeed({})


class Observations:
    def samples(self, user_id: str) -> list[Any]:
        return []

    def behind(self, public_ip: str) -> list[Any]:
        return []


class Conn:
    """A registered peer's connection as the server sees it: bytes in through a parser, bytes out."""

    def __init__(self, user: str, ip: str, port: int, router: SignalingRouter) -> None:
        self.peer = (ip, port)
        self.user_ids = {user}
        self.rtt = 0.002
        self.router = router
        self.parser = StreamParser()
        self.out: list[bytes] = []
        self.last: Request | Response | None = None

    def send(self, message: Request | Response) -> None:
        self.out.append(message.to_bytes())
        self.last = message

    def receive(self, data: bytes) -> None:
        for event in self.parser.feed_events(data):
            if isinstance(event, SIPParseError):
                raise RuntimeError(f"bench message refused: {event}")
            if isinstance(event, Request):
                self.router.handle_request(self, event)  # type: ignore[arg-type]
            elif isinstance(event, Response):
                self.router.handle_response(self, event)  # type: ignore[arg-type]

    def close(self) -> None:
        pass

    def bound(self, user_id: str) -> None:
        pass

    def unbound(self, user_id: str) -> None:
        pass


def sdp(user: str, host: str, port: int) -> bytes:
    lines = ["v=0", f"o={user} 0 0 IN IP4 {host}", "s=kerjostunt", f"c=IN IP4 {host}", "t=0 0",
             f"m=application {port} TCP kerjo",
             f"a=candidate:1 1 TCP 2128609279 {host} {port} typ host tcptype so",
             f"a=x-kerjo-punch-port:{port}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def request(method: str, uri: str, frm: str, to: str, call_id: str, cseq: int, branch: str,
            extra: list[str] = (), body: bytes = b"") -> bytes:  # type: ignore[assignment]
    lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/TLS 127.0.0.2:40000;branch=z9hG4bK{branch};rport",
             "Max-Forwards: 70", f"From: {frm}", f"To: {to}", f"Call-ID: {call_id}", f"CSeq: {cseq} {method}",
             *extra, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


OUTCOME = b"outcome=stunt\r\ntechnique=simultaneous-open\r\nremote=127.0.0.1:4000\r\nelapsed_ms=12\r\n"


class World:
    def __init__(self, pairs: int, outcome: str = "bye") -> None:
        self.outcome = outcome  # the caller's report: on its BYE, or an INFO and a plain BYE (the older form)
        self.clock = BenchClock()
        self.registrar = Registrar(self.clock)
        self.manager = CallManager(self.clock, DOMAIN, self.registrar, Store(), Observations())
        router = SignalingRouter(self.registrar, RegisterHandler.__new__(RegisterHandler), self.manager)
        self.pairs = []
        for i in range(pairs):
            a, b = common.user_id(i), common.user_id(pairs + i)
            ca = Conn(a, "127.0.0.2", 20000 + i, router)
            cb = Conn(b, "127.0.0.3", 30000 + i, router)
            self.registrar.bind(a, ca, f"<sips:{a}@127.0.0.2>", 36000)  # type: ignore[arg-type]
            self.registrar.bind(b, cb, f"<sips:{b}@127.0.0.3>", 36000)  # type: ignore[arg-type]
            self.pairs.append((a, b, ca, cb))
        self.n = 0

    def call(self) -> None:
        """One whole call, as bench/calls.py makes it; calls start 200 per second."""
        self.clock.advance(0.005)
        a, b, ca, cb = self.pairs[self.n % len(self.pairs)]
        self.n += 1
        cid = f"{self.n:08x}@bench"
        ua, ub = f"sips:{a}@{DOMAIN}", f"sips:{b}@{DOMAIN}"
        frm, to = f"<{ua}>;tag=ta", f"<{ub}>"
        ca.receive(request("INVITE", ub, frm, to, cid, 1, f"i{self.n}",
                           [f"Contact: <sips:{a}@127.0.0.2:20000;transport=tls>", "Content-Type: application/sdp"],
                           sdp(a, "127.0.0.2", 41000)))
        forwarded = cb.last
        assert isinstance(forwarded, Request) and forwarded.method == "INVITE", forwarded
        answer = make_response(forwarded, 200, to_tag="tb")
        answer.headers.add("Content-Type", "application/sdp")
        answer.body = sdp(b, "127.0.0.3", 42000)
        cb.receive(answer.to_bytes())
        ok = ca.last
        assert isinstance(ok, Response) and ok.code == 200, ok
        to_tagged = ok.headers.get("To") or ""
        ca.receive(request("ACK", ub, frm, to_tagged, cid, 1, f"a{self.n}"))
        if self.outcome == "info":
            ca.receive(request("INFO", f"sips:{DOMAIN}", frm, to, cid, 2, f"f{self.n}",
                               ["Content-Type: application/x-kerjo-outcome"], OUTCOME))
        else:
            ca.receive(request("BYE", ub, frm, to_tagged, cid, 2, f"b{self.n}",
                               ["Content-Type: application/x-kerjo-outcome"], OUTCOME))
        ack = cb.last
        assert isinstance(ack, Request) and ack.method == "ACK", ack
        cb.receive(request("INFO", f"sips:{DOMAIN}", f"<{ub}>;tag=tb", f"<{ua}>", ack.call_id or "", 2,
                           f"g{self.n}", ["Content-Type: application/x-kerjo-outcome"], OUTCOME))
        if self.outcome == "info":
            ca.receive(request("BYE", ub, frm, to_tagged, cid, 3, f"b{self.n}"))
        ca.out.clear()
        cb.out.clear()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4000, help="calls per run (default 4000)")
    p.add_argument("--repeat", type=int, default=5, help="runs; the best is reported (default 5)")
    p.add_argument("--pairs", type=int, default=200, help="caller/callee pairs (default 200)")
    p.add_argument("--linger", type=int, default=6400,
                   help="ended calls kept alive when timing a full collection (default 6400: 32 s at 200/s)")
    p.add_argument("--profile", metavar="FILE", type=Path, help="also write a cProfile of one run (pstats file)")
    p.add_argument("--outcome", choices=("bye", "info"), default="bye",
                   help="the caller's outcome on its BYE (default) or in an INFO before a plain BYE (older form)")
    args = p.parse_args(argv)

    world = World(args.pairs, args.outcome)
    for _ in range(200):  # warm caches
        world.call()
    best = float("inf")
    for _ in range(args.repeat):
        world.clock.advance(100)  # forget what lingers
        gc.collect()
        gc.disable()
        started = time.process_time()
        for _ in range(args.calls):
            world.call()
        best = min(best, time.process_time() - started)
        gc.enable()
    if args.profile:
        import cProfile

        world.clock.advance(100)
        cProfile.runctx("for _ in range(n): call()", {}, {"n": args.calls, "call": world.call},
                        str(args.profile))

    # What the ended calls cost the collector.
    world.clock.advance(100)
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    empty_ms = 1000 * (time.perf_counter() - started)
    base = len(gc.get_objects())
    gc.freeze()  # as a server could after start-up: what exists now is never walked again
    for _ in range(args.linger):
        world.call()
    started = time.perf_counter()
    gc.collect()
    frozen_ms = 1000 * (time.perf_counter() - started)
    gc.unfreeze()
    held = len(gc.get_objects()) - base
    started = time.perf_counter()
    gc.collect()
    full_ms = 1000 * (time.perf_counter() - started)
    lingering = len(world.manager.calls())
    common.print_table(f"call path in process: {args.calls} calls, best of {args.repeat}, outcome on "
                       f"{args.outcome.upper()}", [
        ("CPU per call, ms", 1000 * best / args.calls),
        ("lingering calls", lingering),
        ("GC-tracked objects per lingering call", held / max(1, lingering)),
        ("GC-tracked objects in the process", len(gc.get_objects())),
        ("full collection without / with them, ms", f"{empty_ms:.1f} / {full_ms:.1f}"),
        ("  the same with everything else frozen (gc.freeze), ms", frozen_ms),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
