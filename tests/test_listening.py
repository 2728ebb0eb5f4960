"""Which probe listeners ``twistd kerjostunt`` opens with ``--interface`` and ``--probe-alt-ip``.

A wildcard interface already serves the alternate address; an explicit
listener beside it failed at start with "Address already in use" (issue 13).
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from kerjostunt.server.service import StuntServer
from kerjostunt.server.tap import Options, probe_endpoints


def _free_ports(count: int) -> list[int]:
    """Ports free on every address now (the kernel's choice for port 0)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ProbeEndpointTests(unittest.TestCase):
    def test_wildcard_interfaces_cover_the_alt_ip(self) -> None:
        for interface in ("", "0.0.0.0", "::"):
            endpoints = probe_endpoints([3478, 3479], interface, "192.0.2.7")
            self.assertEqual(len(endpoints), 2, interface)
            self.assertFalse(any("192.0.2.7" in e for e in endpoints))

    def test_explicit_interface_adds_alt_listeners(self) -> None:
        endpoints = probe_endpoints([3478, 3479], "198.51.100.1", "192.0.2.7")
        self.assertEqual(
            [e.split(":interface=")[1] for e in endpoints], ["198.51.100.1"] * 2 + ["192.0.2.7"] * 2
        )


class WildcardWithAltIPTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_starts_and_serves_the_alt_ip(self):  # type: ignore[no-untyped-def]
        base = Path(self.mktemp())
        base.mkdir()
        probe_a, probe_b = _free_ports(2)
        options = Options()
        options.parseOptions([
            "--interface", "0.0.0.0", "--probe-alt-ip", "127.0.0.1",
            "--probe-ports", f"{probe_a},{probe_b}", "--port", "0", "--web-port", "0",
            "--db", f"sqlite:///{base / 'db.sqlite'}", "--certs", str(base / "certs"),
        ])
        server = StuntServer(options.settings(), reactor)
        server.startService()  # raised "Address already in use" before
        self.addCleanup(server.stopService)
        ports = yield defer.gatherResults([server.ports[name] for name in sorted(server.ports)])
        bound = sorted(p.getHost().port for p in ports)
        self.assertIn(probe_a, bound)
        self.assertIn(probe_b, bound)
        self.assertEqual(sorted(server.ports), ["probe0", "probe1", "sip"])
        # The alternate address reaches the wildcard listener.
        proto = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", probe_a), Protocol())
        proto.transport.loseConnection()


class LimitOptionTests(unittest.TestCase):
    def test_defaults_and_values(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.settings().limits.max_unregistered, 10_000)
        self.assertEqual(options.settings().web_limits.max_connections, 1024)
        options = Options()
        options.parseOptions(["--max-unregistered", "50", "--web-max-connections", "7"])
        self.assertEqual(options.settings().limits.max_unregistered, 50)
        self.assertEqual(options.settings().web_limits.max_connections, 7)

    def test_probe_max_per_ip(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.settings().probe_max_per_ip, 64)
        options = Options()
        options.parseOptions(["--probe-max-per-ip", "5"])
        self.assertEqual(options.settings().probe_max_per_ip, 5)
