"""Connect-back for the probe service: does an unsolicited SYN reach the prober?

``kerjostunt netcheck`` asks (the KERJO-CONNECT-BACK attribute of a Binding
request, docs/probes.rst) and the probe service dials the address the probe
came from, from another port (and from the second server address when there
is one), so the SYN matches no mapping the prober's NAT made.  The NAT then
drops it (the connect times out), resets it (refused), rejects it with ICMP
(unreachable), or passes it on (connected: no NAT, or a NAT whose filtering
is endpoint-independent).  That word goes back in the response.

Only the probe connection's own source is ever dialed (it has just
completed a handshake, so it cannot be spoofed): the server cannot be aimed
at a third party.  One connect-back per probe connection, at most
``max_pending`` at once server-wide; the rest are answered ``busy``.
"""

from __future__ import annotations

import errno
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IConnector, IReactorTCP
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ConnectBack", "Connector", "RESULTS", "result_of"]

_log = Logger(namespace="kerjostunt.server.connectback")

#: the words a connect-back ends with (docs/probes.rst)
RESULTS = ("connected", "refused", "timeout", "unreachable", "busy", "error")


class _Tagged(Protocol):
    """Writes the request's transaction ID, so the prober knows the connection, and hangs up."""

    def __init__(self, tag: bytes) -> None:
        self._tag = tag

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._tag)
        self.transport.loseConnection()


class _OneConnect(ClientFactory):
    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.result: defer.Deferred[str] = defer.Deferred()

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if not self.result.called:
            self.result.callback("connected")
        return _Tagged(self.tag)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.result.called:
            self.result.callback(result_of(reason))


def result_of(reason: Failure) -> str:
    """A failed connect's word: refused (RST), timeout (dropped), unreachable (ICMP), error."""
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.TimeoutError, error.TCPTimedOutError):
        return "timeout"
    if reason.check(error.NoRouteError):
        return "unreachable"
    code = getattr(reason.value, "osError", None)
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
        return "unreachable"
    return "error"


class Connector(TypingProtocol):
    """What the probe protocol needs of the connect-back (tests hand in a fake)."""

    def attempt(self, target: tuple[str, int], tag: bytes) -> defer.Deferred[str]: ...


class ConnectBack:
    """Dials probers back for the probe service; one per server."""

    def __init__(self, reactor: IReactorTCP, *, source_ip: str | None = None,
                 timeout: float = 3.0, max_pending: int = 16) -> None:
        self._reactor = reactor
        #: the address the SYN leaves from (the second server address when configured)
        self.source_ip = source_ip
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending = 0

    def attempt(self, target: tuple[str, int], tag: bytes) -> defer.Deferred[str]:
        """Connect to ``target`` (the probe's source), write ``tag``; fires with a word of RESULTS."""
        if self.pending >= self.max_pending:
            return defer.succeed("busy")
        factory = _OneConnect(tag)
        # The second address is one family's: a prober of the other family is dialed from the
        # address the kernel picks (any but the probe port: still a SYN no mapping expects).
        source = self.source_ip
        bind = (source, 0) if source and (":" in source) == (":" in target[0]) else None
        try:
            self._reactor.connectTCP(target[0], target[1], factory, timeout=self.timeout, bindAddress=bind)
        except Exception as e:  # a bad bind address, say
            _log.info("connect-back to {target} not started: {why}", target=target, why=str(e))
            return defer.succeed("error")
        self.pending += 1

        def done(word: str) -> str:
            self.pending -= 1
            _log.debug("connect-back to {target}: {word}", target=target, word=word)
            return word

        return factory.result.addCallback(done)
