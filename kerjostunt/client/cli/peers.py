"""``kerjostunt peers``: print a group's trusted peers list.

``--server HOST[:PORT]`` names the signaling server as every client command
does (the port, 5061 by default, is the signaling port and is not used
here); the list comes from ``https://HOST:WEB_PORT`` with ``--web-port``
(default 8443). The password is read from the first line of stdin, so it
never shows in the process list or the shell history.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any, TextIO

from twisted.internet import defer

from kerjostunt.client.cli.options import (  # noqa: F401 (split_server, web_url, UsageError: this module's API too)
    DEFAULT_SIGNALING_PORT,
    DEFAULT_WEB_PORT,
    UsageError,
    _port,
    add_credentials,
    react_for_exit_code,
    server_and_password,
    split_server,
    web_url,
)
from kerjostunt.client.cli.progress import Progress
from kerjostunt.client.directory import DirectoryError, PeerEntry, fetch_peers, fetch_peers_text

PROG = "kerjostunt peers"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "peers",
        help="print a group's trusted peers list",
        description="Print the members of GROUP with their 'use STUNT' flag, address and presence. "
        "The password is read from the first line of stdin.",
    )
    parser.add_argument(
        "--server",
        required=True,
        metavar="HOST[:PORT]",
        help="the signaling server (PORT is its signaling port; the list comes from --web-port); "
        "repeatable for a cluster's servers: the first one's list is printed",
        action="append",
    )
    parser.add_argument(
        "--web-port",
        type=_port,
        default=DEFAULT_WEB_PORT,
        help=f"HTTPS port of the server's web service (default {DEFAULT_WEB_PORT})",
    )
    add_credentials(parser)
    parser.add_argument(
        "--format",
        choices=("table", "json", "text"),
        default="table",
        help="output format (default table; text is the trusted peers file)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress line on stderr (loading the peers list of GROUP...)")
    parser.add_argument("group", metavar="GROUP")
    parser.set_defaults(func=run_command)


def format_table(peers: list[PeerEntry]) -> str:
    rows = [("USER", "FLAG", "ADDRESS", "ONLINE")]
    for p in peers:
        address = "-" if not p.ip or p.port is None else (f"[{p.ip}]:{p.port}" if ":" in p.ip else f"{p.ip}:{p.port}")
        address = ",".join([address, *p.addresses[1:]])  # the other IP family's too
        rows.append((p.user_id, p.use_stunt, address, "yes" if p.online else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join(
        f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip() + "\n" for row in rows
    )


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO):  # type: ignore[no-untyped-def]
    """The command with its reactor and streams passed in (tests run this under trial)."""
    try:
        host, _signaling_port, password = server_and_password(args, stdin)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=stderr)
        return 2
    base = web_url(host, args.web_port)
    progress = Progress(reactor, stderr, args.quiet)
    progress.step(f"loading the peers list of {args.group}")
    try:
        if args.format == "text":
            text = yield fetch_peers_text(reactor, base, args.group, args.user, password, args.ca, timeout=args.timeout)
            stdout.write(text)
            return 0
        peers = yield fetch_peers(reactor, base, args.group, args.user, password, args.ca, timeout=args.timeout)
    except DirectoryError as e:
        print(f"{PROG}: error: {e}", file=stderr)
        return 1
    finally:
        progress.done()
    if args.format == "json":
        stdout.write(json.dumps({"group": args.group, "peers": [asdict(p) for p in peers]}, indent=1) + "\n")
    else:
        stdout.write(format_table(peers))
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Entry point from ``kerjostunt.cli``: run the reactor for one fetch."""
    return react_for_exit_code(run, args, default=1)
