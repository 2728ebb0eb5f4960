"""
Whole calls through a real coturn on 127.0.0.1: two PeerAgents, a StuntServer with ``relay`` settings.

Loopback has no NAT, so the server would never need the relay and the
direct techniques would always win: the tests make the server's gate say
``now`` and the race skip its direct attempts and its punch, which leaves
the relay as the only way (the NAT lab, tests/test_traversal_relay.py, has the
real reasons).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from kerjostunt.client.agent import PeerAgent
from kerjostunt.client.calls import ConnectFailed, race
from kerjostunt.server.relay import RelaySettings
from kerjostunt.wire import kerjo

from .loopback import WaitsForData
from .processes import free_port
from .support import DOMAIN, add_users, start_server
from .turnserver import skip_without_coturn, start_coturn


class Recorder(WaitsForData):
    pass


class RelayedCallTests(unittest.TestCase):
    timeout = 60
    coturn_extra: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        skip_without_coturn(self)
        self.coturn = yield start_coturn(self, extra=self.coturn_extra)
        yield self.start(self.coturn.secret, (self.coturn.host, self.coturn.port))

    @defer.inlineCallbacks
    def start(self, secret: bytes, address: tuple[str, int]):  # type: ignore[no-untyped-def]
        relay = RelaySettings(servers=(address,), secret=secret, lifetime=600)
        self.running = yield start_server(self, relay=relay)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        gate = self.running.server.calls.relay
        self.patch(gate, "when", lambda unjoinable, failures: kerjo.RELAY_NOW)
        self.patch(race.Dialer, "direct_candidates", lambda dialer: [])
        self.patch(race, "_hopeless", lambda own, peer: "not tried: the test leaves only the relay")
        self.recorded: defer.Deferred = defer.Deferred()
        store = self.running.server.store
        original = store.record_attempt

        def record_attempt(*args: Any, **kwargs: Any) -> defer.Deferred:
            d = original(*args, **kwargs)
            if not self.recorded.called:
                d.addCallback(lambda result: self.recorded.callback(kwargs) or result)
            return d

        self.patch(store, "record_attempt", record_attempt)

    def agent(self, user: str, password: str, **kw: Any) -> PeerAgent:
        agent = PeerAgent(reactor, server=(self.running.host, self.running.port), user_id=user, password=password,
                          domain=DOMAIN, ca_path=str(self.running.ca), tls_hostname="localhost", **kw)
        self.addCleanup(agent.stop)
        return agent

    @defer.inlineCallbacks
    def pair(self):  # type: ignore[no-untyped-def]
        bob_side: defer.Deferred = defer.Deferred()
        bob = self.agent("bob", "builder", accept_factory=Factory.forProtocol(Recorder), on_peer=bob_side.callback)
        yield bob.start()
        alice = self.agent("alice", "wonderland")
        yield alice.start()
        return alice, bob_side


class RelayedCallFlowTests(RelayedCallTests):
    @defer.inlineCallbacks
    def test_a_call_connects_through_the_relay_and_is_recorded(self):  # type: ignore[no-untyped-def]
        alice, bob_side = yield self.pair()
        connection = yield alice.connect("bob", Factory.forProtocol(Recorder), timeout=20)
        self.addCleanup(connection.protocol.transport.abortConnection)
        self.assertEqual((connection.outcome, connection.technique), ("relay", "relay"))
        # The remote is bob's relayed address on coturn, not bob's host.
        self.assertEqual(connection.remote[0], self.coturn.host)
        self.assertTrue(40000 <= connection.remote[1] <= 40999, connection.remote)
        connection.protocol.transport.write(b"hello bob\n")
        theirs = yield bob_side.addTimeout(10, reactor)
        self.addCleanup(theirs.protocol.transport.abortConnection)
        self.assertEqual(theirs.technique, "relay")
        yield theirs.protocol.wait_for(b"hello bob\n")
        theirs.protocol.transport.write(b"hello alice\n")
        yield connection.protocol.wait_for(b"hello alice\n")
        attempt = yield self.recorded
        self.assertEqual((attempt["outcome"], attempt["technique"]), ("relay", "relay"))
        self.assertEqual(self.running.server.counters["calls_relay_relay"], 1)
        from kerjostunt.server.metrics import make_registry, render
        scraped = render(make_registry(self.running.server.counters, process=False)).decode()
        self.assertIn('kerjostunt_calls_total{code="200",outcome="relay",technique="relay"} 1.0', scraped)
        self.assertEqual(self.running.server.counters["relay_offered_now"], 1)
        pairs = yield self.running.server.store.pair_outcomes("alice", 0.0)
        self.assertEqual(pairs["bob"].latest, "relay")


class FallbackTests(RelayedCallTests):
    """``when=fallback``: the caller relays once its direct techniques failed, in the same call."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.patch(self.running.server.calls.relay, "when", lambda unjoinable, failures: kerjo.RELAY_FALLBACK)

    @defer.inlineCallbacks
    def test_the_relay_after_the_direct_techniques(self):  # type: ignore[no-untyped-def]
        alice, bob_side = yield self.pair()
        connection = yield alice.connect("bob", Factory.forProtocol(Recorder), timeout=20)
        self.addCleanup(connection.protocol.transport.abortConnection)
        self.assertEqual(connection.technique, "relay")
        theirs = yield bob_side.addTimeout(10, reactor)
        self.addCleanup(theirs.protocol.transport.abortConnection)
        connection.protocol.transport.write(b"after the fallback\n")
        yield theirs.protocol.wait_for(b"after the fallback\n")
        self.assertEqual(self.running.server.counters["relay_offered_fallback"], 1)


class WrongSecretTests(RelayedCallTests):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        skip_without_coturn(self)
        self.coturn = yield start_coturn(self)
        yield self.start(b"not-coturns-secret", (self.coturn.host, self.coturn.port))

    @defer.inlineCallbacks
    def test_wrong_credentials_fail_with_a_relay_reason(self):  # type: ignore[no-untyped-def]
        alice, _ = yield self.pair()
        failure = yield self.assertFailure(alice.connect("bob", Factory.forProtocol(Recorder), timeout=15),
                                           ConnectFailed)
        self.assertTrue(failure.reason.startswith("relay: credentials refused (401"), failure.reason)
        attempt = yield self.recorded
        self.assertEqual((attempt["outcome"], attempt["technique"]), ("failed", "relay"))


class RelayDownTests(RelayedCallTests):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield self.start(b"whatever", ("127.0.0.1", free_port()))

    @defer.inlineCallbacks
    def test_no_relay_listening_fails_fast_with_a_reason(self):  # type: ignore[no-untyped-def]
        alice, _ = yield self.pair()
        started = reactor.seconds()
        failure = yield self.assertFailure(alice.connect("bob", Factory.forProtocol(Recorder), timeout=15),
                                           ConnectFailed)
        self.assertTrue(failure.reason.startswith("relay: cannot reach the relay"), failure.reason)
        self.assertLess(reactor.seconds() - started, 15)


class QuotaTests(RelayedCallTests):
    coturn_extra = ("total-quota=1",)  # bob's allocation takes the only one

    @defer.inlineCallbacks
    def test_quota_exhausted_fails_with_a_reason(self):  # type: ignore[no-untyped-def]
        alice, _ = yield self.pair()
        failure = yield self.assertFailure(alice.connect("bob", Factory.forProtocol(Recorder), timeout=15),
                                           ConnectFailed)
        self.assertTrue(failure.reason.startswith("relay: allocation quota reached (486"), failure.reason)


del RelayedCallTests  # the base runs no test of its own
