"""``kerjostunt netcheck --server HOST``: what your network does to peer connections.

Needs no account: it talks to the server's probe ports only (STUN Binding
over TCP, docs/probes.rst). The measuring is ``client/netcheck.py``, the
reading of it ``client/netreport.py``; this module parses the options and
prints.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Generator
from typing import Any, TextIO

from twisted.internet import defer

from kerjostunt.client.cli.options import UsageError, react_for_exit_code, split_server
from kerjostunt.client.netcheck import NetcheckConfig, netcheck
from kerjostunt.client.netreport import format_text

PROG = "kerjostunt netcheck"


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port list {text!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"bad port list {text!r}")
    return ports


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "netcheck",
        help="report what your NAT does and who can reach you directly",
        description="Probe the server's STUN-over-TCP probe ports and report your public address, "
        "your NAT's mapping and port allocation, how fast its ports move, what an unsolicited SYN "
        "meets, hairpinning, the round trip to the server, IPv6 (your global address, the server "
        "over IPv6, its round trip, what an unsolicited SYN meets there), whether your gateway grants "
        "a port mapping (PCP, NAT-PMP, UPnP-IGD; deleted again at once), and which peers can reach "
        "you directly. No account is needed.",
    )
    parser.add_argument("--server", required=True, metavar="HOST[:PORT]",
                        help="the kerjostunt server (PORT, its signaling port, is not used)")
    parser.add_argument("--probe-ports", type=_ports, default=(3478, 3479), metavar="P1,P2",
                        help="the server's probe ports (default 3478,3479)")
    parser.add_argument("--wait", type=float, default=1.0,
                        help="seconds between the timed probes that measure the port speed (default 1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe (default 5)")
    parser.add_argument("--no-port-mapping", dest="port_mapping", action="store_false",
                        help="do not ask the gateway for a port mapping")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_command)


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace, stdin: TextIO, stdout: TextIO,
        stderr: TextIO) -> Generator[defer.Deferred[Any], Any, int]:
    """The command with its reactor and streams passed in (tests run this under trial)."""
    try:
        host, _ = split_server(args.server)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=stderr)
        return 2
    try:
        server_ip = str(ipaddress.ip_address(host))
    except ValueError:
        try:
            server_ip = yield reactor.resolve(host)
        except Exception:
            print(f"{PROG}: error: cannot resolve {host}", file=stderr)
            return 1
    config = NetcheckConfig(server_ip, args.probe_ports, timeout=args.timeout, wait=args.wait,
                            port_mapping=args.port_mapping)
    report = yield netcheck(reactor, config)
    stdout.write(report.dumps() + "\n" if args.json else format_text(report))
    if not report.samples:
        print(f"{PROG}: error: no probe port of {host} answered", file=stderr)
        return 1
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Entry point from ``kerjostunt.cli``."""
    return react_for_exit_code(run, args, default=1)
