"""``kerjostunt echo-server`` and ``kerjostunt echo-client``: the example pair.

The server registers and echoes every line a peer sends; the client connects
to a peer by user ID, sends one line and checks the echo.  Their stdout is a
small contract the NAT lab parses (docs/client.rst):

- echo-server, per peer: ``peer PEER_ID connected via TECHNIQUE from IP:PORT``
- echo-client: ``connected to PEER_ID via TECHNIQUE in N ms``, ``echo ok``;
  or ``failed: REASON`` and exit 1.  Usage errors exit 2.

Logs go to stderr (``--verbose`` for the details of every attempt).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Generator
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorCore, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from kerjostunt.client import reasons
from kerjostunt.client.agent import DEFAULT_PORT, ConnectFailed, PeerAgent, PeerConnection
from kerjostunt.client.agentconfig import Ports, Timeouts
from kerjostunt.client.cli.options import (
    DEFAULT_DOMAIN,
    add_credentials,
    add_domain,
    add_port_mapping,
    add_tls_hostname,
    agent_config,
    react,
    read_password,
    server_address,
    start_logging,
)
from kerjostunt.client.cli.progress import Output, Progress, bounded

MAX_LINE = 16 * 1024


# -- argument parsing ------------------------------------------------------------


def _number(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 if zero_ok else value > 0):  # NaN is refused too
        raise argparse.ArgumentTypeError("must not be negative" if zero_ok else "must be positive")
    return value


def non_negative(text: str) -> float:
    return _number(text, zero_ok=True)


def positive(text: str) -> float:
    return _number(text, zero_ok=False)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, type=server_address, metavar="HOST[:PORT]", action="append",
                        help=f"the STUNT server (port {DEFAULT_PORT} by default); repeat it for the servers "
                             "of a cluster, tried in order")
    add_credentials(parser, user_help="our user ID",
                    password_help="read the password from the first line of stdin",
                    ca_help="CA certificate that signed the server's (certs/ca.pem)")
    add_domain(parser, f"SIP domain (default {DEFAULT_DOMAIN})")
    add_tls_hostname(parser, "name to verify in the server certificate (default: the server host)")
    parser.add_argument("--listen-port", type=int, default=0, metavar="PORT",
                        help="local port for direct connections from peers (default: any)")
    add_port_mapping(parser)
    parser.add_argument("--punch-deadline", type=positive, default=10.0, metavar="SECONDS",
                        help="how long to punch (default 10)")
    parser.add_argument("--low-ttl", type=int, default=2, metavar="TTL",
                        help="TTL of the first punch SYN, 0 for none (default 2: our NAT is hop 1)")
    parser.add_argument("--punch-port-max-age", type=non_negative, default=30.0, metavar="SECONDS",
                        help="use a punch port probed ahead of time for at most this long, "
                             "0 to probe at call time (default 30)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every step to stderr")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress lines on stderr (registering..., calling PEER...)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server = subparsers.add_parser("echo-server", help="register and echo every line peers send")
    _common(server)
    server.set_defaults(func=run_echo_server)

    client = subparsers.add_parser("echo-client", help="connect to a peer, send a line, check the echo")
    _common(client)
    client.add_argument("peer", metavar="PEER_ID", help="the user ID to connect to")
    client.add_argument("--message", default=None, metavar="TEXT", help="the line to send")
    client.add_argument("--timeout", type=positive, default=20.0, metavar="SECONDS",
                        help="give up after this long (default 20)")
    client.set_defaults(func=run_echo_client)


def _usage_error(message: str) -> int:
    print(f"kerjostunt: error: {message}", file=sys.stderr)
    return 2


def _prepare(args: argparse.Namespace) -> tuple[int, str | None]:
    """(exit code for a usage error or 0, password)."""
    if not os.path.isfile(args.ca):
        return _usage_error(f"--ca {args.ca}: no such file"), None
    if not 0 <= args.listen_port < 65536:
        return _usage_error("--listen-port must be 0..65535"), None
    password = read_password(sys.stdin)
    if password is None:
        return _usage_error("--password-stdin: no password on stdin"), None
    return 0, password


def _agent(
    reactor: IReactorTime,
    args: argparse.Namespace,
    password: str,
    *,
    accept_factory: IProtocolFactory | None = None,
    on_peer: Callable[[PeerConnection], None] | None = None,
) -> PeerAgent:
    config = agent_config(
        args, args.server[0], password,
        ports=Ports(
            listen_port=args.listen_port, low_ttl=args.low_ttl or None, punch_port_max_age=args.punch_port_max_age,
            port_mapping=not args.no_port_mapping,
        ),
        timeouts=Timeouts(punch_deadline=args.punch_deadline,
                          connect_timeout=min(10.0, 0.8 * getattr(args, "timeout", 12.5))),
    )
    return PeerAgent(reactor, config, accept_factory=accept_factory, on_peer=on_peer)


def _stdout_gone() -> None:
    """The reader of our stdout went away (``| head``): end quietly (the agent unregisters on the way)."""
    from twisted.internet import reactor

    core = cast(IReactorCore, reactor)
    if core.running:
        core.stop()


_OUTPUT = Output(on_broken=_stdout_gone)


def _say(line: str) -> None:
    _OUTPUT.say(line)


def _failure_text(error: BaseException, peer: str | None = None, waited: float = 0.0) -> str:
    """The ``failed:`` line's reason: SIP codes as what they mean, never a repr."""
    if isinstance(error, ConnectFailed):
        return (reasons.call_failure(error.code, peer, waited) if peer is not None else None) or error.reason
    return reasons.plain(error)


def _endpoint_text(remote: tuple[str, int]) -> str:
    host, port = remote
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- echo-server -----------------------------------------------------------------


class Echo(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)  # type: ignore[no-untyped-call]  # Twisted's LineReceiver has no annotations


def run_echo_server(args: argparse.Namespace) -> int:
    code, password = _prepare(args)
    if code or password is None:
        return code
    start_logging(args.verbose)

    def on_peer(connection: PeerConnection) -> None:
        _say(f"peer {connection.peer_id} connected via {connection.technique} from {_endpoint_text(connection.remote)}")

    @defer.inlineCallbacks
    def main(reactor: IReactorTime) -> Generator[defer.Deferred[Any], Any, None]:
        agent = _agent(reactor, args, password, accept_factory=Factory.forProtocol(Echo), on_peer=on_peer)
        progress = Progress(reactor, sys.stderr, args.quiet)
        progress.step("registering")
        try:
            registration = yield agent.start()
        except Exception as e:
            progress.done()
            _say(f"failed: {_failure_text(e)}")
            raise SystemExit(1) from None
        progress.done()
        # SIGTERM/SIGINT stop the reactor; unregister before it goes.
        IReactorCore(reactor).addSystemEventTrigger("before", "shutdown", agent.stop)
        _say(f"registered as {args.user}, public address {registration.public_ip}:{registration.public_port}")
        yield defer.Deferred()  # until stopped

    react(main)  # exits, within STOP_DEADLINE of the reactor stopping


# -- echo-client -----------------------------------------------------------------


class EchoCheck(LineReceiver):
    """Sends the message when the peer connection is handed over, checks the line back."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.echoed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(self.message)  # type: ignore[no-untyped-call]  # Twisted's LineReceiver has no annotations

    def lineReceived(self, line: bytes) -> None:
        if not self.echoed.called:
            self.echoed.callback(line.rstrip(b"\r"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.echoed.called:
            self.echoed.errback(ConnectFailed("the peer closed the connection before echoing"))


class EchoCheckFactory(Factory[EchoCheck]):
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.protocols: list[EchoCheck] = []

    def buildProtocol(self, addr: IAddress | None) -> EchoCheck:
        protocol = EchoCheck(self.message)
        protocol.factory = self
        self.protocols.append(protocol)
        return protocol


def run_echo_client(args: argparse.Namespace) -> int:
    message = args.message if args.message is not None else f"hello from {args.user}"
    if "\n" in message or "\r" in message or not message:
        return _usage_error("--message must be one non-empty line")
    code, password = _prepare(args)
    if code or password is None:
        return code
    start_logging(args.verbose)

    @defer.inlineCallbacks
    def main(reactor: IReactorTime) -> Generator[defer.Deferred[Any], Any, None]:
        agent = _agent(reactor, args, password)
        progress = Progress(reactor, sys.stderr, args.quiet)
        agent.on_progress = progress.step
        deadline = reactor.seconds() + args.timeout
        exit_code = 1
        began = reactor.seconds()
        calling = False
        try:
            progress.step("registering")
            yield bounded(agent.start(), reactor, deadline - reactor.seconds(),
                          lambda: ConnectFailed(f"not registered within {args.timeout:g} s (--timeout)"))
            factory = EchoCheckFactory(message.encode("utf-8"))
            began, calling = reactor.seconds(), True
            progress.step(f"calling {args.peer}")
            connection = yield agent.connect(args.peer, factory, timeout=max(1.0, deadline - reactor.seconds()))
            progress.done()
            took_ms = (reactor.seconds() - began) * 1000.0
            _say(f"connected to {args.peer} via {connection.technique} in {took_ms:.0f} ms")
            protocol = connection.protocol
            assert isinstance(protocol, EchoCheck)
            echoed = protocol.echoed
            echoed.addTimeout(max(5.0, deadline - reactor.seconds()), reactor)
            try:
                line = yield echoed
            except defer.TimeoutError:
                raise ConnectFailed("no echo in time") from None
            if line != message.encode("utf-8"):
                raise ConnectFailed(f"echo differs: sent {message!r}, got {line.decode('utf-8', 'replace')!r}")
            _say("echo ok")
            assert protocol.transport is not None
            protocol.transport.loseConnection()
            exit_code = 0
        except Exception as e:
            progress.done()
            _say(f"failed: {_failure_text(e, args.peer if calling else None, reactor.seconds() - began)}")
        try:
            yield bounded(agent.stop(), reactor, 5.0, lambda: ConnectFailed("stop timed out"))
        except Exception:
            pass
        raise SystemExit(exit_code)

    react(main)  # exits, within STOP_DEADLINE of the reactor stopping
