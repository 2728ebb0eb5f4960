"""Listening with ``SO_REUSEPORT``: several instances on one host share the signaling and web ports.

The kernel spreads new connections over every socket bound to the port
with the option set (by a hash of the connection's addresses), so N
instances on one machine, one per core, serve one address. Twisted's TCP
endpoint has no such option, so the socket is made, bound and listening
here and handed to the reactor with ``adoptStreamPort``.

The probe ports are not shared (``tap.py`` leaves them alone): a peer's
probes must reach the instance that issued its probe token and predicts
for it, so each instance listens on probe ports of its own and announces
them in its REGISTER 200 OK (docs/cluster.rst).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket, IStreamServerEndpoint
from zope.interface import implementer


@dataclass(frozen=True)
class TCPListen:
    """What a ``tcp:PORT[:backlog=N][:interface=ADDR]`` endpoint string says."""

    port: int
    interface: str = ""
    backlog: int = 50


def parse_tcp(description: str) -> TCPListen:
    """The parts of a ``tcp:`` server endpoint string as ``tap.py`` writes them (``\\:`` escapes)."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if len(parts) < 2 or parts[0] != "tcp":
        raise ValueError(f"not a tcp: endpoint: {description!r}")
    options = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    return TCPListen(int(parts[1]), options.get("interface", ""), int(options.get("backlog", 50)))


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEADDR`` and ``SO_REUSEPORT`` set."""

    def __init__(self, reactor: IReactorSocket, listen: TCPListen) -> None:
        self._reactor = reactor
        self._listen = listen

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        interface = self._listen.interface
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), self._listen.port))
            sock.listen(self._listen.backlog)
            sock.setblocking(False)
            # the stub wants a ServerFactory; any IProtocolFactory does (as for listenTCP)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, protocolFactory)  # type: ignore[arg-type]
        except OSError as exc:
            return fail(CannotListenError(interface, self._listen.port, exc))  # type: ignore[no-untyped-call]
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
        return succeed(port)
