"""``kerjostunt netcheck`` behind every NAT kind the lab builds, checked against what it built.

One lab for the whole class, built by the first test that needs it, and
``kerjostunt netcheck --json`` run once in a peer of each site, all at
once, against the real server (``twistd kerjostunt``, probe ports on both
of its IPv4 addresses and on its IPv6 one):

- the nine IPv4 NATs: port allocation preserving / sequential (steps +4,
  +2, -3) / random, each answering an unsolicited SYN by dropping it, with
  a RST or with ICMP; three of them dual-stack (one per firewall kind,
  tests/natlab/v6.py), the others IPv4-only;
- a sequential NAT with a second host busy opening connections (the port
  speed);
- two random NATs whose router runs miniupnpd (tests/natlab/upnp.py): one
  granting PCP (and dual-stack; a second host there runs the text form),
  one UPnP-IGD only;
- a public host (no NAT).

Every test then checks one site's report: the mapping and allocation
(and step), the unsolicited SYN's fate, the relay-only peer kinds and the
verdict's sentence, IPv6 and the port mapping. The lab time (build,
server, every run, teardown) is printed as ``netcheck lab: N s``.

Run it under ``flock /tmp/natlab.lock``. Skips with ``lab_unavailable()``'s
(or miniupnpd's) reason where the lab cannot run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable, upnp
from tests.natlab.lab import PUBLIC_PEER_NET
from tests.natlab.scenario import PROBE_PORTS, Scenario
from tests.natlab.v6 import SERVER_V6, peer_v6

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


@dataclass(frozen=True)
class Site:
    nat: NATSpec
    ipv6: bool = False
    #: miniupnpd on the router: its switches (upnp.start), None: no mapping daemon
    mapper: dict[str, bool] | None = None
    peers: int = 1


SITES = {
    "pd": Site(NATSpec("preserving", inbound="drop"), ipv6=True),
    "pr": Site(NATSpec("preserving", inbound="rst")),
    "pi": Site(NATSpec("preserving", inbound="icmp")),
    "sd": Site(NATSpec("sequential", delta=4, inbound="drop")),
    "sr": Site(NATSpec("sequential", delta=2, inbound="rst"), ipv6=True),
    "si": Site(NATSpec("sequential", delta=-3, inbound="icmp")),
    "rd": Site(NATSpec("random", inbound="drop")),
    "rr": Site(NATSpec("random", inbound="rst"), peers=2),  # rr2 runs the text form
    "ri": Site(NATSpec("random", inbound="icmp"), ipv6=True),
    "sb": Site(NATSpec("sequential", delta=4, inbound="rst"), peers=2),  # sb2 is busy
    "mp": Site(NATSpec("random", inbound="rst"), ipv6=True, mapper={"pcp": True, "upnp": True}, peers=2),
    "mu": Site(NATSpec("random", inbound="icmp"), mapper={"pcp": False, "upnp": True}),
}

#: what netcheck calls the lab's behaviours
MAPPING = {"preserving": "endpoint-independent", "sequential": "address-and-port-dependent",
           "random": "address-and-port-dependent"}
INBOUND = {"drop": "dropped", "rst": "reset", "icmp": "icmp"}
RELAY_ONLY = {"preserving": [], "sequential": ["random NATs"], "random": ["sequential NATs", "random NATs"]}
VERDICT = {
    "preserving": "peers behind most NATs can reach you directly",
    "sequential": "only a relay will join you to peers behind random NATs; peers with a public address, "
                  "port-preserving NATs or sequential NATs can reach you directly",
    "random": "only a relay will join you to peers behind sequential NATs or random NATs; peers with a "
              "public address or port-preserving NATs can reach you directly",
}
IPV6_WORKS = "IPv6 works: peers with IPv6 reach you directly"
#: each method's answer where no daemon runs: ICMP from the router, no SSDP reply
NO_MAPPING = ["pcp: port unreachable", "nat-pmp: port unreachable", "upnp: no UPnP device answered"]


@dataclass
class Measured:
    """What the class's one lab run found, and what the lab was."""

    reports: dict[str, dict[str, Any]]
    texts: dict[str, str]
    public_ips: dict[str, str]
    ipv6: dict[str, str]
    other_address: str
    #: miniupnpd's DNAT rules left on each mapping router after the runs
    left: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _build(workdir: Path) -> tuple[Lab, dict[str, str]]:
    """The lab, miniupnpd started; the sites' public addresses."""
    lab = Lab({name: site.nat for name, site in SITES.items()}, delay_ms=DELAY_MS, public_peer=True,
              peers_per_nat={name: site.peers for name, site in SITES.items()},
              ipv6={name for name, site in SITES.items() if site.ipv6})
    lab.build()
    try:
        public = {name: lab.nats[name].ip for name in SITES}
        for name, site in SITES.items():
            if site.mapper is not None:
                upnp.start(lab, name, workdir, **site.mapper)
                public[name] = upnp.public_ip(lab, name)
    except BaseException:
        lab.teardown()
        raise
    return lab, public


@defer.inlineCallbacks
def _run_all(lab: Lab, sc: Scenario) -> Any:
    """Every site's netcheck at once (and the text form at mp2 and rr2); (reports, texts)."""
    s = lab.server
    yield sc.start_server("--interface", f"{s.ip},{SERVER_V6}")
    busy = sc.spawn("sb2", [sys.executable, "-c", _BUSY, s.ip, str(PROBE_PORTS[0]), "30"], limit=40)
    yield busy.wait_for("busy", 10)
    argv = sc.kerjostunt_argv("netcheck", "--server", s.ip, "--probe-ports", ",".join(map(str, PROBE_PORTS)))
    peers = [f"{name}1" for name in SITES] + ["public"]
    texts = ["mp2", "rr2"]
    runs = [sc.run(peer, [*argv, "--json"], limit=60) for peer in peers] + [sc.run(p, argv, limit=60) for p in texts]
    procs = yield defer.gatherResults(runs)
    reports = {}
    for peer, proc in zip(peers, procs):
        if proc.exit_code != 0:
            raise AssertionError(f"{peer}: {proc.describe_exit()}\n{proc.output}")
        reports[peer[:-1] if peer != "public" else peer] = json.loads(proc.stdout)
    return reports, {peer: proc.stdout for peer, proc in zip(texts, procs[len(peers):])}


@defer.inlineCallbacks
def measure(workdir: Path) -> Any:
    """Build, run, tear down: the reactor is clean again when this fires."""
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    lab, public = _build(workdir)
    sc = Scenario(lab, workdir / "scenario")
    try:
        reports, texts = yield _run_all(lab, sc)
        left = {name: upnp.mappings(lab, name) for name, site in SITES.items() if site.mapper is not None}
        ipv6 = {name: peer_v6(k, 1) for k, name in enumerate(SITES, start=1) if SITES[name].ipv6}
        for peer, text in texts.items():
            (workdir / f"netcheck-{peer}.txt").write_text(text)
        other = lab.server.ip2 or ""
    finally:
        yield sc.stop()
        lab.teardown()
    seconds = time.monotonic() - started
    print(f"netcheck lab: {seconds:.1f} s for {len(SITES) + 1} sites", file=sys.stderr)
    return Measured(reports, texts, public, ipv6, other, left, seconds)


def _site_test(name: str) -> Callable[[NetcheckLabTests], defer.Deferred[None]]:
    @defer.inlineCallbacks
    def test(self: NetcheckLabTests) -> Any:
        measured = yield self.measured()
        self.check_site(measured, name)

    spec = SITES[name].nat
    step = f" (step {spec.delta:+d})" if spec.allocation == "sequential" else ""
    extra = "".join(f" +{what}" for what, on in (("v6", SITES[name].ipv6), ("mapping", SITES[name].mapper)) if on)
    test.__name__ = f"test_{name}"
    test.__doc__ = f"{spec.allocation}{step}, unsolicited SYN {spec.inbound}{extra}"
    return test


class NetcheckLabTests(unittest.TestCase):
    timeout = 240
    _measured: ClassVar[Measured | Failure | None] = None

    @defer.inlineCallbacks
    def measured(self) -> Any:
        """The class's one lab run: made by the first test, read by the others."""
        reason = lab_unavailable() or upnp.unavailable()
        if reason:
            raise unittest.SkipTest(reason)
        cls = type(self)
        if cls._measured is None:
            try:
                cls._measured = yield measure(Path(self.mktemp()))
            except Exception:
                cls._measured = Failure()
        if isinstance(cls._measured, Failure):
            cls._measured.raiseException()
        return cls._measured

    def check_site(self, m: Measured, name: str) -> None:
        r, site = m.reports[name], SITES[name]
        spec = site.nat
        delta = spec.delta if spec.allocation == "sequential" else None
        got = (r["nat"]["behind_nat"], r["nat"]["mapping"], r["nat"]["allocation"], r["nat"]["delta"],
               r["inbound"], r["unreachable_peers"], r["verdict"], r["hairpin"])
        # The lab's NATs do not hairpin (docs/nat-lab.rst): a connect to our own mapping is refused.
        self.assertEqual(got, (True, MAPPING[spec.allocation], spec.allocation, delta, INBOUND[spec.inbound],
                               RELAY_ONLY[spec.allocation], VERDICT[spec.allocation], False), f"{name}: {r}")
        self.assertEqual((r["public_ip"], r["other_address"], r["errors"]), (m.public_ips[name], m.other_address, []))
        self.assertGreaterEqual(r["rtt_ms"], 2 * DELAY_MS)
        if spec.allocation == "sequential":
            busy = name == "sb"  # sb2 took ports meanwhile; nobody else did at the others
            self.assertEqual(r["ports_per_second"] > 0.0, busy, r)
        self.check_ipv6(m, name, r)
        self.check_mapping(m, name, r)

    def check_ipv6(self, m: Measured, name: str, r: dict[str, Any]) -> None:
        v6 = r["ipv6"]
        if not SITES[name].ipv6:
            self.assertEqual((v6["address"], v6["reached"], v6["detail"]), (None, False, "no global IPv6 address"))
            self.assertNotIn(IPV6_WORKS, r["other_paths"])
            return
        address = m.ipv6[name]
        # No NAT66: the server saw our own address; the firewall turned its SYN away as built.
        self.assertEqual((v6["address"], v6["server"], v6["reached"], v6["mapped"], v6["inbound"]),
                         (address, SERVER_V6, True, address, INBOUND[SITES[name].nat.inbound]), v6)
        self.assertGreaterEqual(v6["rtt_ms"], 2 * DELAY_MS)
        self.assertIn(IPV6_WORKS, r["other_paths"])

    def check_mapping(self, m: Measured, name: str, r: dict[str, Any]) -> None:
        pm, mapper = r["port_mapping"], SITES[name].mapper
        if mapper is None:
            self.assertEqual((pm["asked"], pm["method"]), (True, None), pm)
            self.assertEqual(pm["errors"], NO_MAPPING, pm)
            self.assertFalse(any("port mapping" in line for line in r["other_paths"]), r["other_paths"])
            return
        method = "pcp" if mapper["pcp"] else "upnp"
        self.assertEqual((pm["method"], pm["external_ip"], pm["deleted"]), (method, m.public_ips[name], True), pm)
        self.assertEqual(m.left[name], "", "the mapping is still on the router")
        self.assertIn(f"a port mapping makes your NAT reachable directly ({method} mapped port "
                      f"{pm['internal_port']} to {pm['external_ip']}:{pm['external_port']}): peers connect to it "
                      "without punching (the relay-only rule above does not count it yet)", r["other_paths"])

    for _name in SITES:
        locals()[f"test_{_name}"] = _site_test(_name)
    del _name

    @defer.inlineCallbacks
    def test_public(self) -> Any:
        m = yield self.measured()
        pub = m.reports["public"]
        self.assertEqual((pub["nat"]["behind_nat"], pub["inbound"], pub["public_ip"]), (False, "open", f"{PUBLIC_PEER_NET}.10"))
        self.assertEqual(pub["verdict"], "you have a public address: peers behind any NAT can reach you directly")
        self.assertEqual((pub["ipv6"]["address"], pub["port_mapping"]["errors"]), (None, NO_MAPPING))
        self.assertEqual(pub["other_paths"], [])

    @defer.inlineCallbacks
    def test_text_form(self) -> Any:
        """mp2, behind the PCP router, dual-stack: the form docs/client.rst shows; rr2 without either."""
        m = yield self.measured()
        lines = m.texts["mp2"].splitlines()
        self.assertIn(f"verdict         {VERDICT['random']}", lines)
        self.assertIn(f"                {IPV6_WORKS}", lines)
        self.assertTrue(any(line.startswith("port mapping    pcp mapped port ") and line.endswith("(deleted again)")
                            for line in lines), m.texts["mp2"])
        self.assertIn("IPv6 inbound    reset (something answers RST)", lines)
        self.assertIn("unsolicited SYN reset (something answers RST)", lines)
        plain = m.texts["rr2"].splitlines()
        self.assertIn("port mapping    no port mapping (pcp: port unreachable; nat-pmp: port unreachable; "
                      "upnp: no UPnP device answered)", plain)
        self.assertIn("IPv6            no global IPv6 address", plain)
        self.assertEqual(plain[-1], f"verdict         {VERDICT['random']}")
