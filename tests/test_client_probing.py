"""Client probing against a real ProbeFactory on loopback."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from kerjostunt.client.nat.probing import ProbeError, ProbeResult, probe_from, probe_one
from kerjostunt.client.nat.sockets import reusable_socket
from kerjostunt.server.probe import ObservationLog, ProbeFactory, ProbeTokens
from kerjostunt.wire.prediction import predict


class _ClockedReactor:
    """The real reactor for I/O, a Clock for time: timeouts without waiting."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def callLater(self, *a: Any, **kw: Any) -> Any:
        return self._clock.callLater(*a, **kw)

    def seconds(self) -> float:
        return self._clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class _Silent(Protocol):
    connected: defer.Deferred[None] | None = None

    def connectionMade(self) -> None:
        if self.factory.connected is not None and not self.factory.connected.called:
            self.factory.connected.callback(None)


class ProbingTests(TestCase):
    def setUp(self) -> None:
        self.tokens = ProbeTokens(reactor)
        self.log = ObservationLog()
        self.token, self.password = self.tokens.issue("alice")
        self.ports = []
        for _ in range(2):
            port = reactor.listenTCP(0, ProbeFactory(reactor, self.tokens, self.log),
                                     interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.ports.append(port)
        self.servers = [("127.0.0.1", p.getHost().port) for p in self.ports]

    @defer.inlineCallbacks
    def test_mapped_port_is_local_port(self):
        results = yield probe_from(reactor, ("127.0.0.1", 0), self.servers,
                                   username=self.token, password=self.password)
        self.assertEqual([r.server for r in results], self.servers)
        local_port = results[0].local_port
        self.assertNotEqual(local_port, 0)
        for r in results:
            self.assertEqual(r, ProbeResult(r.server, local_port, "127.0.0.1", local_port))
        observations = self.log.for_user("alice")
        self.assertEqual([(o.local_port, o.mapped_port, o.server_port) for o in observations],
                         [(local_port, local_port, s[1]) for s in self.servers])
        p = predict(self.log.samples("alice"))
        self.assertEqual(p.ports[0], local_port)
        self.assertEqual(p.ip, "127.0.0.1")

    @defer.inlineCallbacks
    def test_given_port_is_still_usable(self):
        # The port the probes used can be bound (and listened on) again.
        holder = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        local = holder.getsockname()
        results = yield probe_from(reactor, local, self.servers,
                                   username=self.token, password=self.password)
        self.assertEqual({r.mapped_port for r in results}, {local[1]})
        again = reusable_socket(local)
        again.listen(1)
        again.close()

    @defer.inlineCallbacks
    def test_without_credentials_nothing_recorded(self):
        results = yield probe_from(reactor, ("127.0.0.1", 0), self.servers[:1],
                                   username=None, password=None)
        self.assertEqual(results[0].mapped_port, results[0].local_port)
        self.assertEqual(self.log.for_user("alice"), [])

    @defer.inlineCallbacks
    def test_bad_password(self):
        e = yield self.assertFailure(
            probe_from(reactor, ("127.0.0.1", 0), self.servers, username=self.token,
                       password="wrong"), ProbeError)
        self.assertEqual(set(e.failures), set(self.servers))
        for f in e.failures.values():
            self.assertEqual(f.value.code, 401)
        self.assertEqual(self.log.for_user("alice"), [])

    @defer.inlineCallbacks
    def test_one_server_down(self):
        dead = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        dead_addr = ("127.0.0.1", dead.getHost().port)
        yield dead.stopListening()
        results = yield probe_from(reactor, ("127.0.0.1", 0), [dead_addr] + self.servers,
                                   username=self.token, password=self.password)
        self.assertEqual([r.server for r in results], self.servers)

    def test_username_needs_password(self):
        return self.assertFailure(
            probe_one(reactor, ("127.0.0.1", 0), self.servers[0], username="x",
                      password=None), ValueError)

    @defer.inlineCallbacks
    def test_timeout_when_server_is_silent(self):
        factory = Factory.forProtocol(_Silent)
        factory.connected = defer.Deferred()
        silent = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        clock = Clock()
        d = probe_from(_ClockedReactor(clock), ("127.0.0.1", 0),
                       [("127.0.0.1", silent.getHost().port)],
                       username=self.token, password=self.password, timeout=5)
        yield factory.connected
        self.assertNoResult(d)
        clock.advance(5)
        e = yield self.assertFailure(d, ProbeError)
        [f] = e.failures.values()
        # the connect or the response timed out, depending on whether the
        # reactor had seen our side of the handshake complete yet
        self.assertTrue(f.check(defer.TimeoutError, error.TimeoutError), f)
        self.assertEqual(clock.getDelayedCalls(), [])


class _HeldRequests(Protocol):
    """Records when each request arrives and answers nothing until told."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.arrivals.append(self.transport.getHost().port)
        if self.factory.arrived is not None and len(self.factory.arrivals) == self.factory.expected:
            self.factory.arrived.callback(None)


class PipelinedProbeTests(TestCase):
    """The next probe starts once the previous request is written, not answered."""

    @defer.inlineCallbacks
    def test_all_requests_arrive_in_order_before_any_answer(self):
        factory = Factory.forProtocol(_HeldRequests)
        factory.arrivals = []
        factory.expected = 3
        factory.arrived = defer.Deferred()
        ports = [reactor.listenTCP(0, factory, interface="127.0.0.1") for _ in range(3)]
        for port in ports:
            self.addCleanup(port.stopListening)
        servers = [("127.0.0.1", p.getHost().port) for p in ports]
        clock = Clock()
        d = probe_from(_ClockedReactor(clock), ("127.0.0.1", 0), servers,
                       username="token", password="password", timeout=5.0)
        # No server answers, yet all three requests come, in the given order.
        yield factory.arrived.addTimeout(10, reactor)
        self.assertEqual(factory.arrivals, [port for _, port in servers])
        self.assertNoResult(d)
        clock.advance(5.0)  # then they time out
        failure = yield self.assertFailure(d, ProbeError)
        self.assertEqual(len(failure.failures), 3)
