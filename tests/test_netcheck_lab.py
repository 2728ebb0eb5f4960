"""``kerjostunt netcheck`` behind every NAT kind the lab builds, checked against what it built.

One lab: a preserving NAT answering RST, a sequential one (step 4) dropping
unsolicited SYNs, a random one rejecting them with ICMP, and a public peer (and a second
host behind the sequential NAT, busy opening connections for the port speed);
the real server (``twistd kerjostunt``, probe ports on both of its
addresses) and ``kerjostunt netcheck --json`` in each peer, all at once.
Run it under ``flock /tmp/natlab.lock``. Skips with ``lab_unavailable()``'s
reason where the lab cannot run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable
from tests.natlab.scenario import PROBE_PORTS, Scenario

DELAY_MS = 20.0

#: Another host behind the NAT: a new connection (a new NAT port) every 0.1 s for argv[3] seconds.
_BUSY = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[3])
print("busy", flush=True)
while time.monotonic() < end:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
    except OSError:
        pass
    time.sleep(0.1)
"""

NATS = {
    "p": NATSpec("preserving", inbound="rst"),
    "s": NATSpec("sequential", delta=4, inbound="drop"),
    "r": NATSpec("random", inbound="icmp"),
}
#: what each lab NAT is, in netcheck's words: (mapping, allocation, delta, inbound, peers only a relay joins)
EXPECTED = {
    "p": ("endpoint-independent", "preserving", None, "reset", []),
    "s": ("address-and-port-dependent", "sequential", 4, "dropped", ["random NATs"]),
    "r": ("address-and-port-dependent", "random", None, "icmp", ["sequential NATs", "random NATs"]),
}


class NetcheckLabTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_every_nat_kind(self) -> Any:
        reason = lab_unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        lab = Lab(NATS, delay_ms=DELAY_MS, public_peer=True, peers_per_nat={"s": 2})
        lab.build()
        self.addCleanup(lab.teardown)
        sc = Scenario(lab, Path(self.mktemp()))
        self.addCleanup(sc.stop)
        yield sc.start_server()
        argv = sc.kerjostunt_argv("netcheck", "--server", lab.server.ip, "--json",
                                  "--probe-ports", ",".join(map(str, PROBE_PORTS)))
        peers = [*NATS, "public"]
        procs = yield defer.gatherResults([sc.run(f"{p}1" if p != "public" else p, argv, limit=60)
                                           for p in peers])
        reports = {}
        for peer, proc in zip(peers, procs):
            self.assertEqual(proc.exit_code, 0, f"{peer}: {proc.output}")
            reports[peer] = json.loads(proc.stdout)
        for name, (mapping, allocation, delta, inbound, relay_only) in EXPECTED.items():
            r = reports[name]
            got = (r["nat"]["behind_nat"], r["nat"]["mapping"], r["nat"]["allocation"], r["nat"]["delta"],
                   r["inbound"], r["unreachable_peers"], r["hairpin"])
            # The lab's NATs do not hairpin (docs/nat-lab.rst): a connect to our own mapping is refused.
            self.assertEqual(got, (True, mapping, allocation, delta, inbound, relay_only, False), f"{name}: {r}")
            self.assertEqual(r["public_ip"], lab.nats[name].ip)
            self.assertEqual(r["other_address"], lab.server.ip2)
            self.assertGreaterEqual(r["rtt_ms"], 2 * DELAY_MS)
            self.assertEqual(r["errors"], [])
        self.assertEqual(reports["p"]["verdict"], "peers behind most NATs can reach you directly")
        self.assertTrue(reports["s"]["verdict"].startswith("only a relay will join you to peers behind random NATs"))
        self.assertEqual(reports["s"]["ports_per_second"], 0.0)  # nobody else behind that NAT
        # The text form, for people (docs/client.rst shows one).
        text = yield sc.run("s1", argv[:-3] + argv[-2:], limit=60)
        (sc.workdir / "netcheck-s1.txt").write_text(text.stdout)
        self.assertIn("verdict         only a relay will join you to peers behind random NATs", text.stdout)
        self.assertIn("unsolicited SYN dropped (no answer)", text.stdout)
        # Port speed: s2, behind the same sequential NAT, opens ~10 connections a second meanwhile.
        busy = sc.spawn("s2", [sys.executable, "-c", _BUSY, lab.server.ip, str(PROBE_PORTS[0]), "6"], limit=20)
        yield busy.wait_for("busy", 10)
        loaded = yield sc.run("s1", argv + ["--wait", "2"], limit=60)
        report = json.loads(loaded.stdout)
        self.assertEqual(report["nat"]["allocation"], "sequential", report)
        self.assertGreater(report["ports_per_second"], 0.0, report)
        (sc.workdir / "netcheck-s1-busy.json").write_text(loaded.stdout)
        pub = reports["public"]
        self.assertEqual((pub["nat"]["behind_nat"], pub["inbound"], pub["public_ip"]),
                         (False, "open", lab.peers["public"].ip))
        self.assertEqual(pub["verdict"], "you have a public address: peers behind any NAT can reach you directly")
