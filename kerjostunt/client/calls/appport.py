"""
The app-port and handshake glue of a call.

Connections to the agent's *application port* (the ``passive`` candidate)
are shared by every call, so the dialer of such a connection first sends one
line naming the call (``KJ1 CALL <tag>``, the tag an HMAC of the call ID
under the call's secret, so it reveals nothing to a stranger); the accepting
agent uses it to pick the call's HandshakeFactory.  The punch port belongs to
one call and needs no such line.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.handshake import HandshakeFactory, HandshakeFailed, HandshakeProtocol

log = Logger()

PREAMBLE = b"KJ1 CALL "
PREAMBLE_MAX = 100
#: a call named on the app port but not known yet is looked up again this often, for this long:
#: the peer's connection can arrive before we have read the answer that starts our side of the
#: call (both legs hear of it at once; on a LAN the peer's connect takes well under a
#: millisecond, and a busy client reads its signaling later)
RELOOK_INTERVAL = 0.02
RELOOK_FOR = 1.0


class TaggedCall(Protocol):
    """What the app port needs of the call a tag names (a call's Dialer)."""

    @property
    def handshakes(self) -> HandshakeFactory: ...

    def accepted(self, protocol: Any, remote: tuple[str, int]) -> None: ...


def call_tag(secret: bytes, call_id: str) -> bytes:
    """Names a call on the shared app port without revealing its Call-ID."""
    mac = hmac.new(secret, b"kerjostunt-1 call\0" + call_id.encode("utf-8"), hashlib.sha256)
    return mac.hexdigest()[:32].encode("ascii")


# -- handshakes ---------------------------------------------------------------------


class _CallHandshakeProtocol(HandshakeProtocol):
    """A HandshakeProtocol whose unobserved failures are not 'unhandled errors'.

    ``handshake_done`` makes a new observer Deferred per access; one that a
    caller took and never consumed would report a loser's failure as an
    unhandled error.  The failure itself is logged by the handshake, so its
    own HandshakeFailed is swallowed at the end of every observer's chain
    (anything else, a bug in a consumer, still surfaces).
    """

    def _resolve(self, outcome: Any) -> None:
        if isinstance(outcome, Failure):
            for d in self._observers:
                d.addErrback(_ignore_handshake_failure)
        super()._resolve(outcome)


def _ignore_handshake_failure(failure: Failure) -> None:
    failure.trap(HandshakeFailed)


class CallHandshakeFactory(HandshakeFactory):
    protocol = _CallHandshakeProtocol

    def buildProtocol(self, addr: IAddress | None) -> HandshakeProtocol:
        assert addr is not None
        return _CallHandshakeProtocol(self, addr)


# -- app-port connections ----------------------------------------------------------


def _tcp(protocol: TwistedProtocol) -> ITCPTransport:
    """A connected protocol's transport (always TCP here: the app port, ``connect_from``)."""
    assert protocol.transport is not None
    return cast(ITCPTransport, protocol.transport)


def _endpoint(address: IAddress) -> tuple[str, int]:
    ip = cast("IPv4Address | IPv6Address", address)
    return (ip.host, ip.port)


class PreambleProtocol(TwistedProtocol):
    """Dialer side of an app-port connection: name the call, then run the handshake."""

    def __init__(self, inner: HandshakeProtocol, tag: bytes) -> None:
        self.inner = inner
        self.tag = tag

    @property
    def handshake_done(self) -> defer.Deferred[Any]:
        """The inner handshake's: the application protocol once it passed."""
        return self.inner.handshake_done

    @property
    def handshake_in_flight(self) -> bool:
        """The inner handshake's (``contest.in_flight``): a deadline keeps this connection."""
        return self.inner.handshake_in_flight

    def connectionMade(self) -> None:
        transport = _tcp(self)
        transport.write(PREAMBLE + self.tag + b"\n")
        inner: IProtocol = self.inner
        inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.inner.connectionLost(reason)


class PreambleFactory(Factory):
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, handshakes: HandshakeFactory, tag: bytes) -> None:
        self.handshakes = handshakes
        self.tag = tag

    def buildProtocol(self, addr: IAddress | None) -> PreambleProtocol:
        assert addr is not None
        return PreambleProtocol(self.handshakes.buildProtocol(addr), self.tag)


class AppPortProtocol(TwistedProtocol):
    """
    Accepting side of the app port: read ``KJ1 CALL <tag>``, hand over to the call.

    ``lookup(tag)`` returns the call's Dialer or None; a call not known
    yet is looked up again for ``RELOOK_FOR`` seconds (our side of it may
    start a moment after the peer's connection arrives: the NAT lab's
    40-peer group lost LAN pairs to this under load, both sides' races
    failing within milliseconds).  A stranger, a bad line or silence
    (``timeout``) closes the connection.
    """

    def __init__(self, lookup: Callable[[bytes], TaggedCall | None], clock: IReactorTime,
                 timeout: float = 5.0) -> None:
        self.lookup = lookup
        self.clock = clock
        self.timeout = timeout
        self.inner: IProtocol | None = None
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._relook: IDelayedCall | None = None
        self._looking_since: float | None = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._give_up, "no call named in time")

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self._buffer += data
        if self._relook is not None:  # the named call is not known yet: keep what it sends meanwhile
            if len(self._buffer) > 4 * PREAMBLE_MAX:
                self._give_up("too much before its call was known")
            return
        line, sep, _ = self._buffer.partition(b"\n")
        if not sep:
            if len(self._buffer) > PREAMBLE_MAX:
                self._give_up("preamble too long")
            return
        if not line.startswith(PREAMBLE):
            self._give_up("no such call")
            return
        self._look_up()

    def _look_up(self) -> None:
        """Hand the connection to the call its preamble names, looking again a while if not known yet."""
        self._relook = None
        line, _, rest = self._buffer.partition(b"\n")
        dialer = self.lookup(line[len(PREAMBLE):])
        if dialer is None:
            now = self.clock.seconds()
            since = self._looking_since = now if self._looking_since is None else self._looking_since
            if now - since >= RELOOK_FOR:
                self._give_up("no such call")
            else:
                self._relook = self.clock.callLater(RELOOK_INTERVAL, self._look_up)
            return
        self._buffer = b""
        self._cancel_timer()
        transport = _tcp(self)
        peer = transport.getPeer()
        handshake = dialer.handshakes.buildProtocol(peer)
        inner: IProtocol = handshake
        self.inner = inner
        inner.makeConnection(transport)
        dialer.accepted(handshake, _endpoint(peer))
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self._cancel_timer()
        if self._relook is not None and self._relook.active():
            self._relook.cancel()
        self._relook = None
        if self.inner is not None:
            self.inner.connectionLost(reason)

    def _give_up(self, why: str) -> None:
        self._cancel_timer()
        transport = _tcp(self)
        log.info("app port: dropping {peer}: {why}", peer=transport.getPeer(), why=why)
        transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class AppPortFactory(Factory):
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, lookup: Callable[[bytes], TaggedCall | None], clock: IReactorTime) -> None:
        self.lookup = lookup
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> AppPortProtocol:
        return AppPortProtocol(self.lookup, self.clock)
