"""Options the client commands (``echo-*``, ``join``, ``peers``) share.

``--server HOST[:PORT]`` (repeatable: a cluster's servers, tried in order), ``--user``, ``--password-stdin``, ``--ca``,
``--domain`` and ``--tls-hostname``; reading the password from stdin;
logging to stderr; running a command's ``run`` under ``task.react``, with a
deadline on its shutdown (``exit_deadline``: every command is gone within
5 s of SIGTERM, whatever the network does).

Each command keeps its own help texts and error wording (they are part of
its output), so the helpers take them as arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorCore
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from kerjostunt.client.agentconfig import Account, AgentConfig, Ports, ServerConfig, Timeouts

DEFAULT_SIGNALING_PORT = 5061
DEFAULT_WEB_PORT = 8443
DEFAULT_DOMAIN = "kerjo.local"


class UsageError(Exception):
    """Exit 2, as argparse does."""


# -- --server HOST[:PORT] ----------------------------------------------------------
#
# Two parsers on purpose: echo-* checks the address as an argparse type (a bad
# one is an argparse usage error), join and peers check it when they run and
# report it in their own words.  They also differ on a bare IPv6 address.


def server_address(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``; port 5061 by default (an argparse type)."""
    host, port = text, str(DEFAULT_SIGNALING_PORT)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"bad server address {text!r}")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bad server address {text!r} (HOST[:PORT])")
    return host, int(port)


def _port(text: str) -> int:
    # The name shows in argparse's errors ("invalid _port value"): keep it.
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def split_server(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` -> (host, signaling port)."""
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            raise UsageError(f"bad --server {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise UsageError(f"bad --server {text!r}: put an IPv6 address in brackets")
    if not host:
        raise UsageError(f"bad --server {text!r}: no host")
    try:
        port = _port(port_text) if port_text else DEFAULT_SIGNALING_PORT
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"bad --server {text!r}: bad port") from None
    return host, port


def web_url(host: str, web_port: int) -> str:
    return f"https://[{host}]:{web_port}" if ":" in host else f"https://{host}:{web_port}"


# -- the options ---------------------------------------------------------------------


def add_credentials(
    parser: argparse.ArgumentParser,
    *,
    user_help: str = "your user ID",
    password_help: str = "read the password from stdin (required)",
    ca_help: str = "CA certificate to verify the server with (the server's certs/ca.pem)",
) -> None:
    """``--user ID``, ``--password-stdin`` and ``--ca FILE``, all required."""
    parser.add_argument("--user", required=True, metavar="ID", help=user_help)
    parser.add_argument("--password-stdin", action="store_true", required=True, help=password_help)
    parser.add_argument("--ca", required=True, metavar="FILE", help=ca_help)


def add_domain(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--domain", default=DEFAULT_DOMAIN, help=help)


def add_tls_hostname(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--tls-hostname", metavar="NAME", help=help)


def add_port_mapping(parser: argparse.ArgumentParser) -> None:
    """``--no-port-mapping``: never ask the gateway (PCP, NAT-PMP, UPnP-IGD) to map the listen port."""
    parser.add_argument("--no-port-mapping", action="store_true",
                        help="do not ask the gateway (PCP, NAT-PMP, UPnP-IGD) to map the listen port")


# -- using them ----------------------------------------------------------------------


def read_password(stdin: TextIO) -> str | None:
    """The first line of ``stdin`` without its line end; None if empty."""
    return stdin.readline().rstrip("\r\n") or None


def servers_of(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Every ``--server`` given (repeatable: the servers of one cluster, tried in order)."""
    given = args.server if isinstance(args.server, list) else [args.server]
    return [server if isinstance(server, tuple) else split_server(server) for server in given]


def server_and_password(args: argparse.Namespace, stdin: TextIO) -> tuple[str, int, str]:
    """(host, signaling port, password) of the first server for join and peers; UsageError if either is bad."""
    host, port = servers_of(args)[0]
    password = read_password(stdin)
    if password is None:
        raise UsageError("no password on stdin")
    return host, port, password


def agent_config(
    args: argparse.Namespace,
    server: tuple[str, int],
    password: str,
    *,
    ports: Ports = Ports(),
    timeouts: Timeouts = Timeouts(),
) -> AgentConfig:
    """The ``PeerAgent`` config from the shared options (server, account) and the command's own.

    ``server`` is tried first; the other ``--server``s follow it in order.
    """
    host, port = server
    alternates = tuple(s for s in servers_of(args) if s != server)
    return AgentConfig(
        server=ServerConfig(host, port, domain=args.domain, ca_path=args.ca, tls_hostname=args.tls_hostname,
                            alternates=alternates),
        account=Account(args.user, password),
        ports=ports,
        timeouts=timeouts,
    )


def start_logging(verbose: bool) -> None:
    """Twisted's log to stderr: warnings and up, or everything with ``--verbose``."""
    level = LogLevel.debug if verbose else LogLevel.warn
    # Milliseconds: a connection takes a few hundred of them, and --verbose
    # is how one sees where they go.
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr, timeFormat="%H:%M:%S.%f"), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


#: seconds a command may take to shut down once its reactor stops (SIGTERM, SIGINT, or done)
STOP_DEADLINE = 4.0


def _exit_now() -> None:
    """The last resort of a shutdown that hangs: say so and leave (no cleanup can be waited for)."""
    sys.stderr.write(f"kerjostunt: did not stop within {STOP_DEADLINE:g} s; exiting\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def exit_deadline() -> None:
    """A ``before shutdown`` trigger: the process is gone ``STOP_DEADLINE`` seconds from now.

    The agent bounds each step of its own stop (``Timeouts.stop_*``); this is
    the net under everything else a shutdown can wait for (a stop trigger, a
    resolver thread the reactor's thread pool joins). A thread, not a reactor
    timer: a reactor blocked joining its threads would never run the timer.
    """
    timer = threading.Timer(STOP_DEADLINE, _exit_now)
    timer.daemon = True  # a clean exit does not wait for it
    timer.start()


def react(main: Callable[[Any], defer.Deferred[Any]]) -> NoReturn:
    """``task.react(main)`` with the exit deadline armed for whenever the reactor stops (it exits)."""

    def with_deadline(reactor: Any) -> defer.Deferred[Any]:
        IReactorCore(reactor).addSystemEventTrigger("before", "shutdown", exit_deadline)
        return main(reactor)

    task.react(with_deadline)


def react_for_exit_code(
    run: Callable[..., defer.Deferred[int]], args: argparse.Namespace, default: int
) -> int:
    """Run ``run(reactor, args, stdin, stdout, stderr)`` under ``task.react``; its result is the exit code.

    ``default`` is the code if it never produced one (the reactor stopped first).
    """
    codes: list[int] = []

    def main(reactor: Any) -> defer.Deferred[None]:
        return run(reactor, args, sys.stdin, sys.stdout, sys.stderr).addCallback(codes.append)

    try:
        react(main)
    except SystemExit:
        pass  # react always exits; the code is ours
    return codes[0] if codes else default
