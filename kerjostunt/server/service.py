"""The STUNT server as one MultiService: store, signaling, probes, web.

``tap.makeService`` turns command-line options into ``ServerSettings`` and
builds a ``StuntServer``; tests build one directly on port 0.
"""

from __future__ import annotations

import gc
import ipaddress
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from kerjostunt import tls
from kerjostunt.server import web
from kerjostunt.server.auth import NonceManager, make_portal
from kerjostunt.server.calls import CallManager, CallSettings
from kerjostunt.server.cluster import ClusterCalls, ClusterNode, NodeSettings
from kerjostunt.server.connectback import ConnectBack
from kerjostunt.server.limits import PerSourceCap, WebLimits
from kerjostunt.server.observations import plain_ip
from kerjostunt.server.probe import (
    AlternateAddresses,
    Observation,
    ObservationLog,
    ProbeFactory,
    ProbeTokens,
    nat_not_stored,
)
from kerjostunt.server.reactor import IServerReactor
from kerjostunt.server.register import CHALLENGE_ALGORITHMS, Protection, RegisterHandler
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.relay import RelayGate, RelaySettings
from kerjostunt.server.reuseport import ReusePortEndpoint, parse_tcp
from kerjostunt.server.router import SignalingRouter
from kerjostunt.server.signaling import AdmittingTLSFactory, ConnectionLimits, SignalingFactory
from kerjostunt.store import Database
from kerjostunt.store.api import BUSY_TIMEOUT, AsyncStore
from kerjostunt.store.directory import CallsStore, Directory
from kerjostunt.store.realm import realm_problem
from kerjostunt.store.service import StoreService
from kerjostunt.wire.kerjo import ProbeOffer
from kerjostunt.wire.prediction import classify
from kerjostunt.wire.sip.headers import parse_name_addr

log = Logger()


GC_GEN0_THRESHOLD = 10_000  # CPython's default is 700


def tune_gc(reactor: IReactorCore) -> None:
    """Make the cyclic garbage collector cheaper for a server holding many peers.

    Every REGISTER leaves a few dozen long-lived objects (connection, TLS
    wrapper, parser, binding, token), so with CPython's defaults a young
    collection ran every few registrations and each older collection walked
    every object alive, start-up's included (SQLAlchemy, Alembic, Twisted:
    most of the heap at 2,000 peers). A higher first threshold makes young
    collections about 14 times rarer, and ``gc.freeze`` after start-up moves
    what exists then out of every later collection. Measured by the
    collector's own thread CPU time at 2,000 registrations: about 0.2 s of
    collection to 0.05 s; RSS per peer unchanged (docs/decisions.rst).
    ``twistd kerjostunt`` calls this; tests that build a server directly do not.
    """
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)

    def freeze_start_up() -> None:
        gc.collect()  # garbage of the start-up must not be frozen with it
        gc.freeze()

    reactor.callWhenRunning(freeze_start_up)


@dataclass
class ServerSettings:
    """Everything the server can be told; defaults are the embedded defaults."""

    domain: str = "kerjo.local"
    db_url: str = "sqlite:///kerjostunt.sqlite"
    certs_dir: Path = Path("certs")
    cert: Path | None = None
    key: Path | None = None
    cert_hosts: list[str] = field(default_factory=list)
    sip_endpoint: str = "tcp:5061"
    sip_extra_endpoints: list[str] = field(default_factory=list)  # more --interface addresses
    probe_endpoints: list[str] = field(default_factory=lambda: ["tcp:3478", "tcp:3479"])
    probe_ports: list[int] = field(default_factory=lambda: [3478, 3479])
    probe_alt_ip: str | None = None
    #: the probes' first address when it is not a wildcard (OTHER-ADDRESS of requests to the alternate)
    probe_interface: str | None = None
    #: the explicit --interface addresses, announced so dual-stack clients probe both families
    probe_ips: list[str] = field(default_factory=list)
    probe_token_lifetime: float = 300.0
    #: open probe connections from one address, over all probe ports (docs/security.rst)
    probe_max_per_ip: int = 64
    web_endpoint: str | None = "tcp:8443"
    web_extra_endpoints: list[str] = field(default_factory=list)
    digest_algorithms: tuple[str, ...] = CHALLENGE_ALGORITHMS
    tls_groups: str | None = None  # None: OpenSSL's default key exchange
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    web_limits: WebLimits = field(default_factory=WebLimits)
    call_answer_timeout: float = 15.0
    call_outcome_timeout: float = 30.0
    invite_rate: float = 5.0
    invite_burst: float = 20.0
    #: the opt-in TURN relay (docs/relay.rst); None: no relay, as before
    relay: RelaySettings | None = None
    #: where peers reach this instance, told to the others of a cluster (None: the machine's host name)
    advertise: str | None = None
    #: SO_REUSEPORT on the signaling and web ports: several instances on one host share them (reuseport.py)
    reuse_port: bool = False


def server_addresses(settings: ServerSettings) -> frozenset[str]:
    """The addresses the server is known at: a candidate naming one is never forwarded.

    The interfaces its endpoints bind (a wildcard names none), the probes'
    other address, and the domain and certificate names that are addresses.
    """
    found: set[str] = set()
    names = [settings.domain, *settings.cert_hosts, settings.probe_alt_ip or ""]
    for description in [settings.sip_endpoint, *settings.probe_endpoints, settings.web_endpoint or ""]:
        for part in re.split(r"(?<!\\):", description):  # IPv6 colons are escaped
            if part.startswith("interface="):
                names.append(part[len("interface="):].replace("\\", ""))
    for name in names:
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            continue
        if not address.is_unspecified:
            found.add(str(address))
    return frozenset(found)


@implementer(IStreamServerEndpoint)
class PortRecordingEndpoint:
    """Wraps an endpoint so the server can tell which port it really got (port 0 in tests)."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self.listening: Deferred[IListeningPort] = Deferred()

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def listened(port: IListeningPort) -> IListeningPort:
            self.listening.callback(port)
            return port

        return self._endpoint.listen(protocolFactory).addCallback(listened)


class _CallsService(Service):
    """Records what calls in progress know and stops their timers on shutdown."""

    def __init__(self, calls: CallManager) -> None:
        self.calls = calls

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """Service's, typed (twisted.application carries no annotations)."""
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[object]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.calls.stop()


class StuntServer(MultiService):
    """Wires the pieces; holds references that tests and the web service use."""

    def __init__(self, settings: ServerSettings, reactor: IServerReactor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.settings = settings
        self.reactor = reactor
        self.counters: Counter[str] = Counter()
        self.certificates = self._certificates()
        # A short busy timeout: a write another process holds locked is retried
        # later (store/lanes.py), not waited for on the store's one thread.
        self.store = AsyncStore(Database(settings.db_url, busy_timeout=BUSY_TIMEOUT), reactor, counter=self.count)
        StoreService(self.store, realm=settings.domain).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.directory = Directory(self.store, reactor)  # the INVITEs' group checks (store/directory.py)
        self.directory.setServiceParent(self)  # type: ignore[no-untyped-call]

        self.registrar = Registrar(reactor)
        self.tokens = ProbeTokens(reactor, settings.probe_token_lifetime)
        self.observations = ObservationLog(local_ip_of=self._contact_ip)
        self.observations.subscribe(self._observed)
        # One for every probe port: its cap on connects in flight is server-wide.
        self.connect_back = ConnectBack(reactor, source_ip=settings.probe_alt_ip or None)
        self.observations.subscribe_addresses(self.registrar.note_address)
        self.register = RegisterHandler(
            reactor,
            settings.domain,
            self.registrar,
            make_portal(self.store.get_ha1),
            NonceManager(reactor),
            self.store,
            self._probe_headers,
            counter=self.count,
            challenge_algorithms=settings.digest_algorithms,
            protection=Protection(tokens=self.tokens, explain=self._login_problem),
        )
        self.calls = CallManager(
            reactor, settings.domain, self.registrar, CallsStore(self.directory, self.store), self.observations,
            self.count,
            CallSettings(answer_timeout=settings.call_answer_timeout, outcome_timeout=settings.call_outcome_timeout,
                         invite_rate=settings.invite_rate, invite_burst=settings.invite_burst,
                         server_addresses=server_addresses(settings)),
        )
        self.observations.subscribe(lambda obs: self.calls.turn_probes.observed(obs.user_id, obs.local_port))
        self.cluster: ClusterNode | None = None
        if not self.store.database.is_sqlite:  # PostgreSQL: one of a cluster (docs/cluster.rst)
            self.cluster = self._cluster_node()
        if settings.relay is not None:
            self.calls.relay = RelayGate(settings.relay, reactor.seconds, self.store.groups_of)
        _CallsService(self.calls).setServiceParent(self)  # stops before the store: outcomes get written
        call_handler = self.calls if self.cluster is None else ClusterCalls(self.cluster, self.calls)
        self.router = SignalingRouter(self.registrar, self.register, call_handler)
        self.signaling = SignalingFactory(self.router, reactor, settings.limits, counter=self.count)
        tls_factory = AdmittingTLSFactory(
            tls.server_options(self.certificates, groups=settings.tls_groups), False, self.signaling
        )
        self.signaling_tls = tls_factory
        self.ports: dict[str, Deferred[IListeningPort]] = {}
        self.probe_cap = PerSourceCap(reactor, "probe", settings.probe_max_per_ip, counter=self.count)
        self._listen_all(tls_factory)

    def _listen_all(self, tls_factory: IProtocolFactory) -> None:
        """Signaling, probe and web listeners on every configured address (tap.py's endpoints)."""
        self._listen("sip", self.settings.sip_endpoint, tls_factory, shared=True)
        if self.cluster is not None:
            self.ports["sip"].addCallback(self._note_sip_port)
        for index, endpoint in enumerate(self.settings.sip_extra_endpoints, 1):
            self._listen(f"sip@{index}", endpoint, tls_factory, shared=True)
        for index, endpoint in enumerate(self.settings.probe_endpoints):
            self._listen(f"probe{index}", endpoint, self._probe_factory())
            if index < len(self.settings.probe_ports):
                # Announce the port really bound (it differs when configured as 0).
                self.ports[f"probe{index}"].addCallback(self._note_probe_port, index)
        if self.settings.web_endpoint:
            site = web.tls_factory(self)
            self._listen("web", self.settings.web_endpoint, site, shared=True)
            for index, endpoint in enumerate(self.settings.web_extra_endpoints, 1):
                self._listen(f"web@{index}", endpoint, site, shared=True)

    def count(self, what: str) -> None:
        self.counters[what] += 1

    def _cluster_node(self) -> ClusterNode:
        """Started after the store (its upgrade), stopped after the calls and before the store."""
        host = self.settings.advertise or socket.gethostname()
        settings = NodeSettings(self.settings.db_url, host, probe_ports=self.settings.probe_ports)
        node = ClusterNode(self.reactor, settings, self.store, self.registrar, self.calls, self.count)
        node.setServiceParent(self)  # type: ignore[no-untyped-call]
        return node

    def _login_problem(self, user_id: str) -> Deferred[str | None]:
        """Why ``user_id``'s logins fail when it is the realm (store/realm.py), else None."""
        d: Deferred[str | None] = self.store.get_user(user_id).addCallback(realm_problem, self.settings.domain)
        return d.addErrback(lambda _: None)  # unknown user, or no answer: nothing to add

    def _certificates(self) -> tls.CertificatePaths:
        s = self.settings
        if s.cert is not None:
            return tls.CertificatePaths(s.cert, s.key or s.cert, None)
        return tls.ensure_certificates(s.certs_dir, s.domain, s.cert_hosts)

    def _listen(self, name: str, description: str, factory: IProtocolFactory, shared: bool = False) -> None:
        # twisted.application and endpoint parsing carry no annotations: the ignores.
        if shared and self.settings.reuse_port:
            inner: IStreamServerEndpoint = ReusePortEndpoint(self.reactor, parse_tcp(description))
        else:
            inner = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        endpoint = PortRecordingEndpoint(inner)
        service = StreamServerEndpointService(endpoint, factory)  # type: ignore[no-untyped-call]
        service._raiseSynchronously = True  # a busy port stops twistd with a clear error
        service.setName(name)  # type: ignore[no-untyped-call]
        service.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.ports[name] = endpoint.listening

    def _note_sip_port(self, port: IListeningPort) -> IListeningPort:
        host = port.getHost()
        if self.cluster is not None and isinstance(host, (IPv4Address, IPv6Address)):
            self.cluster.settings.sip_port = host.port
        return port

    def _note_probe_port(self, port: IListeningPort, index: int) -> IListeningPort:
        host = port.getHost()
        if isinstance(host, (IPv4Address, IPv6Address)):  # a probe endpoint is TCP
            self.settings.probe_ports[index] = host.port
        return port

    def _probe_factory(self) -> ProbeFactory:
        other = None
        if self.settings.probe_alt_ip:
            ports = self.settings.probe_ports
            other = AlternateAddresses(self.settings.probe_alt_ip, ports, self.settings.probe_interface)
        factory = ProbeFactory(self.reactor, self.tokens, self.observations, other_address=other,
                               per_ip=self.probe_cap, connect_back=self.connect_back)
        factory.ips = tuple(self.settings.probe_ips)
        return factory

    def _probe_headers(self, user_id: str) -> list[tuple[str, str]]:
        token, password = self.tokens.issue(user_id)
        offer = ProbeOffer(token, password, tuple(self.settings.probe_ports),
                           int(self.settings.probe_token_lifetime), self.settings.probe_alt_ip,
                           tuple(self.settings.probe_ips))
        return offer.items()

    def _contact_ip(self, user_id: str) -> str | None:
        """The address the user's registered Contact names: its own, behind any NAT."""
        binding = self.registrar.lookup(user_id)
        if binding is None:
            return None
        try:
            return plain_ip(parse_name_addr(binding.contact).uri.host)
        except ValueError:
            return None

    def _observed(self, observation: Observation) -> None:
        self.count("probes")
        nat = classify(self.observations.samples(observation.user_id))
        self.store.record_nat(observation.user_id, nat.to_dict(), observation.time).addErrback(
            nat_not_stored, observation.user_id, self.tokens, self.observations
        )
