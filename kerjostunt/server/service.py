"""The STUNT server as one MultiService: store, signaling, probes, web.

``tap.makeService`` turns command-line options into ``ServerSettings`` and
builds a ``StuntServer``; tests build one directly on port 0.
"""

from __future__ import annotations

import gc
import sys
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
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from zope.interface import implementer

from kerjostunt import tls
from kerjostunt.server import web
from kerjostunt.server.auth import NonceManager, make_portal
from kerjostunt.server.calls import CallManager, CallSettings
from kerjostunt.server.limits import WebLimits
from kerjostunt.server.probe import Observation, ObservationLog, ProbeFactory, ProbeTokens, nat_not_stored
from kerjostunt.server.reactor import IServerReactor
from kerjostunt.server.register import CHALLENGE_ALGORITHMS, Protection, RegisterHandler
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.router import SignalingRouter
from kerjostunt.server.signaling import AdmittingTLSFactory, ConnectionLimits, SignalingFactory
from kerjostunt.store import Database
from kerjostunt.store.api import AsyncStore, StoreService
from kerjostunt.wire.kerjo import ProbeOffer
from kerjostunt.wire.prediction import classify

log = Logger()


class _LevelFilter(FilteringLogObserver):
    """The filter ``filter_log_level`` installs: a later call replaces it, not wraps it."""


def filter_log_level(level: LogLevel) -> LogLevelFilterPredicate:
    """Stop kerjostunt's events below ``level`` before any log observer sees them.

    twistd's log file observer formats and writes every event it gets, debug
    included, and twistd builds that observer itself (no level option), so
    the filter sits at the source: every ``Logger`` of a loaded kerjostunt
    module sends to a ``FilteringLogObserver`` (``LogLevelFilterPredicate``)
    in front of the global publisher. A debug event then costs only its
    ``Logger.emit``. Twisted's own events are not affected. ``twistd
    kerjostunt --log-level`` calls this; tests that build a server directly
    keep every event.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    filtered = _LevelFilter(globalLogPublisher, [predicate])
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "kerjostunt" or name.startswith("kerjostunt.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Logger) and (
                value.observer is globalLogPublisher
                or isinstance(value.observer, _LevelFilter)
            ):
                value.observer = filtered
    return predicate


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
    #: the explicit --interface addresses, announced so dual-stack clients probe both families
    probe_ips: list[str] = field(default_factory=list)
    probe_token_lifetime: float = 300.0
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
        self.store = AsyncStore(Database(settings.db_url), reactor)
        StoreService(self.store).setServiceParent(self)  # type: ignore[no-untyped-call]

        self.registrar = Registrar(reactor)
        self.tokens = ProbeTokens(reactor, settings.probe_token_lifetime)
        self.observations = ObservationLog()
        self.observations.subscribe(self._observed)
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
            protection=Protection(tokens=self.tokens),
        )
        self.calls = CallManager(
            reactor, settings.domain, self.registrar, self.store, self.observations, self.count,
            CallSettings(answer_timeout=settings.call_answer_timeout, outcome_timeout=settings.call_outcome_timeout,
                         invite_rate=settings.invite_rate, invite_burst=settings.invite_burst),
        )
        _CallsService(self.calls).setServiceParent(self)  # stops before the store: outcomes get written
        self.router = SignalingRouter(self.registrar, self.register, self.calls)
        self.signaling = SignalingFactory(self.router, reactor, settings.limits, counter=self.count)
        tls_factory = AdmittingTLSFactory(
            tls.server_options(self.certificates, groups=settings.tls_groups), False, self.signaling
        )
        self.ports: dict[str, Deferred[IListeningPort]] = {}
        self._listen("sip", settings.sip_endpoint, tls_factory)
        for index, endpoint in enumerate(settings.sip_extra_endpoints, 1):
            self._listen(f"sip@{index}", endpoint, tls_factory)
        for index, endpoint in enumerate(settings.probe_endpoints):
            self._listen(f"probe{index}", endpoint, self._probe_factory())
            if index < len(settings.probe_ports):
                # Announce the port really bound (it differs when configured as 0).
                self.ports[f"probe{index}"].addCallback(self._note_probe_port, index)
        if settings.web_endpoint:
            site = web.tls_factory(self)
            self._listen("web", settings.web_endpoint, site)
            for index, endpoint in enumerate(settings.web_extra_endpoints, 1):
                self._listen(f"web@{index}", endpoint, site)

    def count(self, what: str) -> None:
        self.counters[what] += 1

    def _certificates(self) -> tls.CertificatePaths:
        s = self.settings
        if s.cert is not None:
            return tls.CertificatePaths(s.cert, s.key or s.cert, None)
        return tls.ensure_certificates(s.certs_dir, s.domain, s.cert_hosts)

    def _listen(self, name: str, description: str, factory: IProtocolFactory) -> None:
        # twisted.application and endpoint parsing carry no annotations: the ignores.
        endpoint = PortRecordingEndpoint(serverFromString(self.reactor, description))  # type: ignore[no-untyped-call]
        service = StreamServerEndpointService(endpoint, factory)  # type: ignore[no-untyped-call]
        service._raiseSynchronously = True  # a busy port stops twistd with a clear error
        service.setName(name)  # type: ignore[no-untyped-call]
        service.setServiceParent(self)  # type: ignore[no-untyped-call]
        self.ports[name] = endpoint.listening

    def _note_probe_port(self, port: IListeningPort, index: int) -> IListeningPort:
        host = port.getHost()
        if isinstance(host, (IPv4Address, IPv6Address)):  # a probe endpoint is TCP
            self.settings.probe_ports[index] = host.port
        return port

    def _probe_factory(self) -> ProbeFactory:
        other = None
        if self.settings.probe_alt_ip:
            other = (self.settings.probe_alt_ip, self.settings.probe_ports[-1])
        return ProbeFactory(self.reactor, self.tokens, self.observations, other_address=other)

    def _probe_headers(self, user_id: str) -> list[tuple[str, str]]:
        token, password = self.tokens.issue(user_id)
        offer = ProbeOffer(token, password, tuple(self.settings.probe_ports),
                           int(self.settings.probe_token_lifetime), self.settings.probe_alt_ip,
                           tuple(self.settings.probe_ips))
        return offer.items()

    def _observed(self, observation: Observation) -> None:
        self.count("probes")
        nat = classify(self.observations.samples(observation.user_id))
        self.store.record_nat(observation.user_id, nat.to_dict(), observation.time).addErrback(
            nat_not_stored, observation.user_id, self.tokens, self.observations
        )
