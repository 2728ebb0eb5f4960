"""Attack a real server on loopback and print what each attack costs it (issue 13).

The server runs as its own process (``twistd -n kerjostunt``, through
``common.ServerProcess``) so ``/proc/<pid>/status`` measures only its memory.
This process runs the attackers and, during every attack, a legitimate
peer that connects and REGISTERs every half second: its connect-to-200
latency is the service the attack leaves to others.

Attacks, each bounded in count and in time (``--duration``), loopback only:

``sip-nonreader``   2 TLS signaling connections send OPTIONS and never read
``web-pipeline``    2 HTTPS connections pipeline ``GET /metrics`` and never read
``web-slowloris``   N HTTPS connections (30 per source IP) send a request one byte per 10 s
``no-tls``          N TCP connections to the signaling port that never start TLS
``stalled-hello``   N TCP connections that send the first 5 bytes of a ClientHello, then nothing
``probe-trickle``   N TCP connections from one IP to a probe port, one byte of a request every 3 s
``ping-flood``      1 TLS connection sends keepalive pings as fast as it can

Usage: ``python3 bench/abuse.py [--duration 25] [--connections 500] [--only ATTACK]``.
The table goes into docs/security.rst.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import common  # noqa: E402

SAMPLE_INTERVAL = 0.2   # RSS sampling
REGISTER_INTERVAL = 0.5  # the legitimate peer's REGISTERs
SETTLE = 3.0            # after an attack, before "after" is read


@dataclass
class Row:
    attack: str
    sent: str = ""
    rss: list[int] = field(default_factory=list)   # KiB samples during the attack
    before: int = 0
    after: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    ended: str = ""

    def cells(self) -> list[str]:
        peak = max(self.rss, default=self.before)
        lat = self.latencies
        p50 = common.percentile(lat, 50) * 1000
        worst = max(lat, default=float("nan")) * 1000
        return [
            self.attack, self.sent,
            f"{self.before / 1024:.0f} / {peak / 1024:.0f} / {self.after / 1024:.0f}",
            f"{p50:.0f} / {worst:.0f}", f"{len(lat)} / {self.failures}", self.ended,
        ]


HEADERS = ["attack", "sent", "RSS MiB before / peak / after", "REGISTER ms p50 / max", "ok / failed", "ended by"]


def rst_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    rule = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(HEADERS), rule, *(line(r) for r in rows), rule])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=25.0, help="seconds each attack may last (default 25)")
    p.add_argument("--connections", type=int, default=500, help="connections of the slowloris and no-TLS attacks")
    p.add_argument("--only", action="append", help="run only this attack (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server log)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra twistd kerjostunt option")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir, cleanup = common.make_workdir(args.keep)
    web_port = common.free_ports(1)[0]
    server = common.ServerProcess(workdir, users=1, extra_args=["--web-port", str(web_port), *args.server_arg])
    try:
        server.create_users()
        server.start()
        from twisted.internet import task

        bench = Bench(server, web_port, args)
        task.react(lambda reactor: bench.run(reactor))
    finally:
        server.stop()
        cleanup()
    return 0


class Bench:
    """Runs the attacks one after another in this process's reactor."""

    def __init__(self, server: common.ServerProcess, web_port: int, args: argparse.Namespace) -> None:
        self.server, self.web_port, self.args = server, web_port, args
        self.rows: list[Row] = []

    def run(self, reactor: Any) -> Any:
        from twisted.internet import defer

        self.reactor = reactor
        attacks: dict[str, Callable[[Row], Any]] = {
            "sip-nonreader": self.sip_nonreader,
            "web-pipeline": self.web_pipeline,
            "web-slowloris": self.web_slowloris,
            "no-tls": self.no_tls,
            "stalled-hello": self.stalled_hello,
            "probe-trickle": self.probe_trickle,
            "ping-flood": self.ping_flood,
        }

        @defer.inlineCallbacks
        def all_attacks() -> Generator[Any, Any, None]:
            for name, attack in attacks.items():
                if self.args.only and name not in self.args.only:
                    continue
                row = Row(name)
                yield self.measure(row, attack)
                self.rows.append(row)
                print(f"  {' | '.join(row.cells())}", file=sys.stderr, flush=True)
            print()
            print(rst_table([r.cells() for r in self.rows]))
            print()
            print(f"(--duration {self.args.duration:g} s per attack, --connections {self.args.connections}; "
                  f"{common.machine_facts()['cpus']} CPUs, load {__import__('os').getloadavg()[0]:.1f})")

        return all_attacks()

    # -- measuring

    def measure(self, row: Row, attack: Callable[[Row], Any]) -> Any:
        from twisted.internet import defer, task

        @defer.inlineCallbacks
        def go() -> Generator[Any, Any, None]:
            row.before = self.server.rss()
            sampler = task.LoopingCall(lambda: row.rss.append(self.server.rss()))
            sampler.clock = self.reactor
            sampler.start(SAMPLE_INTERVAL)
            stop = [False]
            legit = self.legitimate(row, stop)
            yield attack(row)
            stop[0] = True
            yield legit
            sampler.stop()
            yield task.deferLater(self.reactor, SETTLE, lambda: None)
            row.after = self.server.rss()

        return go()

    def legitimate(self, row: Row, stop: list[bool]) -> Any:
        """A real peer REGISTERs every REGISTER_INTERVAL on a fresh connection until told to stop."""
        from twisted.internet import defer, task

        from kerjostunt import tls
        from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling

        options = tls.client_options(self.server.ca, "localhost")
        uid = common.user_id(0)

        @defer.inlineCallbacks
        def loop() -> Generator[Any, Any, None]:
            while not stop[0]:
                started = time.monotonic()
                try:
                    proto = yield connect_signaling(
                        self.reactor, "127.0.0.1", self.server.port, options,
                        lambda: SignalingClientProtocol(self.reactor, uid, common.password_of(uid), common.DOMAIN),
                        timeout=10.0,
                    )
                    yield proto.register()
                    row.latencies.append(time.monotonic() - started)
                    proto.transport.loseConnection()
                except Exception:
                    row.failures += 1
                yield task.deferLater(self.reactor, REGISTER_INTERVAL, lambda: None)

        return loop()

    def until(self, lost: list[Any], row: Row, what: str) -> Any:
        """Wait for every attacker connection to end, or the duration; say which."""
        from twisted.internet import defer

        started = time.monotonic()
        everything = defer.DeferredList(lost, consumeErrors=True)
        limit: defer.Deferred[None] = defer.Deferred()
        timer = self.reactor.callLater(self.args.duration, limit.callback, None)

        def first(result: Any) -> None:
            if timer.active():
                timer.cancel()
                row.ended = f"{what} after {time.monotonic() - started:.1f} s"
            else:
                row.ended = f"still open at {self.args.duration:g} s (bench closed it)"

        either = defer.DeferredList([everything, limit], fireOnOneCallback=True, consumeErrors=True)
        return either.addCallback(first)

    # -- connecting

    def tls_connect(self, port: int, proto: Any, source: str | None = None) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        from kerjostunt import tls

        options = tls.client_options(self.server.ca, "localhost")
        bind = (source, 0) if source else None
        tcp = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, bindAddress=bind)
        return connectProtocol(wrapClientTLS(options, tcp), proto)

    def close_all(self, protos: list[Any]) -> None:
        for proto in protos:
            if proto.transport is not None and proto.connected and not proto.lost.called:
                proto.transport.abortConnection()

    # -- the attacks

    def nonreaders(self, row: Row, port: int, make: Callable[[int], bytes], count: int, what: str) -> Any:
        from twisted.internet import defer

        from tests.abusers import NonReader

        @defer.inlineCallbacks
        def go() -> Generator[Any, Any, None]:
            attackers = [NonReader(self.reactor, make, count) for _ in range(2)]
            for attacker in attackers:
                yield self.tls_connect(port, attacker)
            yield self.until([a.lost for a in attackers], row, "server closed both")
            sent = sum(a.bytes_sent for a in attackers)
            row.sent = f"2 conns, {sum(a.sent for a in attackers):,} {what} queued ({sent / 2**20:.1f} MiB)"
            self.close_all(attackers)

        return go()

    def sip_nonreader(self, row: Row) -> Any:
        from tests.abusers import options_request

        return self.nonreaders(row, self.server.port, lambda n: options_request(n, common.DOMAIN), 100_000, "OPTIONS")

    def web_pipeline(self, row: Row) -> Any:
        request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
        return self.nonreaders(row, self.web_port, lambda n: request, 250_000, "GET /metrics")

    def web_slowloris(self, row: Row) -> Any:
        from twisted.internet import defer

        from tests.abusers import Trickler

        @defer.inlineCallbacks
        def go() -> Generator[Any, Any, None]:
            request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
            protos = [Trickler(self.reactor, request, 10.0) for _ in range(self.args.connections)]
            # From enough loopback sources to stay under the web's 32 per IP.
            sources = max(1, -(-self.args.connections // 30))
            yield defer.DeferredList(
                [self.tls_connect(self.web_port, p, common.source_address(i, sources)) for i, p in enumerate(protos)],
                consumeErrors=True,
            )
            yield self.until([p.lost for p in protos], row, "server closed all")
            row.sent = f"{sum(p.shook for p in protos)} TLS conns from {sources} IPs, 1 byte / 10 s"
            self.close_all(protos)

        return go()

    def no_tls(self, row: Row) -> Any:
        return self.raw_flood(row, self.server.port, b"", "no ClientHello", "server closed all")

    def stalled_hello(self, row: Row) -> Any:
        # A TLS handshake record header: the server now holds OpenSSL state for it.
        return self.raw_flood(row, self.server.port, b"\x16\x03\x01\x02\x00", "5 bytes of a ClientHello",
                              "server closed all", interval=0.0)

    def probe_trickle(self, row: Row) -> Any:
        from kerjostunt.wire import stun

        request = stun.binding_request()[0]
        return self.raw_flood(row, self.server.probe_ports[0], request, "1 byte / 3 s of a STUN request",
                              "server closed all", sources=1, interval=3.0)

    def raw_flood(self, row: Row, port: int, data: bytes, what: str, ended: str, *,
                  sources: int | None = None, interval: float = 60.0) -> Any:
        """N plain TCP connections sending ``data`` (first byte at once, the rest one per ``interval``)."""
        from twisted.internet import defer
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from tests.abusers import RawTrickler

        count = self.args.connections
        spread = sources or common.sources_for(count, 900)  # under --max-per-ip: no eviction

        @defer.inlineCallbacks
        def go() -> Generator[Any, Any, None]:
            protos = [RawTrickler(self.reactor, data, interval) for _ in range(count)]
            connects = []
            for i, proto in enumerate(protos):
                source = (common.source_address(i, spread), 0)
                endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, bindAddress=source)
                connects.append(connectProtocol(endpoint, proto))
            results = yield defer.DeferredList(connects, consumeErrors=True)
            up = sum(1 for ok, _ in results if ok)
            yield self.until([p.lost for p in protos], row, ended)
            each = (max(row.rss, default=row.before) - row.before) / max(1, up)
            row.sent = f"{up} TCP conns from {spread} IPs, {what} (peak {each:.1f} KiB each)"
            self.close_all(protos)

        return go()

    def ping_flood(self, row: Row) -> Any:
        from twisted.internet import defer

        @defer.inlineCallbacks
        def go() -> Generator[Any, Any, None]:
            counter = _CountingPinger(self.reactor)
            yield self.tls_connect(self.server.port, counter)
            started = time.monotonic()
            yield self.until([counter.lost], row, "server closed it")
            elapsed = time.monotonic() - started
            row.sent = f"1 conn, {counter.sent:,} pings, {counter.pongs:,} answered in {elapsed:.0f} s"
            self.close_all([counter])

        return go()


def _CountingPinger(reactor: Any) -> Any:
    """A TLS connection that writes pings in batches each reactor turn and counts the pongs."""
    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import implementer

    from tests.abusers import NonReader

    @implementer(IHandshakeListener)
    class Pinger(NonReader):
        def __init__(self) -> None:
            super().__init__(reactor, lambda n: b"\r\n\r\n", 2_000_000, batch=1000)
            self.pongs = 0
            self._tail = b""

        def handshakeCompleted(self) -> None:
            self.ready.callback(self)
            reactor.callLater(0, self._more)  # reads, unlike its parent

        def dataReceived(self, data: bytes) -> None:
            self.pongs += data.count(b"\r\n")

    return Pinger()


if __name__ == "__main__":
    raise SystemExit(main())
