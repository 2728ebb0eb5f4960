"""``kerjostunt join``: be a member of a group with the peer manager and a line-echo app.

The command loads GROUP's trusted peers from the server's HTTPS service,
connects to every one of them (``PeerManager`` over a ``PeerAgent``), and
keeps its signaling connection only while one is missing. Each peer
connection runs a line echo: on connecting it sends ``hello from USER``;
every line received is echoed back prefixed ``echo: `` (echoes are not
echoed again, so two echo peers do not ping-pong forever).

Every peer state change, every signaling open/close and every line is one
line on stdout, flushed at once, so a supervising process (tests, the NAT
lab) can follow it::

    peer bob connected via simultaneous-open
    signaling closed (all 2 peers done)
    peers: 1 connected (bob); 1 unreachable (dave)
    signaling opened (bob dropped)

It runs until SIGTERM or SIGINT. See docs/peer-manager.rst. What it waits
for longer than a second is one line on stderr (``loading the peers list of
GROUP…``, ``registering…``, ``calling bob…``, ``punching (simultaneous
open)…``; ``-q`` silences them), by ``cli.progress.Progress``. The log goes
to stderr too: warnings and errors, or every step with ``--verbose``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Generator
from typing import Any, TextIO

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorCore, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from kerjostunt.client.agentconfig import Ports
from kerjostunt.client.cli.options import (
    DEFAULT_DOMAIN,
    DEFAULT_WEB_PORT,
    UsageError,
    _port,
    add_credentials,
    add_domain,
    add_port_mapping,
    add_tls_hostname,
    agent_config,
    react_for_exit_code,
    server_and_password,
    servers_of,
    start_logging,
    web_url,
)
from kerjostunt.client.cli.progress import Output, Progress
from kerjostunt.client.directory import (
    CertificateNotTrusted,
    DirectoryError,
    NotAMember,
    PeerEntry,
    UnknownGroup,
    WrongPassword,
    fetch_peers,
)
from kerjostunt.client.manager import (
    CONNECTED,
    CONNECTING,
    Event,
    ManagerConfig,
    PeerListLoaded,
    PeerManager,
    PeerStateChanged,
    RestartingAgent,
    SignalingChanged,
)
from kerjostunt.client.manager.watching import WatchedProtocol

PROG = "kerjostunt join"
FATAL = (WrongPassword, NotAMember, UnknownGroup, CertificateNotTrusted)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "join",
        help="connect to every trusted peer of a group and echo lines with them",
        description="Run the peer manager for GROUP with a line-echo application: connect to every "
        "trusted peer, keep the signaling connection only while one is missing, log each peer's "
        "state and each signaling open/close on stdout. Runs until SIGTERM/SIGINT. "
        "The password is read from the first line of stdin.",
    )
    parser.add_argument(
        "--server",
        required=True,
        metavar="HOST[:PORT]",
        help="the signaling server (PORT default 5061); repeat it for the servers of a cluster, tried in order",
        action="append",
    )
    parser.add_argument(
        "--web-port",
        type=_port,
        default=DEFAULT_WEB_PORT,
        help=f"HTTPS port of the trusted peers list (default {DEFAULT_WEB_PORT})",
    )
    add_credentials(parser)
    add_tls_hostname(parser, "name to expect in the server's certificate (default: HOST)")
    add_domain(parser, f"SIP domain, the digest realm (default {DEFAULT_DOMAIN})")
    parser.add_argument(
        "--refresh",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how often to reload the list (default 300)",
    )
    parser.add_argument(
        "--unreachable-retry",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="long back-off before retrying an unreachable peer (default 3600)",
    )
    parser.add_argument(
        "--listen-port",
        type=int,
        default=0,
        metavar="PORT",
        help="application port for direct connections from peers (default: any)",
    )
    add_port_mapping(parser)
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress lines on stderr (registering..., calling PEER...)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="log every step of every connection to stderr (default: warnings and errors)")
    parser.add_argument("group", metavar="GROUP")
    parser.set_defaults(func=run_command)


class EchoProtocol(LineOnlyReceiver):
    """Says hello, echoes every line back once, reports what it sees."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, user_id: str, say: Callable[[str], None]) -> None:
        self.user_id = user_id
        self.peer_id: str | None = None  # set once the manager knows who it is
        self._say = say

    def _who(self) -> str:
        if self.peer_id is not None:
            return self.peer_id
        remote = self.transport.getPeer() if self.transport is not None else None
        return f"{remote.host}:{remote.port}" if isinstance(remote, (IPv4Address, IPv6Address)) else "?"

    def connectionMade(self) -> None:
        self.sendLine(f"hello from {self.user_id}".encode())  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text.startswith("echo: "):
            self._say(f"peer {self._who()} echoed: {text[6:]}")
            return
        self._say(f"peer {self._who()} says: {text}")
        self.sendLine(b"echo: " + line.rstrip(b"\r"))  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def lineLengthExceeded(self, line: bytes) -> None:
        self._say(f"peer {self._who()} sent a line too long; closing")
        if self.transport is not None:
            self.transport.loseConnection()


class EchoFactory(Factory[EchoProtocol]):
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, user_id: str, say: Callable[[str], None]) -> None:
        self.user_id = user_id
        self.say = say

    def buildProtocol(self, addr: IAddress | None) -> EchoProtocol:
        return EchoProtocol(self.user_id, self.say)


def describe(event: Event, manager: PeerManager) -> str | None:
    """One stdout line for a manager event (None: nothing worth a line)."""
    if isinstance(event, SignalingChanged):
        line = f"signaling {'opened' if event.is_open else 'closed'} ({event.reason})"
        return line if event.is_open else f"{line}\n{tally(manager)}"
    if isinstance(event, PeerListLoaded):
        if not event.added and not event.removed:
            return None
        listed = ", ".join(event.peers) or "none"
        return f"group {manager.group}: {len(event.peers)} peers ({listed})"
    # a PeerStateChanged
    if event.new == CONNECTED:
        line = f"peer {event.peer_id} connected"
        if event.technique:
            line += f" via {event.technique}"
        return line + (" (incoming)" if event.incoming else "")
    if event.new == CONNECTING:
        return f"peer {event.peer_id} connecting" + (" through STUNT" if "STUNT" in event.detail else "")
    line = f"peer {event.peer_id} {event.new}"
    return f"{line}: {event.detail}" if event.detail else line


def tally(manager: PeerManager) -> str:
    """One line: how many peers are in each state, and which (printed when the signaling closes)."""
    by_state: dict[str, list[str]] = {}
    for pid, peer in sorted(manager.peers.items()):
        by_state.setdefault(str(peer.state), []).append(pid)
    parts = [f"{len(ids)} {state} ({', '.join(ids)})" for state, ids in sorted(by_state.items())]
    return "peers: " + ("; ".join(parts) or "none")


def show_progress(event: Event, manager: PeerManager, progress: Progress) -> None:
    """Begin or end the step an event is about: the signaling's (``registering``), a peer's call.

    Each peer's call is its own step (several run at once); a punch is
    the punching peer's step when only one peer is calling, else a step
    of its own until no peer is calling.
    """
    if isinstance(event, SignalingChanged):
        progress.end("signaling")
    elif isinstance(event, PeerStateChanged):
        if event.new == CONNECTING:
            progress.begin(("peer", event.peer_id), f"calling {event.peer_id}")
            return
        progress.end(("peer", event.peer_id))
        if not _calling(manager):
            progress.end("punch")


def _calling(manager: PeerManager) -> list[str]:
    return [pid for pid, peer in manager.peers.items() if peer.state == CONNECTING]


def _agent_progress(manager: PeerManager, progress: Progress) -> Callable[[str], None]:
    """The agent's ``on_progress`` (``punching (simultaneous open)``) as a step of the calling peer."""

    def step(text: str) -> None:
        calling = _calling(manager)
        progress.begin(("peer", calling[0]) if len(calling) == 1 else "punch", text)

    return step


def _name_connection(event: Event, manager: PeerManager) -> None:
    """Tell the echo protocol of a new connection who is on the other end."""
    if isinstance(event, PeerStateChanged) and event.new == CONNECTED:
        connection = manager.connection_of(event.peer_id)
        watched = connection.protocol if connection is not None else None
        if isinstance(watched, WatchedProtocol) and isinstance(watched.inner, EchoProtocol):
            watched.inner.peer_id = event.peer_id


@defer.inlineCallbacks
def run(
    reactor: IReactorTime,
    args: argparse.Namespace,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    stopped: defer.Deferred[None] | None = None,
) -> Generator[defer.Deferred[Any], Any, int]:
    """The command with reactor and streams passed in; runs until ``stopped`` fires.

    Without ``stopped`` it runs until the reactor shuts down (SIGTERM/SIGINT
    under ``task.react``) and stops the manager on the way out.
    """

    def stdout_gone() -> None:
        # The reader went away (``kerjostunt join | head -5``): stop, quietly.
        core = IReactorCore(reactor)
        if stopped is not None and not stopped.called:
            stopped.callback(None)
        elif core.running:
            core.stop()

    say = Output(stdout, stdout_gone).say
    progress = Progress(reactor, stderr, args.quiet)

    try:
        host, port, password = server_and_password(args, stdin)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=stderr, flush=True)
        return 2
    bases = [web_url(h, args.web_port) for h, _port in servers_of(args)]

    def directory() -> defer.Deferred[list[PeerEntry]]:
        return _directory_in_order(reactor, bases, args, password)

    first = yield _first_list(directory, args.group, progress, say, stderr)
    if first is None:
        return 1

    def directory_once_prefetched() -> defer.Deferred[list[PeerEntry]]:
        if first:
            return defer.succeed(first.pop())
        return directory()

    manager = _manager(reactor, args, (host, port), password, directory_once_prefetched, say, progress)
    say(f"joining {args.group} as {args.user}")
    manager.start()
    if stopped is None:
        stopped = defer.Deferred()
        IReactorCore(reactor).addSystemEventTrigger("before", "shutdown", lambda: _stop(manager, say, progress))
        yield stopped  # never fires: the reactor stops under us
        return 0
    yield stopped
    yield _stop(manager, say, progress)
    return 0


@defer.inlineCallbacks
def _first_list(
    directory: Callable[[], defer.Deferred[list[PeerEntry]]],
    group: str,
    progress: Progress,
    say: Callable[[str], None],
    stderr: TextIO,
) -> Generator[defer.Deferred[Any], Any, list[list[PeerEntry]] | None]:
    """One fetch first: a wrong password or group is an error to report (None), not to retry forever.

    ``[list]`` when it loaded, ``[]`` when the server could not be asked (the manager retries).
    """
    progress.step(f"loading the peers list of {group}")
    try:
        return [(yield directory())]
    except FATAL as e:
        print(f"{PROG}: error: {e}", file=stderr, flush=True)
        return None
    except DirectoryError as e:
        say(f"peers list not loaded yet: {e}")
        return []
    finally:
        progress.done()


@defer.inlineCallbacks
def _directory_in_order(reactor: IReactorTime, bases: list[str], args: argparse.Namespace,
                        password: str) -> Generator[defer.Deferred[Any], Any, list[PeerEntry]]:
    """The list from the first server that answers, in --server order (a cluster's share one database)."""
    for index, base in enumerate(bases):
        try:
            peers: list[PeerEntry] = yield fetch_peers(reactor, base, args.group, args.user, password, args.ca)
        except FATAL:
            raise
        except DirectoryError:
            if index == len(bases) - 1:
                raise
            continue
        return peers
    raise AssertionError("unreachable: at least one --server")


def _manager(
    reactor: IReactorTime,
    args: argparse.Namespace,
    server: tuple[str, int],
    password: str,
    directory: Callable[[], defer.Deferred[list[PeerEntry]]],
    say: Callable[[str], None],
    progress: Progress,
) -> PeerManager:
    """The peer manager over one fresh ``PeerAgent`` per signaling opening, saying every event."""
    from kerjostunt.client.agent import PeerAgent  # imported late: only `join` needs the agent

    def make_agent() -> PeerAgent:
        # Made when the manager opens signaling: registering starts now, until SignalingChanged.
        config = agent_config(args, server, password, ports=Ports(listen_port=args.listen_port,
                                                                  port_mapping=not args.no_port_mapping))
        agent = PeerAgent(reactor, config, accept_factory=manager.accept_factory, on_peer=manager.peer_arrived)
        agent.on_progress = _agent_progress(manager, progress)
        progress.begin("signaling", "registering")
        return agent

    def on_event(event: Event) -> None:
        _name_connection(event, manager)
        show_progress(event, manager, progress)
        line = describe(event, manager)
        if line is not None:
            say(line)

    manager = PeerManager(
        reactor,
        group=args.group,
        user_id=args.user,
        directory=directory,
        agent=RestartingAgent(make_agent),
        app_factory_for=lambda peer_id: EchoFactory(args.user, say),
        config=ManagerConfig(refresh_interval=args.refresh, unreachable_retry=args.unreachable_retry),
        on_event=on_event,
    )
    return manager


def _stop(manager: PeerManager, say: Callable[[str], None], progress: Progress) -> defer.Deferred[None]:
    progress.end_all()
    say("stopping")
    return manager.stop().addBoth(lambda _: say("stopped"))


def run_command(args: argparse.Namespace) -> int:
    """Entry point from ``kerjostunt.cli``: run until SIGTERM/SIGINT."""
    start_logging(args.verbose)
    return react_for_exit_code(run, args, default=0)
