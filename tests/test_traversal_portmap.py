"""Port mappings in the NAT lab (issue 17): a random-port NAT whose router runs
miniupnpd, and the same NAT without it.

bob (echo-server) sits behind a random-port NAT that answers RST; alice
behind a port-preserving one that drops. With miniupnpd on bob's router,
bob's agent gets a mapping of its app port (PCP first; NAT-PMP and UPnP-IGD
with PCP off) and offers it; alice dials it directly (technique
``port-mapping``), and when bob stops the mapping is gone from the router.
Without miniupnpd the pair needs the birthday technique, as before.

Run under the lab lock: ``flock /tmp/natlab.lock python3 -m twisted.trial
tests.test_traversal_portmap``.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable, upnp
from tests.natlab.scenario import Scenario, unique_message, wall_clock
from tests.test_traversal import DELAY_MS

RANDOM = NATSpec("random", inbound="rst")
PRESERVING = NATSpec("preserving", inbound="drop")


class PortMappingTraversalTests(unittest.TestCase):
    timeout = 180

    def build(self, mapper: dict[str, bool] | None, caller: NATSpec = PRESERVING, router: str = "b") -> Scenario:
        reason = lab_unavailable() or (upnp.unavailable() if mapper is not None else None)
        if reason:
            raise unittest.SkipTest(reason)
        lab = Lab({"a": caller, "b": RANDOM}, delay_ms=DELAY_MS, public_peer=False)
        lab.build()
        self.addCleanup(lab.teardown)
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        if mapper is not None:
            upnp.start(lab, router, directory, **mapper)
        scenario = Scenario(lab, directory / "scenario")
        self.addCleanup(scenario.stop)
        return scenario

    @defer.inlineCallbacks
    def echo(self, sc: Scenario):  # type: ignore[no-untyped-def]
        yield sc.add_users(["alice", "bob"])
        yield sc.start_server()
        server = yield sc.start_echo_server("b1", "bob")
        # The gateway's answer (or its absence) before the call: UPnP-IGD's discovery alone
        # takes up to 2 s, and a call before it goes through the plain public candidate.
        yield server.wait_for(r"port \d+ mapped by \S+|no mapping of port", 20.0)
        since = wall_clock()
        result = yield sc.echo_client("a1", "alice", "bob", message=unique_message(6000), timeout=30.0)
        if not result.ok or result.peer != "bob":
            self.fail(f"echo-client did not connect and echo:\n{result.summary()}\n\n{sc.transcript()}")
        return result, since, server

    @defer.inlineCallbacks
    def check_mapped(self, method: str, **mapper: bool):  # type: ignore[no-untyped-def]
        sc = self.build(mapper)
        # The mapping is asked for as bob's agent starts.
        result, since, server = yield self.echo(sc)
        self.assertEqual(result.technique, "port-mapping", result.summary() + "\n" + sc.transcript())
        mapped = re.search(r"port (\d+) mapped by (\S+) to (\S+):(\d+)", server.output)
        self.assertIsNotNone(mapped, sc.transcript())
        self.assertEqual(mapped[2], method, sc.transcript())
        self.assertEqual(mapped[3], upnp.public_ip(sc.lab, "b"))
        self.assertTrue(upnp.mappings(sc.lab, "b"), "no DNAT rule on the router")
        attempt = yield sc.wait_attempt("alice", "bob", since=since)
        self.assertEqual(attempt.outcome, "direct", attempt)
        # Deleted when no longer needed: bob stops, the router forgets it.
        yield server.stop()
        for _ in range(50):
            if not upnp.mappings(sc.lab, "b"):
                break
            yield task.deferLater(sc.reactor, 0.1, lambda: None)
        self.assertEqual(upnp.mappings(sc.lab, "b"), "", sc.transcript())

    def test_random_nat_with_pcp(self):  # type: ignore[no-untyped-def]
        return self.check_mapped("pcp", pcp=True, upnp=True)

    def test_random_nat_with_upnp_only(self):  # type: ignore[no-untyped-def]
        return self.check_mapped("upnp", pcp=False, upnp=True)

    @defer.inlineCallbacks
    def test_random_nat_without_a_mapping_daemon(self):  # type: ignore[no-untyped-def]
        sc = self.build(None)
        result, since, server = yield self.echo(sc)
        self.assertIn(result.technique, {"birthday", "simultaneous-open"}, result.summary())
        self.assertNotIn(" mapped by ", server.output)

    @defer.inlineCallbacks
    def test_a_mapped_caller_behind_a_random_nat_calls_another(self):  # type: ignore[no-untyped-def]
        """Two random NATs (no punch joins them), the caller's router maps: the server forwards the
        call (no 488), the callee dials the caller's mapping, and the caller waits for it."""
        sc = self.build({"pcp": True, "upnp": True}, caller=RANDOM, router="a")
        yield sc.add_users(["alice", "bob"])
        yield sc.start_server()
        yield sc.start_echo_server("b1", "bob")
        since = wall_clock()
        result = yield sc.echo_client("a1", "alice", "bob", message=unique_message(6000), timeout=30.0)
        if not result.ok or result.peer != "bob":
            self.fail(f"echo-client did not connect and echo:\n{result.summary()}\n\n{sc.transcript()}")
        self.assertEqual(result.technique, "port-mapping", result.summary())
        self.assertIn(" mapped by pcp to ", result.stderr)
        attempt = yield sc.wait_attempt("alice", "bob", since=since)
        self.assertEqual(attempt.outcome, "direct", attempt)

    @defer.inlineCallbacks
    def test_a_random_nat_caller_reaches_a_mapped_callee_behind_another(self):  # type: ignore[no-untyped-def]
        """Two random NATs, the callee's router maps: its REGISTER names the mapping, so the server
        forwards the call (no 488) and the caller dials the callee's mapping (port-mapping)."""
        sc = self.build({"pcp": True, "upnp": True}, caller=RANDOM, router="b")
        result, since, server = yield self.echo(sc)
        self.assertEqual(result.technique, "port-mapping", result.summary() + "\n" + sc.transcript())
        attempt = yield sc.wait_attempt("alice", "bob", since=since)
        self.assertEqual(attempt.outcome, "direct", attempt)

    @defer.inlineCallbacks
    def test_no_port_mapping_asks_the_router_nothing(self):  # type: ignore[no-untyped-def]
        """The same pair with the caller's --no-port-mapping: nothing asked of its router, and the
        call fails as any between two random NATs does (no technique joins them)."""
        sc = self.build({"pcp": True, "upnp": True}, caller=RANDOM, router="a")
        yield sc.add_users(["alice", "bob"])
        yield sc.start_server()
        yield sc.start_echo_server("b1", "bob")
        result = yield sc.echo_client("a1", "alice", "bob", "--no-port-mapping", timeout=10.0)
        self.assertFalse(result.ok, result.summary())
        self.assertIn("both NATs allocate ports at random", result.failed or "", result.summary())
        self.assertNotIn(" mapped by ", result.stderr)
        self.assertEqual(upnp.mappings(sc.lab, "a"), "", sc.transcript())
