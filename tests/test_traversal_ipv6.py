"""IPv6 through stateful firewalls, in the NAT lab (issue 17).

Dual-stack sites (``Lab(..., ipv6={...})``, tests/natlab/v6.py): each site's
box NATs IPv4 as its ``NATSpec`` says and firewalls IPv6 statefully
(unsolicited SYNs dropped, rejected with ICMPv6, or with a TCP reset). The
peers signal over IPv4; a dual-stack caller and callee each offer their
global IPv6 punch port and meet by simultaneous open over IPv6 (technique
``ipv6``), even where no IPv4 technique can (two random NATs). A site left
IPv4-only has no global IPv6 address: its pair uses IPv4 as before.

Run under the lab lock: ``flock /tmp/natlab.lock python3 -m twisted.trial
tests.test_traversal_ipv6``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable
from tests.natlab.scenario import Scenario, unique_message, wall_clock
from tests.natlab.v6 import peer_v6
from tests.test_traversal import DELAY_MS, STUNT_TECHNIQUES, peer_lines

RANDOM_DROP = NATSpec("random", inbound="drop")
RANDOM_ICMP = NATSpec("random", inbound="icmp")
RANDOM_RST = NATSpec("random", inbound="rst")
PRESERVING = NATSpec("preserving", inbound="drop")


class IPv6TraversalTests(unittest.TestCase):
    timeout = 180

    def build(self, nats: dict[str, NATSpec], ipv6: set[str]) -> Scenario:
        reason = lab_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        lab = Lab(nats, delay_ms=DELAY_MS, public_peer=False, ipv6=ipv6)
        lab.build()
        self.addCleanup(lab.teardown)
        scenario = Scenario(lab, Path(self.mktemp()))
        self.addCleanup(scenario.stop)
        return scenario

    @defer.inlineCallbacks
    def echo(self, sc: Scenario):  # type: ignore[no-untyped-def]
        yield sc.add_users(["alice", "bob"])
        yield sc.start_server()
        yield sc.start_echo_server("b1", "bob")
        since = wall_clock()
        result = yield sc.echo_client("a1", "alice", "bob", message=unique_message(6000), timeout=30.0)
        if not result.ok or result.peer != "bob":
            self.fail(f"echo-client did not connect and echo:\n{result.summary()}\n\n{sc.transcript()}")
        return result, since

    @defer.inlineCallbacks
    def check_ipv6(self, a: NATSpec, b: NATSpec):  # type: ignore[no-untyped-def]
        sc = self.build({"a": a, "b": b}, {"a", "b"})
        result, since = yield self.echo(sc)
        self.assertEqual(result.technique, "ipv6", result.summary() + "\n" + sc.transcript())
        # bob saw alice at her IPv6 address: no NAT, no server in between.
        lines = "\n".join(peer_lines(sc.processes_named("echo-server")[-1].output, "alice"))
        self.assertIn(peer_v6(1, 1), lines, sc.transcript())
        attempt = yield sc.wait_attempt("alice", "bob", since=since)
        self.assertEqual((attempt.outcome, attempt.technique), ("stunt", "ipv6"), attempt)
        self.assertIn("2001:db8:", attempt.actual or "", attempt)
        self.assert_also_at(sc, alice=True, bob=True)

    def assert_also_at(self, sc: Scenario, **dual: bool) -> None:
        """The server listens on IPv6 too: a dual-stack user's agent probed it there, and the
        registrar lists that address beside the IPv4 one (an IPv4-only user's: none)."""
        assert sc.server_process is not None
        server_log = sc.server_process.output
        for k, (user, has_v6) in enumerate(dual.items(), start=1):
            line = f"{user} is also at {peer_v6(k, 1)}"
            if has_v6:
                self.assertIn(line, server_log, sc.transcript())
            else:
                self.assertNotIn(f"{user} is also at", server_log)

    def test_random_nats_firewalls_drop(self):  # type: ignore[no-untyped-def]
        """Two random IPv4 NATs (no IPv4 technique joins them), IPv6 firewalls that drop."""
        return self.check_ipv6(RANDOM_DROP, RANDOM_DROP)

    def test_random_nats_firewalls_reject(self):  # type: ignore[no-untyped-def]
        """The same behind firewalls that reject: ICMPv6 admin-prohibited on one side, RST on the other."""
        return self.check_ipv6(RANDOM_ICMP, RANDOM_RST)

    def test_dual_stack_pair_prefers_ipv6(self):  # type: ignore[no-untyped-def]
        """Both families work (preserving NATs): IPv6 starts first and wins (RFC 8305)."""
        return self.check_ipv6(PRESERVING, PRESERVING)

    @defer.inlineCallbacks
    def test_ipv4_only_peer_with_a_dual_stack_peer(self):  # type: ignore[no-untyped-def]
        """Only the caller's site has IPv6: the call goes over IPv4, undelayed by the family race."""
        sc = self.build({"a": PRESERVING, "b": PRESERVING}, {"a"})
        result, since = yield self.echo(sc)
        self.assertIn(result.technique, STUNT_TECHNIQUES, result.summary())
        attempt = yield sc.wait_attempt("alice", "bob", since=since)
        self.assertNotIn("2001:db8:", attempt.actual or "", attempt)
        self.assert_also_at(sc, alice=True, bob=False)
