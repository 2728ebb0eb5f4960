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
4. hairpinning: a connection to our own public mapping of that port;
5. IPv6 (issue 17), with 6 at once: from this host's global IPv6 address
   (``nat/interfaces.py``, the one a call offers) a probe to the server's
   IPv6 address (its first answer names the server's addresses,
   KERJO-PROBE-IPS), its round trip, and a connect-back as in step 3: what
   the firewall does to an unsolicited SYN;
6. a port mapping: the gateway asked for one (``nat/portmap.py``'s
   PortMapper, as the agent asks: PCP, then NAT-PMP, then UPnP-IGD) for a
   fresh port, and the mapping deleted again at once (``--no-port-mapping``
   skips this). After step 3, so a mapping cannot let its SYN in.

The round trip to the server is the fastest IPv4 probe's. ``netreport.py``
reads the results.
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
from kerjostunt.client.nat.interfaces import preferred_ipv6
from kerjostunt.client.nat.portmap import mapper_for
from kerjostunt.client.nat.probing import Exchange, exchange
from kerjostunt.client.nat.sockets import SocketReactor, connect_from, listen_reusable, reusable_socket
from kerjostunt.client.netreport import NetReport, inbound_of, port_speed
from kerjostunt.wire import portmap as portmap_wire
from kerjostunt.wire import stun
from kerjostunt.wire.kerjo import parse_probe_ips
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
    #: ask the gateway for a port mapping (step 6); False: ``--no-port-mapping``
    port_mapping: bool = True
    #: the gateway to ask and its PCP/NAT-PMP port, and whether UPnP-IGD too (tests: a fake one)
    gateway: str | None = None
    gateway_port: int = portmap_wire.PORT
    upnp: bool = True
    #: the IPv6 address to probe from ("": this host's preferred global one; tests: ::1)
    local_v6: str = ""


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


def _request(local_port: int, *, connect_back: bool = False, ask_ips: bool = False) -> tuple[bytes, bytes]:
    tid = stun.new_transaction_id()
    attrs = [(stun.KERJO_LOCAL_PORT, stun.encode_local_port(local_port))]
    if connect_back:
        attrs.append((stun.KERJO_CONNECT_BACK, b""))
    if ask_ips:
        attrs.append((stun.KERJO_PROBE_IPS, b""))
    return stun.encode(stun.BINDING_REQUEST, tid, attrs), tid


class _Run:
    """One netcheck: the report being filled and the probes behind it."""

    def __init__(self, reactor: SocketReactor, config: NetcheckConfig) -> None:
        self.reactor = reactor
        self.config = config
        ip = config.local_ip or local_ip_towards(config.server_ip)
        self.report = NetReport(config.server_ip, config.probe_ports, ip)
        self.rtts: list[float] = []
        #: the server's probe addresses, from its first answer
        self.server_ips: tuple[str, ...] = ()

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
    def probe(self, local_port: int, server: tuple[str, int], connect_back: bool = False, *,
              ask_ips: bool = False, ip: str = "",
              errors: list[str] | None = None) -> Generator[defer.Deferred[Any], Any, Exchange | None]:
        """One request from ``ip`` (our IPv4 address) and ``local_port``; None: it failed (noted in
        ``errors``, the report's by default)."""
        request, tid = _request(local_port, connect_back=connect_back, ask_ips=ask_ips)
        try:
            ex: Exchange = yield exchange(self.reactor, (ip or self.ip, local_port), server, request, tid,
                                          timeout=self.config.timeout + (4.0 if connect_back else 0.0))
        except Exception:
            why = _short(Failure())
            (self.report.errors if errors is None else errors).append(
                f"probe {server[0]}:{server[1]} from port {local_port}: {why}")
            return None
        return ex

    @defer.inlineCallbacks
    def mapping(self) -> Generator[defer.Deferred[Any], Any, None]:
        """One local port to every server endpoint (step 1)."""
        port, holder = _reserve(self.ip)
        try:
            servers = [(self.config.server_ip, p) for p in self.config.probe_ports]
            first = yield self.probe(port, servers[0], ask_ips=True)
            if first is None:
                return
            self.note(first)
            self.server_ips = parse_probe_ips(
                (first.response.get(stun.KERJO_PROBE_IPS) or b"").decode("ascii", "replace"))
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
    def connect_back(self, ip: str, server: tuple[str, int], errors: list[str] | None = None,
                     ) -> Generator[defer.Deferred[Any], Any, tuple[Exchange, _Listener, str | None, str] | None]:
        """A listening port of ``ip`` asks the server to dial it back: (the exchange, the listener
        (still up), the server's word, what the SYN met); None: the request failed."""
        port, listener = _listen(self.reactor, ip)
        ex = yield self.probe(port, server, connect_back=True, ip=ip, errors=errors)
        if ex is None:
            listener.close()
            return None
        raw = ex.response.get(stun.KERJO_CONNECT_BACK_RESULT)
        word = None if raw is None else raw.decode("ascii", "replace")
        if word == "connected" and ex.response.transaction_id not in listener.tags:
            yield task.deferLater(self.reactor, self.config.listen_grace, lambda: None)
        return ex, listener, word, inbound_of(word, ex.response.transaction_id in listener.tags)

    @defer.inlineCallbacks
    def inbound(self) -> Generator[defer.Deferred[Any], Any, tuple[int, _Listener] | None]:
        """The connect-back to a listening port (step 3); the listener stays up for the hairpin."""
        found = yield self.connect_back(self.ip, (self.config.server_ip, self.config.probe_ports[0]))
        if found is None:
            return None
        ex, listener, self.report.connect_back, self.report.inbound = found
        self.note(ex, timed=False)  # its answer waited for the connect-back
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


    def server_v6(self) -> str | None:
        """The server's IPv6 address: ``--server``'s, or the first its probe answer named."""
        if ":" in self.config.server_ip:
            return self.config.server_ip
        return next((ip for ip in self.server_ips if ":" in ip), None)

    @defer.inlineCallbacks
    def ipv6(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Step 5: does our global IPv6 address reach the server, and what meets a SYN there."""
        v6 = self.report.ipv6
        v6.address = self.config.local_v6 or preferred_ipv6()
        v6.server = self.server_v6()
        if v6.address is None or v6.server is None:
            v6.detail = "no global IPv6 address" if v6.address is None else "the server named no IPv6 address"
            return
        if v6.server == self.config.server_ip:  # steps 1 to 3 ran over IPv6
            self._ipv6_from_run()
            return
        server, errors = (v6.server, self.config.probe_ports[0]), list[str]()
        port, holder = _reserve(v6.address)
        try:
            ex = yield self.probe(port, server, ip=v6.address, errors=errors)
        finally:
            holder.close()
        if ex is None:
            v6.detail = errors[0].rpartition(": ")[2]
            return
        v6.reached, v6.mapped, v6.rtt_ms = True, ex.result.mapped_ip, round(ex.rtt * 1000.0, 1)
        found = yield self.connect_back(v6.address, server, errors)
        if found is None:
            v6.detail = f"the connect-back: {errors[0].rpartition(': ')[2]}"
            return
        found[1].close()
        v6.connect_back, v6.inbound = found[2], found[3]

    def _ipv6_from_run(self) -> None:
        v6, report = self.report.ipv6, self.report
        v6.reached, v6.mapped, v6.connect_back, v6.inbound = (bool(report.samples), report.public_ip,
                                                              report.connect_back, report.inbound)
        v6.rtt_ms = round(min(self.rtts) * 1000.0, 1) if self.rtts else None
        v6.detail = "" if v6.reached else "the server did not answer"

    @defer.inlineCallbacks
    def port_mapping(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Step 6: a mapping of a fresh port, as the agent asks for its own, deleted at once."""
        pm = self.report.port_mapping
        if not self.config.port_mapping:
            pm.errors = ["--no-port-mapping"]
            return
        port, holder = _reserve("0.0.0.0" if ":" in self.ip else self.ip)  # a mapping is IPv4's
        try:
            mapper = mapper_for(self.reactor, port, self.config.gateway, port=self.config.gateway_port,
                                upnp=self.config.upnp)
            if mapper is None:
                pm.errors = ["no default gateway"]
                return
            pm.asked, pm.internal_port = True, port
            mapper.start()
            mapping = yield mapper.settled()
            if mapping is None:
                pm.errors = list(mapper.errors)
                yield mapper.release()
                return
            pm.method, (pm.external_ip, pm.external_port), pm.lifetime = (mapping.method, mapping.external,
                                                                          mapping.lifetime)
            pm.deleted = yield mapper.release()
        finally:
            holder.close()


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
    yield defer.gatherResults([run.ipv6(), run.port_mapping()], consumeErrors=True)
    return run.report
