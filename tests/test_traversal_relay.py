"""The opt-in relay in the NAT lab: coturn in the server namespace, the server started with ``--relay``.

Pairs no technique joins (random x random, random x sequential) connect
through coturn's TCP allocations and echo; a pair that punches still
punches, with the relay configured.  Like tests/test_traversal.py, the
real ``twistd kerjostunt``, ``echo-server`` and ``echo-client`` run in the
lab's namespaces with 20 ms one-way delay on every access link.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests import test_traversal as traversal
from tests.natlab import NATSpec
from tests.natlab.relay import start_coturn
from tests.natlab.scenario import Scenario, unique_message, wall_clock
from tests.test_traversal import MESSAGE_LENGTH, PRESERVING_RST, RANDOM, STUNT_TECHNIQUES, peer_lines
from tests.turnserver import skip_without_coturn

#: a sequential NAT filtering by address and port: with a random NAT across, no punch works
SEQUENTIAL_APD = NATSpec("sequential", delta=1, inbound="drop")


class RelayTraversalTests(unittest.TestCase):
    timeout = 180
    # The lab helpers of tests/test_traversal.py (not its tests: those run there).
    _build = traversal.TraversalTests.build
    assert_echoed = traversal.TraversalTests.assert_echoed
    assert_recorded = traversal.TraversalTests.assert_recorded

    def build(self, *args, **kw) -> Scenario:  # type: ignore[no-untyped-def]
        skip_without_coturn(self)
        return self._build(*args, **kw)

    def start_relay(self, sc: Scenario) -> defer.Deferred:
        """coturn in the server namespace; fires with the server's --relay arguments."""
        return start_coturn(sc, Path(self.mktemp()))

    @defer.inlineCallbacks
    def relayed_echo(self, nat_a: NATSpec, nat_b: NATSpec):  # type: ignore[no-untyped-def]
        sc = self.build({"a": nat_a, "b": nat_b})
        relay_args = yield self.start_relay(sc)
        yield sc.add_users(["alice", "bob"])
        yield sc.start_server(*relay_args)
        yield sc.start_echo_server("b1", "bob")
        since = wall_clock()
        result = yield sc.echo_client("a1", "alice", "bob", message=unique_message(MESSAGE_LENGTH),
                                      timeout=30.0)
        return sc, result, since

    @defer.inlineCallbacks
    def check_relayed(self, nat_a: NATSpec, nat_b: NATSpec):  # type: ignore[no-untyped-def]
        sc, result, since = yield self.relayed_echo(nat_a, nat_b)
        self.assert_echoed(sc, result)
        self.assertEqual(result.technique, "relay", result.summary())
        # bob's far end is alice's relayed address: the relay's IP, not alice's NAT.
        lines = "\n".join(peer_lines(sc.processes_named("echo-server")[-1].output, "alice"))
        self.assertIn(sc.lab.server.ip, lines, sc.transcript())
        yield self.assert_recorded(sc, since, "relay", {"relay"}, {},
                                   actual_ips={sc.lab.server.ip})
        return result

    def test_random_to_random_relays(self):  # type: ignore[no-untyped-def]
        """No technique joins two random NATs: the relay does, at once (no punch first)."""
        return self.check_relayed(RANDOM, RANDOM)

    def test_random_to_sequential_relays(self):  # type: ignore[no-untyped-def]
        """A random NAT facing an address-and-port-dependent sequential one: relayed."""
        return self.check_relayed(RANDOM, SEQUENTIAL_APD)

    @defer.inlineCallbacks
    def test_a_pair_that_punches_still_punches(self):  # type: ignore[no-untyped-def]
        sc, result, since = yield self.relayed_echo(PRESERVING_RST, PRESERVING_RST)
        self.assert_echoed(sc, result)
        self.assertIn(result.technique, STUNT_TECHNIQUES, result.summary())
        yield self.assert_recorded(sc, since, "stunt", STUNT_TECHNIQUES, {})
