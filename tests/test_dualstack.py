"""Dual stack (issue 17): listeners on several addresses or ``::``, a client on
``[::1]``, and the registrar's v4 and v6 addresses of one peer. Real sockets
on loopback port 0; skipped where the host has no IPv6 loopback."""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.cli.options import server_address, split_server
from kerjostunt.client.nat.probing import probe_from
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.server import web
from kerjostunt.server.service import StuntServer
from kerjostunt.server.tap import Options, split_interfaces
from kerjostunt.tcp import plain_ip

from .support import DOMAIN, RunningServer, add_users, start_loopback_server


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_V6 = _has_ipv6_loopback()
NO_V6 = "the host has no IPv6 loopback (::1)"


class InterfaceOptionTests(unittest.TestCase):
    def test_several_addresses(self) -> None:
        self.assertEqual(split_interfaces("127.0.0.1, [::1]"), ["127.0.0.1", "::1"])
        self.assertEqual(split_interfaces(""), [""])
        self.assertEqual(split_interfaces("::"), ["::"])

    def test_a_wildcard_stands_alone(self) -> None:
        for bad in ("0.0.0.0,::", "::,::1", "not-an-ip", "::1,::1"):
            self.assertRaises(ValueError, split_interfaces, bad)
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--interface", bad])

    def test_settings_listen_on_each_and_certify_them(self) -> None:
        options = Options()
        options.parseOptions(["--interface", "192.0.2.1,2001:db8::1", "--port", "5061"])
        settings = options.settings()
        self.assertEqual(settings.sip_endpoint, "tcp:5061:backlog=1024:interface=192.0.2.1")
        self.assertEqual(settings.sip_extra_endpoints, ["tcp:5061:backlog=1024:interface=2001\\:db8\\:\\:1"])
        self.assertEqual(len(settings.probe_endpoints), 4)
        self.assertEqual(len(settings.web_extra_endpoints), 1)
        self.assertIn("2001:db8::1", settings.cert_hosts)
        self.assertIn("192.0.2.1", settings.cert_hosts)

    def test_client_server_address_in_brackets(self) -> None:
        self.assertEqual(split_server("[::1]:5061"), ("::1", 5061))
        self.assertEqual(server_address("[::1]:5061"), ("::1", 5061))

    def test_ipv4_mapped_reads_as_ipv4(self) -> None:
        self.assertEqual(plain_ip("::ffff:192.0.2.9"), "192.0.2.9")
        self.assertEqual(plain_ip("2001:db8::1"), "2001:db8::1")
        self.assertEqual(plain_ip("192.0.2.9"), "192.0.2.9")


class DualStackServerTests(unittest.TestCase):
    def setUp(self) -> None:
        if not HAS_V6:
            raise unittest.SkipTest(NO_V6)

    @defer.inlineCallbacks
    def _server(self, args: list[str]):  # type: ignore[no-untyped-def]
        base = Path(self.mktemp())
        base.mkdir()
        options = Options()
        options.parseOptions([
            *args, "--port", "0", "--web-port", "0", "--probe-ports", "0,0",
            "--db", f"sqlite:///{base / 'db.sqlite'}", "--certs", str(base / "certs"), "--domain", DOMAIN,
        ])
        server = StuntServer(options.settings(), reactor)
        server.startService()
        self.addCleanup(server.stopService)
        ports = {}
        for name in sorted(server.ports):
            ports[name] = yield server.ports[name]
        return server, ports

    @defer.inlineCallbacks
    def test_wildcard_v6_serves_both_families(self):  # type: ignore[no-untyped-def]
        server, ports = yield self._server(["--interface", "::"])
        port = ports["sip"].getHost().port
        for endpoint in (TCP4ClientEndpoint(reactor, "127.0.0.1", port), TCP6ClientEndpoint(reactor, "::1", port)):
            proto = yield connectProtocol(endpoint, Protocol())
            proto.transport.loseConnection()

    @defer.inlineCallbacks
    def test_two_addresses_each_get_listeners(self):  # type: ignore[no-untyped-def]
        server, ports = yield self._server(["--interface", "127.0.0.1,::1"])
        self.assertEqual(sorted(ports), ["probe0", "probe1", "probe2", "probe3", "sip", "sip@1"])
        self.assertEqual(ports["sip"].getHost().host, "127.0.0.1")
        self.assertEqual(ports["sip@1"].getHost().host, "::1")

    @defer.inlineCallbacks
    def test_register_over_v6_with_the_generated_certificate(self):  # type: ignore[no-untyped-def]
        server, ports = yield self._server(["--interface", "::1"])
        running = RunningServer(server, "::1", ports["sip"].getHost().port, server.certificates.ca,
                                server.settings.db_url)
        add_users(running, {"alice": "pw"})
        # The certificate names ::1: the client checks the IP it dialed.
        proto = yield _client(self, running, "::1", "alice", "pw")
        registration = yield proto.register()
        self.assertEqual(registration.public_ip, "::1")
        binding = server.registrar.lookup("alice")
        self.assertEqual(binding.public_address[0], "::1")


class OtherFamilyAddressTests(unittest.TestCase):
    """A peer signaling over IPv4 that probes over IPv6 shows both addresses."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        if not HAS_V6:
            raise unittest.SkipTest(NO_V6)
        self.running, self.ports = yield start_loopback_server(
            self, web_endpoint=None,
            probe_endpoints=["tcp:0:interface=\\:\\:1", "tcp:0:interface=\\:\\:1"],
        )
        add_users(self.running, {"alice": "pw"})
        self.client = yield _client(self, self.running, "localhost", "alice", "pw")
        self.registration = yield self.client.register()

    @defer.inlineCallbacks
    def test_v6_probe_recorded_as_the_other_address(self):  # type: ignore[no-untyped-def]
        offer = self.registration.probe
        servers = [("::1", p) for p in offer.ports]
        results = yield probe_from(reactor, ("::1", 0), servers, username=offer.token, password=offer.password)
        self.assertEqual({r.mapped_ip for r in results}, {"::1"})
        binding = self.running.server.registrar.lookup("alice")
        self.assertEqual([a[0] for a in binding.addresses], ["127.0.0.1", "::1"])
        # The other family is kept out of the NAT's samples (it says nothing of the v4 NAT).
        self.assertEqual(self.running.server.observations.for_user("alice"), [])
        record = yield self.running.server.store.get_user("alice")
        document = web.peer_document(record, self.running.server.registrar)
        self.assertEqual(document["addresses"][1], f"[::1]:{binding.other_family[1]}")
        line = web.peers_text("friends", [document]).splitlines()[1]
        self.assertEqual(line.split()[3], f"[::1]:{binding.other_family[1]}")

    @defer.inlineCallbacks
    def test_a_second_v6_address_does_not_move_the_first(self):  # type: ignore[no-untyped-def]
        offer = self.registration.probe
        servers = [("::1", offer.ports[0])]
        yield probe_from(reactor, ("::1", 0), servers, username=offer.token, password=offer.password)
        first = self.running.server.registrar.lookup("alice").other_family
        self.running.server.registrar.note_address("alice", "2001:db8::66", 4000)
        self.assertEqual(self.running.server.registrar.lookup("alice").other_family, first)
        # The signaling family itself is never replaced by a probe.
        self.running.server.registrar.note_address("alice", "192.0.2.66", 4000)
        self.assertEqual(self.running.server.registrar.lookup("alice").addresses[0][0], "127.0.0.1")


@defer.inlineCallbacks
def _client(case: unittest.TestCase, running: RunningServer, hostname: str, user: str, password: str):  # type: ignore[no-untyped-def]
    options = tls.client_options(running.ca, hostname)
    proto = yield connect_signaling(
        reactor, running.host, running.port, options,
        lambda: SignalingClientProtocol(reactor, user, password, DOMAIN, None),
    )

    def close() -> defer.Deferred[object] | None:
        if proto.disconnected.called:
            return None
        proto.transport.loseConnection()
        return proto.disconnected  # type: ignore[no-any-return]

    case.addCleanup(close)
    return proto


class AgentProbesOverIPv6Tests(unittest.TestCase):
    """A dual-stack agent signaling over IPv4 probes the server's IPv6 address once:
    the registrar, and so the trusted peers list, show both of its addresses."""

    @defer.inlineCallbacks
    def test_the_registrar_learns_the_ipv6_address(self):  # type: ignore[no-untyped-def]
        if not HAS_V6:
            raise unittest.SkipTest(NO_V6)
        from twisted.internet import task

        from kerjostunt.client.agent import PeerAgent
        from tests.test_listening import _free_ports

        base = Path(self.mktemp())
        base.mkdir()
        probe_a, probe_b = _free_ports(2)
        options = Options()
        options.parseOptions([
            "--interface", "127.0.0.1,::1", "--port", "0", "--web-port", "0", "--domain", DOMAIN,
            "--probe-ports", f"{probe_a},{probe_b}",
            "--db", f"sqlite:///{base / 'db.sqlite'}", "--certs", str(base / "certs"),
        ])
        self.assertEqual(options.settings().probe_ips, ["127.0.0.1", "::1"])
        server = StuntServer(options.settings(), reactor)
        server.startService()
        self.addCleanup(server.stopService)
        ports = {}
        for name in sorted(server.ports):
            ports[name] = yield server.ports[name]
        running = RunningServer(server, "127.0.0.1", ports["sip"].getHost().port, server.certificates.ca,
                                server.settings.db_url)
        add_users(running, {"alice": "pw"})
        agent = PeerAgent(reactor, server=("127.0.0.1", running.port), user_id="alice", password="pw",
                          domain=DOMAIN, ca_path=str(running.ca), listen_port=None, punch_port_max_age=0)
        agent.find_ipv6 = lambda: "::1"  # type: ignore[method-assign]
        yield agent.start()
        self.addCleanup(agent.stop)
        for _ in range(200):  # the probe crosses loopback
            binding = server.registrar.lookup("alice")
            if binding is not None and binding.other_family is not None:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([ip for ip, _ in server.registrar.lookup("alice").addresses], ["127.0.0.1", "::1"])


class ProbeIPsHeaderTests(unittest.TestCase):
    def test_round_trip_and_junk(self) -> None:
        from kerjostunt.wire import kerjo

        offer = kerjo.ProbeOffer("t", "p", (3478, 3479), 300, None, ("198.51.100.1", "2001:db8::1"))
        headers = dict(offer.items())
        self.assertEqual(headers[kerjo.PROBE_IPS], "198.51.100.1, 2001:db8::1")
        parsed = kerjo.parse_probe_offer(headers[kerjo.PROBE], None, headers[kerjo.PROBE_IPS])
        self.assertEqual(parsed, offer)
        self.assertEqual(kerjo.parse_probe_ips("x, 2001:DB8::2, ,300"), ("2001:db8::2",))
        self.assertEqual(kerjo.parse_probe_ips(None), ())
