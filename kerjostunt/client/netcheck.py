"""``kerjostunt netcheck``: what this network's NAT does, measured against a probe server.

No account is needed: the probe ports answer any STUN Binding request
(docs/probes.rst), and nothing here is recorded by the server.  The steps,
each from fresh reusable local ports (``nat/sockets.py``, as a call's probes):

1. mapping: one local port probes every probe port and the server's second
   address (OTHER-ADDRESS of the first answer): same public port everywhere
   is endpoint-independent, and so on (``wire/prediction.py``);
2. allocation: three more local ports, one probe each, then after ``wait``
   seconds one more; the steps between the public ports show preserving,
   sequential (and the step) or random, and the last gap how many ports
   other hosts took meanwhile;
3. an unsolicited SYN: a listening local port asks the server to connect
   back (KERJO-CONNECT-BACK) from another port or address, and hears
   whether the SYN arrived, and from the server how it ended;
4. hairpinning: a connection to our own public mapping of that port.

The round trip to the server is the fastest probe's. ``netreport.py`` reads
the results.
"""

from __future__ import annotations

import errno
import secrets
import socket
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.setup import reason_of
from kerjostunt.client.nat.probing import Exchange, exchange
from kerjostunt.client.nat.sockets import SocketReactor, connect_from, listen_reusable, reusable_socket
from kerjostunt.client.netreport import NetReport, inbound_of, port_speed
from kerjostunt.wire import stun
from kerjostunt.wire.prediction import Sample

__all__ = ["NetcheckConfig", "local_ip_towards", "netcheck"]

_log = Logger(namespace="kerjostunt.client.netcheck")

_TAG = 12  # the connect-back writes the request's transaction ID, 12 bytes


@dataclass(frozen=True)
class NetcheckConfig:
    server_ip: str
    probe_ports: tuple[int, ...] = (3478, 3479)
    #: seconds per probe (connect and answer)
    timeout: float = 5.0
    #: seconds between the allocation probes and the last one (the port speed's gap)
    wait: float = 1.0
    #: seconds our listener waits for the connect-back or the hairpin after the answer
    listen_grace: float = 0.5
    local_ip: str = ""


def local_ip_towards(server_ip: str) -> str:
    """The address this host sends from towards ``server_ip`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((server_ip, 9))
        return str(s.getsockname()[0])


class _Tagged(Protocol):
    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _TAG:
            self._listener.heard(self._buf[:_TAG])
            assert self.transport is not None
            self.transport.loseConnection()


class _Listener(Factory):
    """A listening local port that notes which tags (12 bytes) came in on it."""

    def __init__(self) -> None:
        self.tags: set[bytes] = set()
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _Tagged(self)

    def heard(self, tag: bytes) -> None:
        self.tags.add(tag)

    def close(self) -> None:
        if self.port is not None:
            self.port.stopListening()
            self.port = None


def _short(failure: Failure) -> str:
    """refused / timeout / unreachable, or the error's own words."""
    if failure.check(error.ConnectionRefusedError):
        return "refused"
    if failure.check(error.TimeoutError, defer.TimeoutError, error.TCPTimedOutError):
        return "timeout"
    if failure.check(error.NoRouteError) or getattr(failure.value, "osError", None) == errno.EHOSTUNREACH:
        return "unreachable"
    return reason_of(failure)


def _reserve(ip: str) -> tuple[int, socket.socket]:
    """A free local port, held by a reusable socket until the caller closes it."""
    holder = reusable_socket((ip, 0))
    return holder.getsockname()[1], holder


def _listen(reactor: SocketReactor, ip: str) -> tuple[int, _Listener]:
    port, holder = _reserve(ip)
    try:
        listener = _Listener()
        listener.port = listen_reusable(reactor, (ip, port), listener)
    finally:
        holder.close()
    return port, listener


def _request(local_port: int, *, connect_back: bool = False) -> tuple[bytes, bytes]:
    tid = stun.new_transaction_id()
    attrs = [(stun.KERJO_LOCAL_PORT, stun.encode_local_port(local_port))]
    if connect_back:
        attrs.append((stun.KERJO_CONNECT_BACK, b""))
    return stun.encode(stun.BINDING_REQUEST, tid, attrs), tid


class _Run:
    """One netcheck: the report being filled and the probes behind it."""

    def __init__(self, reactor: SocketReactor, config: NetcheckConfig) -> None:
        self.reactor = reactor
        self.config = config
        ip = config.local_ip or local_ip_towards(config.server_ip)
        self.report = NetReport(config.server_ip, config.probe_ports, ip)
        self.rtts: list[float] = []

    @property
    def ip(self) -> str:
        return self.report.local_ip

    def note(self, ex: Exchange, *, timed: bool = True) -> Sample:
        r = ex.result
        sample = Sample(r.local_port, r.mapped_ip, r.mapped_port, r.server[0], r.server[1],
                        self.reactor.seconds(), local_ip=self.ip)
        self.report.samples.append(sample)
        if timed:
            self.rtts.append(ex.rtt)
        return sample

    @defer.inlineCallbacks
    def probe(self, local_port: int, server: tuple[str, int],
              connect_back: bool = False) -> Generator[defer.Deferred[Any], Any, Exchange | None]:
        request, tid = _request(local_port, connect_back=connect_back)
        try:
            ex: Exchange = yield exchange(self.reactor, (self.ip, local_port), server, request, tid,
                                timeout=self.config.timeout + (4.0 if connect_back else 0.0))
        except Exception:
            why = _short(Failure())
            self.report.errors.append(f"probe {server[0]}:{server[1]} from port {local_port}: {why}")
            return None
        return ex

    @defer.inlineCallbacks
    def mapping(self) -> Generator[defer.Deferred[Any], Any, None]:
        """One local port to every server endpoint (step 1)."""
        port, holder = _reserve(self.ip)
        try:
            servers = [(self.config.server_ip, p) for p in self.config.probe_ports]
            first = yield self.probe(port, servers[0])
            if first is None:
                return
            self.note(first)
            self.report.public_port = first.result.mapped_port
            other = first.response.get(stun.OTHER_ADDRESS)
            if other is not None:
                other_address = stun.decode_address(other)
                self.report.other_address = other_address[0]
                servers.append((other_address[0], self.config.probe_ports[0]))
            for server in servers[1:]:
                ex = yield self.probe(port, server)
                if ex is not None:
                    self.note(ex)
        finally:
            holder.close()

    @defer.inlineCallbacks
    def fresh_probe(self) -> Generator[defer.Deferred[Any], Any, Sample | None]:
        port, holder = _reserve(self.ip)
        try:
            ex = yield self.probe(port, (self.config.server_ip, self.config.probe_ports[0]))
        finally:
            holder.close()
        return None if ex is None else self.note(ex)

    @defer.inlineCallbacks
    def allocation(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Fresh local ports, then a timed gap (step 2)."""
        before = None
        for _ in range(3):
            before = (yield self.fresh_probe()) or before
        yield task.deferLater(self.reactor, self.config.wait, lambda: None)
        after = yield self.fresh_probe()
        self.report.classify()
        self.report.ports_per_second = port_speed(before, after, self.report.nat)

    @defer.inlineCallbacks
    def inbound(self) -> Generator[defer.Deferred[Any], Any, tuple[int, _Listener] | None]:
        """The connect-back to a listening port (step 3); the listener stays up for the hairpin."""
        port, listener = _listen(self.reactor, self.ip)
        ex = yield self.probe(port, (self.config.server_ip, self.config.probe_ports[0]), connect_back=True)
        if ex is None:
            listener.close()
            return None
        self.note(ex, timed=False)  # its answer waited for the connect-back
        word = ex.response.get(stun.KERJO_CONNECT_BACK_RESULT)
        self.report.connect_back = None if word is None else word.decode("ascii", "replace")
        if self.report.connect_back == "connected" and ex.response.transaction_id not in listener.tags:
            yield task.deferLater(self.reactor, self.config.listen_grace, lambda: None)
        self.report.inbound = inbound_of(self.report.connect_back, ex.response.transaction_id in listener.tags)
        return ex.result.mapped_port, listener

    @defer.inlineCallbacks
    def hairpin(self, public_port: int, listener: _Listener) -> Generator[defer.Deferred[Any], Any, None]:
        """Connect to our own public mapping of the listening port (step 4)."""
        if not self.report.nat.behind_nat or self.report.public_ip is None:
            self.report.hairpin_detail = "not needed (no NAT)"
            return
        tag = secrets.token_bytes(_TAG)
        port, holder = _reserve(self.ip)
        try:
            proto = yield connect_from(self.reactor, (self.ip, port), (self.report.public_ip, public_port),
                                       Factory.forProtocol(Protocol), timeout=min(2.0, self.config.timeout))
        except Exception:
            self.report.hairpin, self.report.hairpin_detail = False, _short(Failure())
            return
        finally:
            holder.close()
        proto.transport.write(tag)
        yield task.deferLater(self.reactor, self.config.listen_grace, lambda: None)
        proto.transport.loseConnection()
        self.report.hairpin = tag in listener.tags
        self.report.hairpin_detail = "" if self.report.hairpin else "connected, but not to us"


@defer.inlineCallbacks
def netcheck(reactor: SocketReactor, config: NetcheckConfig) -> Generator[defer.Deferred[Any], Any, NetReport]:
    """Measure; fires with the report (never fails: what went wrong is in ``report.errors``)."""
    run = _Run(reactor, config)
    yield run.mapping()
    if run.report.samples:
        yield run.allocation()
        found = yield run.inbound()
        if found is not None:
            try:
                yield run.hairpin(*found)
            finally:
                found[1].close()
    run.report.classify()
    if run.rtts:
        run.report.rtt_ms = round(min(run.rtts) * 1000.0, 1)
    return run.report
