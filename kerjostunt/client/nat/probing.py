"""Client side of NAT probing: Binding requests from one reusable local port.

Per call the client binds one local port, probes the server's probe ports
from it (so the server sees how this NAT maps that port towards different
destinations), then listens and dials the peer from the same port.  That is
why every socket here is made by ``sockets.reusable_socket`` (SO_REUSEADDR +
SO_REUSEPORT before bind): the port stays usable for the later listen and
connects while, or after, the probes use it.

The request carries the probe token as USERNAME, a MESSAGE-INTEGRITY keyed
by the probe password (RFC 8489 short-term credential) and the private
KERJO-LOCAL-PORT attribute; see docs/probes.rst.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.nat.sockets import SocketReactor, connect_from, reusable_socket
from kerjostunt.wire import stun

__all__ = ["ProbeResult", "ProbeError", "Exchange", "exchange", "probe_from", "probe_one"]

_log = Logger(namespace="kerjostunt.client.nat.probing")


@dataclass(frozen=True)
class ProbeResult:
    server: tuple[str, int]
    local_port: int
    mapped_ip: str
    mapped_port: int


@dataclass(frozen=True)
class Exchange:
    """One request's whole answer (``kerjostunt netcheck`` reads more than the mapping)."""

    result: ProbeResult
    response: stun.StunMessage
    #: seconds from the connection being up to the answer: one round trip to the server,
    #: plus what the server spent (a connect-back's wait, say)
    rtt: float


class ProbeError(Exception):
    """No probe server answered; ``failures`` maps each server to why."""

    def __init__(self, failures: dict[tuple[str, int], Failure]) -> None:
        super().__init__("; ".join(f"{h}:{p}: {f.getErrorMessage()}"
                                   for (h, p), f in failures.items()))
        self.failures = failures


class _BindingClient(Protocol):
    """Sends one Binding request, waits for its response, hangs up."""

    def __init__(self, request: bytes, transaction_id: bytes, key: bytes | None,
                 clock: IReactorTime | None = None) -> None:
        self._request = request
        self._clock = clock
        self.made_at = self.answered_at = 0.0
        self.response: stun.StunMessage | None = None
        self._tid = transaction_id
        self._key = key
        self._decoder = stun.StunStreamDecoder()
        self.result: defer.Deferred[tuple[str, int]] = defer.Deferred(self._cancel)
        #: fires (None) once the request is written: the next probe may start
        self.sent: defer.Deferred[None] = defer.Deferred()

    def _tcp(self) -> ITCPTransport:
        """The connection's transport (a TCP one: ``connect_from`` adopts a TCP socket)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self._tcp().abortConnection()

    def connectionMade(self) -> None:
        if self._clock is not None:
            self.made_at = self._clock.seconds()
        self._tcp().write(self._request)
        if not self.sent.called:
            self.sent.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        try:
            for msg, raw in self._decoder.feed(data):
                if msg.transaction_id != self._tid:
                    continue  # not ours; RFC 8489 says ignore
                mapped = stun.parse_binding_response(raw, self._tid, key=self._key)
                self.response = msg
                if self._clock is not None:
                    self.answered_at = self._clock.seconds()
                self._finish(mapped)
                return
        except stun.STUNError as e:
            self._finish(Failure(e))

    def _finish(self, outcome: Any) -> None:
        self._tcp().loseConnection()
        if self.result.called:
            return
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.result.called:
            self.result.errback(stun.STUNError("connection closed before a response"))


class _OneShot(Factory):
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(self, proto: _BindingClient) -> None:
        self._proto = proto

    def buildProtocol(self, addr: IAddress | None) -> _BindingClient:
        self._proto.factory = self
        return self._proto


def probe_one(reactor: SocketReactor, local: tuple[str, int], server: tuple[str, int], *,
              username: str | None, password: str | None,
              timeout: float = 5.0) -> defer.Deferred[ProbeResult]:
    """One Binding request to ``server`` from the (already chosen) local endpoint."""
    return _start_probe(reactor, local, server, username=username, password=password, timeout=timeout)[0]


def exchange(reactor: SocketReactor, local: tuple[str, int], server: tuple[str, int],
             request: bytes, transaction_id: bytes, *, key: bytes | None = None,
             timeout: float = 5.0) -> defer.Deferred[Exchange]:
    """Send ``request`` (built by the caller, extra attributes and all) from ``local``; its answer.

    Fails as ``probe_one`` does: a connect error, a STUN error response
    (``STUNError.code``), a timeout.
    """
    client = _BindingClient(request, transaction_id, key, clock=reactor)
    d = defer.maybeDeferred(connect_from, reactor, local, server, _OneShot(client), timeout=timeout)
    d.addCallback(lambda _: client.result)
    d.addTimeout(timeout, reactor)

    def answered(mapped: tuple[str, int]) -> Exchange:
        assert client.response is not None
        return Exchange(ProbeResult(server, local[1], mapped[0], mapped[1]), client.response,
                        client.answered_at - client.made_at)

    return d.addCallback(answered)


def _start_probe(reactor: SocketReactor, local: tuple[str, int], server: tuple[str, int], *,
                 username: str | None, password: str | None,
                 timeout: float) -> tuple[defer.Deferred[ProbeResult], defer.Deferred[None]]:
    """(the result, a Deferred that fires when the request is written or the probe ended)."""
    key = stun.short_term_key(password) if password is not None else None
    if (username is None) != (key is None):
        return defer.fail(ValueError("username and password go together")), defer.succeed(None)
    request, tid = stun.binding_request(username=username, key=key, local_port=local[1])
    client = _BindingClient(request, tid, key)

    def connected(_: Any) -> defer.Deferred[tuple[str, int]]:
        return client.result

    d = defer.maybeDeferred(connect_from, reactor, local, server, _OneShot(client),
                            timeout=timeout)
    d.addCallback(connected)
    d.addTimeout(timeout, reactor)
    d.addCallback(lambda mapped: ProbeResult(server, local[1], mapped[0], mapped[1]))

    def ended(passthrough: Any) -> Any:
        if not client.sent.called:
            client.sent.callback(None)  # failed before writing: the next may go
        return passthrough

    d.addBoth(ended)
    return d, client.sent


def probe_from(reactor: SocketReactor, local_address: tuple[str, int],
               servers: Sequence[tuple[str, int]], *, username: str | None,
               password: str | None, timeout: float = 5.0) -> defer.Deferred[list[ProbeResult]]:
    """Probe every server from ``local_address``, in the given order, pipelined.

    With port 0 a port is picked once (a reusable socket is bound and held
    until the probes are done) and used for every server.  Fires with the
    results of the servers that answered, in order; fails with
    :class:`ProbeError` when none did (or with the bind error).

    The order matters: the server measures a sequential NAT's delta from
    the order the mappings were made in, and it orders them by when the
    requests arrive.  Each probe therefore starts only once the previous
    one's connection is up and its request written (its SYN went through
    the NAT first, and its request left before the next SYN did, on a path
    one RTT longer), not once its answer is back: three probes take four
    round trips to the server instead of six.
    """
    holder = None
    if local_address[1] == 0:
        try:
            holder = reusable_socket(local_address)
        except OSError as e:
            return defer.fail(e)
        local_address = (local_address[0], holder.getsockname()[1])

    @defer.inlineCallbacks
    def run() -> Generator[defer.Deferred[Any], Any, list[ProbeResult]]:
        started: list[tuple[tuple[str, int], defer.Deferred[ProbeResult]]] = []
        for server in servers:
            result, sent = _start_probe(reactor, local_address, server, username=username,
                                        password=password, timeout=timeout)
            started.append((server, result))
            yield sent
        results: list[ProbeResult] = []
        failures: dict[tuple[str, int], Failure] = {}
        for server, pending in started:
            try:
                results.append((yield pending))
            except Exception:
                failure = Failure()
                _log.info("probe {server} from {local} failed: {why}", server=server,
                          local=local_address, why=failure.getErrorMessage())
                failures[server] = failure
        if not results:
            raise ProbeError(failures)
        return results

    d = run()

    def release(passthrough: Any) -> Any:
        if holder is not None:
            holder.close()
        return passthrough

    d.addBoth(release)
    return d
