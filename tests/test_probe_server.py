"""Probing the running server: REGISTER's credentials, observations, stored NAT description."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from kerjostunt.client.nat.probing import ProbeError, probe_from
from kerjostunt.client.nat.sockets import reusable_socket

from .support import add_users, connect_client, start_server


class ProbeServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "pw"})
        self.client = yield connect_client(self, self.running, "alice", "pw")
        self.registration = yield self.client.register()
        self.servers = [("127.0.0.1", p) for p in self.registration.probe.ports]

    @defer.inlineCallbacks
    def test_probes_with_register_credentials_are_recorded_and_classified(self):  # type: ignore[no-untyped-def]
        offer = self.registration.probe
        holder = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        local_port = holder.getsockname()[1]
        results = yield probe_from(
            reactor, ("127.0.0.1", local_port), self.servers, username=offer.token, password=offer.password
        )
        self.assertEqual(len(results), 2)
        for result in results:
            self.assertEqual((result.mapped_ip, result.mapped_port), ("127.0.0.1", local_port))
        observed = self.running.server.observations.for_user("alice")
        self.assertEqual([o.local_port for o in observed], [local_port, local_port])
        self.assertEqual(sorted(o.server_port for o in observed), sorted(p for _, p in self.servers))
        # The NAT description is written through the store's queue before this read.
        record = yield self.running.server.store.get_user("alice")
        self.assertIsNotNone(record.nat)
        self.assertFalse(record.nat["behind_nat"])
        self.assertEqual(record.nat["allocation"], "preserving")
        self.assertEqual(self.running.server.counters["probes"], 2)

    @defer.inlineCallbacks
    def test_contact_naming_another_address_means_behind_a_nat(self):  # type: ignore[no-untyped-def]
        """Probes that kept their ports look like no NAT; the Contact's local address says otherwise."""
        registrar = self.running.server.registrar
        binding = registrar.lookup("alice")
        registrar.bind("alice", binding.connection, "<sips:alice@10.0.0.5:40000;transport=tls>", 3600)
        offer = self.registration.probe
        holder = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        yield probe_from(reactor, ("127.0.0.1", holder.getsockname()[1]), self.servers,
                         username=offer.token, password=offer.password)
        record = yield self.running.server.store.get_user("alice")
        self.assertTrue(record.nat["behind_nat"])
        self.assertEqual(record.nat["allocation"], "preserving")

    @defer.inlineCallbacks
    def test_wrong_password_recorded_nowhere(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(
            probe_from(reactor, ("127.0.0.1", 0), self.servers, username=self.registration.probe.token, password="forged"),
            ProbeError,
        )
        self.assertEqual(self.running.server.observations.for_user("alice"), [])
        record = yield self.running.server.store.get_user("alice")
        self.assertIsNone(record.nat)

    @defer.inlineCallbacks
    def test_plain_probe_answered_but_not_recorded(self):  # type: ignore[no-untyped-def]
        results = yield probe_from(reactor, ("127.0.0.1", 0), self.servers, username=None, password=None)
        self.assertEqual(len(results), 2)
        self.assertEqual(self.running.server.observations.for_user("alice"), [])
