#!/usr/bin/env python
"""The floor under the per-call target: server CPU per message through Twisted's TLS.

A call is about 15 SIP messages through the server (docs/performance.rst).
This measures what one message in and one out costs a Twisted server that
does nothing else: a TLS echo server (``kerjostunt.tls.server_options``, the
certificate and TLS stack ``twistd kerjostunt`` uses; ``--plain``: TCP
only), in its own process pinned to one CPU, and ``--connections`` clients
in another process (pinned to the other CPUs; stdlib ``ssl``, asyncio), each
sending a ``--size`` byte message and waiting for its echo, ``--messages``
times in all.  Prints server CPU microseconds per echoed message (one record
read, one written, with the reactor's and the kernel's share: utime + stime
of the server process).

Example: ``python bench/tls_floor.py`` and ``python bench/tls_floor.py --plain``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SERVER = r"""
import os, sys
from pathlib import Path
from twisted.internet import protocol, reactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from kerjostunt.tcp import no_delay
from kerjostunt.tls import ensure_certificates, server_options

class Echo(protocol.Protocol):
    def connectionMade(self):
        no_delay(self.transport)
    def dataReceived(self, data):
        self.transport.write(data)

factory = protocol.Factory.forProtocol(Echo)
if sys.argv[2] != "plain":
    paths = ensure_certificates(Path(sys.argv[1]), "localhost")
    factory = TLSMemoryBIOFactory(server_options(paths), False, factory)
port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
print(port.getHost().port, flush=True)
reactor.run()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=200, help="client connections (default 200)")
    p.add_argument("--messages", type=int, default=100_000, help="echoed messages in all (default 100,000)")
    p.add_argument("--size", type=int, default=600, help="bytes per message (default 600, a SIP request)")
    p.add_argument("--plain", action="store_true", help="TCP without TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="hard limit, seconds (default 300)")
    common.add_pinning_option(p)
    return p.parse_args(argv)


async def client(port: int, args: argparse.Namespace, deadline: float) -> None:
    context = None
    if not args.plain:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback, measuring the server only
    message = b"x" * args.size
    per_connection = max(1, args.messages // args.connections)

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        for _ in range(per_connection):
            if time.monotonic() > deadline:
                break
            writer.write(message)
            await reader.readexactly(len(message))
        writer.close()

    await asyncio.gather(*(one() for _ in range(args.connections)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = common.cpu_plan(args.server_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="kerjo-tlsfloor-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")])))
    with common.affinity(plan.server):
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(workdir), "plain" if args.plain else "tls"],
                                  stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        if plan.generators is not None:
            os.sched_setaffinity(0, plan.generators)
        deadline = time.monotonic() + args.timeout
        before = common.cpu_seconds(server.pid)
        began = time.monotonic()
        asyncio.run(client(port, args, deadline))
        wall = time.monotonic() - began
        used = common.cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    per_connection = max(1, args.messages // args.connections)
    messages = per_connection * args.connections
    common.print_table(
        f"server CPU per echoed message ({'TCP' if args.plain else 'TLS'})",
        [
            ("transport", "TCP" if args.plain else "TLS (kerjostunt.tls.server_options)"),
            ("CPU pinning", plan.describe()),
            ("connections (incl. connect and handshake)", args.connections),
            ("messages echoed", messages),
            ("message size, bytes", args.size),
            ("wall time, s", round(wall, 2)),
            ("server CPU, s", round(used, 2)),
            ("server core use, %", round(100 * used / wall, 1)),
            ("**server CPU per message in and out, us**", round(used / messages * 1e6, 1)),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
