"""A group behind three NATs: ``kerjostunt join`` end to end in the NAT lab.

Issue 6's last Must show: three peers of one group behind three NATs all
reach each other through ``kerjostunt join``, and each signaling connection
is closed afterwards.

The lab (``tests/natlab``) has three NATs, 20 ms one-way delay on every
access link, and one peer behind each:

=====  ==========================  ======  =====
NAT    behaviour                   host    user
=====  ==========================  ======  =====
a      preserving, inbound RST     a1      alice
b      preserving, inbound drop    b1      bob
c      sequential (d=1), drop      c1      carol
=====  ==========================  ======  =====

so the three pairs are preserving/preserving (a-b) and preserving/sequential
(a-c, b-c), with both RST-answering and silent NATs.  The real ``twistd
kerjostunt`` (signaling, probes, calls, and its HTTPS service for the trusted
peers list) runs in the server namespace; ``kerjostunt join`` runs in each
peer namespace (``tests/natlab/scenario.py``).  Every wait is for a line a
process prints or a poll of a child process, each with a reactor-driven
deadline; nothing sleeps.

Checked:

- every member prints ``peer X connected via TECHNIQUE`` (a STUNT technique)
  for both others, ``says: hello from X`` for both, sees its own hello echoed
  twice, and ends with ``signaling closed (all 2 peers done)``;
- the data went peer to peer: the core router counts data-carrying TCP
  segments between each pair of NAT public addresses, and each peer
  namespace's established TCP connections (``ss``) go to exactly the other
  two NATs' public addresses, none to the server;
- the server agrees: ``/health`` (HTTPS, fetched inside the server
  namespace) counts 0 registered peers, and the database holds an attempt
  for each pair with outcome ``stunt``, and all three "use STUNT" flags are
  ``stunt``;
- killing one member (SIGKILL): the other two print ``signaling opened
  (carol dropped)`` and register again (``/health`` counts 2).

Skips with ``lab_unavailable()``'s reason where the lab cannot run.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from itertools import combinations
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable
from tests.natlab.scenario import Scenario, wall_clock

DELAY_MS = 20.0
#: The server's HTTPS port: ``join`` fetches the trusted peers list there,
#: the test reads ``/health`` there.
WEB_PORT = 8443
GROUP = "friends"
#: host -> (NAT behaviour, user)
MEMBERS = {
    "a1": (NATSpec("preserving", inbound="rst"), "alice"),
    "b1": (NATSpec("preserving", inbound="drop"), "bob"),
    "c1": (NATSpec("sequential", delta=1, inbound="drop"), "carol"),
}
#: What ``join`` may report for a peer behind another NAT (docs/protocol.rst).
STUNT_TECHNIQUES = {"simultaneous-open", "low-ttl", "accepted", "birthday"}
#: An IP packet longer than this carries TCP payload (20 bytes IP, 20 TCP,
#: 12 of timestamp option).
HEADERS = 52

#: Run in the server namespace: GET the URL over TLS verified with the CA,
#: print the body; exit 1 with the error on failure.
_HTTPS_GET = r"""
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
try:
    print(urllib.request.urlopen(sys.argv[1], context=ctx, timeout=5).read().decode())
except Exception as e:
    print("error: %s" % e)
    sys.exit(1)
"""


class GroupTraversalTests(unittest.TestCase):
    timeout = 240

    def build(self) -> Scenario:
        reason = lab_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        nats = {host[0]: spec for host, (spec, _) in MEMBERS.items()}
        lab = Lab(nats, delay_ms=DELAY_MS, public_peer=False)
        lab.build()
        self.addCleanup(lab.teardown)
        sc = Scenario(lab, Path(self.mktemp()))
        self.addCleanup(sc.stop)  # LIFO: before the lab goes
        return sc

    # -- helpers the harness lacks -------------------------------------------------

    @defer.inlineCallbacks
    def health(self, sc: Scenario):
        """The server's ``/health`` document, or None if it did not answer."""
        url = f"https://{sc.lab.server.ip}:{WEB_PORT}/health"
        proc = yield sc.run("server", [sys.executable, "-c", _HTTPS_GET, url, str(sc.ca)],
                            limit=20.0, name="health")
        if proc.exit_code != 0:
            return None
        return json.loads(proc.stdout)

    @defer.inlineCallbacks
    def wait_health(self, sc: Scenario, registered: int, timeout: float):
        """Polls ``/health`` until it answers with ``registered`` peers."""
        deadline = sc.reactor.seconds() + timeout
        seen = None
        while True:
            seen = yield self.health(sc)
            if seen is not None and seen.get("registered") == registered:
                return seen
            if sc.server_process is not None and not sc.server_process.running:
                self.fail("the server exited\n" + sc.transcript())
            if sc.reactor.seconds() > deadline:
                self.fail(f"/health never counted {registered} registered within "
                          f"{timeout:g} s (last: {seen})\n" + sc.transcript())
            yield task.deferLater(sc.reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def established(self, sc: Scenario, host: str):
        """Remote ip:port of every established TCP connection in ``host``."""
        proc = yield sc.run(host, ["ss", "-Htn", "state", "established"], limit=20.0,
                            name=f"{host}:ss")
        self.assertEqual(proc.exit_code, 0, proc.output)
        # Columns: Recv-Q Send-Q Local:Port Peer:Port (no State with a filter).
        return [line.split()[3] for line in proc.stdout.splitlines() if line.strip()]

    # -- the test -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_three_members_behind_three_nats(self):
        sc = self.build()
        users = {host: user for host, (_, user) in MEMBERS.items()}
        public = {user: sc.public_ip(host) for host, user in users.items()}
        server_ips = {sc.lab.server.ip, sc.lab.server.ip2}
        for x, y in combinations(users.values(), 2):
            yield sc.count_traffic_data(f"{x}-{y}", public[x], public[y], HEADERS + 1)

        yield sc.add_users(list(users.values()), {GROUP: list(users.values())})
        yield sc.start_server(web_port=WEB_PORT)  # join passes --web-port too
        yield self.wait_health(sc, registered=0, timeout=30.0)
        since = wall_clock()
        started = sc.reactor.seconds()
        procs = {user: sc.start_join(host, user, GROUP, limit=200.0)
                 for host, user in users.items()}

        waits = []
        for me, proc in procs.items():
            for other in procs:
                if other == me:
                    continue
                waits.append(proc.wait_for(rf"^peer {other} connected via (\S+)", 90.0))
                waits.append(proc.wait_for(rf"says: hello from {other}$", 90.0))
            waits.append(proc.wait_for(rf"(?s)(echoed: hello from {me}$.*){{2}}", 90.0))
            waits.append(proc.wait_for(r"^signaling closed \(all 2 peers done\)$", 90.0))
        try:
            yield defer.gatherResults(waits, consumeErrors=True)
        except defer.FirstError as e:
            self.fail(f"{e.subFailure.getErrorMessage()}\n\n{sc.transcript()}")
        took = sc.reactor.seconds() - started

        # The server's view: nobody registered any more.
        yield self.wait_health(sc, registered=0, timeout=15.0)

        for me, proc in procs.items():
            out = proc.stdout
            self.assertTrue(proc.running, sc.transcript())
            for other in procs:
                if other == me:
                    continue
                for m in re.finditer(rf"^peer {other} connected via (\S+)", out, re.M):
                    self.assertIn(m[1], STUNT_TECHNIQUES, f"{me}: {m[0]}\n{out}")
            self.assertNotIn("unreachable", out)
            signaling = re.findall(r"^signaling .*$", out, re.M)
            self.assertEqual(signaling[-1], "signaling closed (all 2 peers done)",
                             f"{me}:\n{out}")

        # Peer to peer: each namespace holds connections to the other two
        # NATs' public addresses only (signaling closed: none to the server).
        for host, me in users.items():
            remotes = yield self.established(sc, host)
            ips = [r.rsplit(":", 1)[0] for r in remotes]
            expected = {public[u] for u in users.values() if u != me}
            self.assertEqual(set(ips), expected, f"{me}: established {remotes}")
            self.assertFalse(set(ips) & server_ips, f"{me}: established {remotes}")
            self.assertEqual(len(ips), 2, f"{me}: established {remotes}")
        counters = yield sc.read_counters()
        for x, y in combinations(users.values(), 2):
            packets, _ = counters[f"{x}-{y}"]
            # At least both hellos and both echoes crossed between the NATs.
            self.assertGreaterEqual(packets, 4, f"{x}-{y}: {counters}")

        # The database: an attempt per pair, outcome stunt; flags stunt.
        for x, y in combinations(users.values(), 2):
            rows = yield sc.attempts(x)
            pair = [a for a in rows if {a.caller, a.callee} == {x, y} and a.when >= since - 1]
            self.assertTrue(pair, f"no attempt between {x} and {y}: {rows}")
            for a in pair:
                self.assertIn(a.outcome, {"stunt", "direct", "failed"}, a)
            ok = [a for a in pair if a.outcome == "stunt"]
            self.assertTrue(ok, f"{x}-{y}: no stunt attempt in {pair}")
            for a in ok:
                self.assertIn(a.technique, STUNT_TECHNIQUES, a)
                self.assertIsNotNone(a.actual, a)
                self.assertIn(a.actual.rsplit(":", 1)[0], {public[x], public[y]}, a)
        for user in users.values():
            record = yield sc.user(user)
            self.assertEqual(record.stunt_state, "stunt", record)
        print(f"\nall three connected and hung up {took:.1f} s after starting; "
              f"techniques: " + ", ".join(
                  f"{me}: " + "/".join(re.findall(r"^peer \S+ connected via (\S+)",
                                                  p.stdout, re.M))
                  for me, p in procs.items()))

        # One member dies: the other two see it drop and open signaling again.
        procs["carol"].kill(signal.SIGKILL)
        yield procs["carol"].ended
        try:
            yield defer.gatherResults(
                [procs[u].wait_for(r"^signaling opened \(carol dropped\)$", 30.0)
                 for u in ("alice", "bob")], consumeErrors=True)
        except defer.FirstError as e:
            self.fail(f"{e.subFailure.getErrorMessage()}\n\n{sc.transcript()}")
        yield self.wait_health(sc, registered=2, timeout=30.0)
