"""Smoke tests of the NAT lab itself: it does what docs/nat-lab.rst claims.

No reactor work happens here: each test builds a lab (a fraction of a
second), runs small plain-socket Python scripts inside its namespaces and
blocks on them.  Timing is asserted as a lower bound only (the delay is at
least the configured one), never as an upper bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.natlab import Lab, NATSpec, lab_unavailable
from tests.natlab.lab import list_netns, sweep_stale
from tests.natlab.nat import SEQUENTIAL_BASE, SEQUENTIAL_TOP

# A small socket tool run as `python3 -c TOOL SUBCOMMAND ...` inside the
# lab's namespaces.  Every result is one JSON object a line on stdout.
TOOL = r'''
import argparse, errno, json, socket, sys, threading, time

def out(obj):
    print(json.dumps(obj), flush=True)

def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)

def serve(a):
    # Tell every client the address it came from, then echo.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.host, a.port))
    s.listen(128)
    out({"port": s.getsockname()[1]})
    def handle(c, peer):
        with c:
            out({"accepted": list(peer)})
            c.sendall(("%s %d\n" % peer).encode())
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)
    while True:
        c, peer = s.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()

def connect(a):
    for target in a.targets:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if a.bind:
            s.bind(("", a.bind))
        if a.ttl:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, a.ttl)
        s.settimeout(a.timeout)
        rec = {"target": target}
        t0 = time.monotonic()
        try:
            s.connect(addr(target))
            rec["connect_s"] = time.monotonic() - t0
            rec["local"] = s.getsockname()[1]
            f = s.makefile("rb")
            ip, port = f.readline().split()
            rec["observed"] = [ip.decode(), int(port)]
            t1 = time.monotonic()
            s.sendall(b"ping\n")
            f.readline()
            rec["echo_s"] = time.monotonic() - t1
        except socket.timeout:
            rec["error"] = "timeout"
        except OSError as e:
            rec["error"] = errno.errorcode.get(e.errno, str(e.errno))
        rec["elapsed_s"] = time.monotonic() - t0
        s.close()
        out(rec)

def simopen(a):
    # Dial the peer from a fixed port at wall time a.start, again and again
    # on RST/timeout until connected or a.deadline; never listen.
    time.sleep(max(0.0, a.start - time.time()))
    attempts, errors = 0, []
    while time.time() < a.deadline:
        attempts += 1
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("", a.bind))
        s.settimeout(1.0)
        try:
            s.connect(addr(a.target))
            break
        except (socket.timeout, OSError) as e:
            errors.append(getattr(e, "errno", None) and errno.errorcode.get(e.errno) or "timeout")
            s.close()
            time.sleep(0.02)
    else:
        out({"connected": False, "attempts": attempts, "errors": errors})
        return
    s.settimeout(5.0)
    s.sendall((a.name + "\n").encode())
    said = s.makefile("rb").readline().decode().strip()
    out({"connected": True, "attempts": attempts, "errors": errors,
         "peer": list(s.getpeername()), "peer_said": said})
    time.sleep(0.5)  # let the other side read before the close
    s.close()

def prime(a):
    # Low-TTL priming: listen on a.bind, send one SYN from it with a.ttl
    # towards a.target (it dies in transit), then accept whoever comes.
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind(("", a.bind))
    ls.listen(8)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("", a.bind))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, a.ttl)
    s.settimeout(3.0)
    try:
        s.connect(addr(a.target))
        err = None
    except socket.timeout:
        err = "timeout"
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
    s.close()
    out({"primed": err})
    ls.settimeout(a.timeout)
    try:
        c, peer = ls.accept()
    except socket.timeout:
        out({"accepted": None})
        return
    out({"accepted": list(peer)})
    c.sendall(("%s %d\n" % peer).encode())
    c.recv(100)
    c.sendall(b"ok\n")
    c.close()

def udprecv(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    s.bind(("", 0))
    out({"port": s.getsockname()[1]})
    s.settimeout(a.timeout)
    got = []
    try:
        while len(got) < a.count:
            data, _ = s.recvfrom(2048)
            got.append(int(data.split(b" ")[0]))
    except socket.timeout:
        pass
    out({"received": got})

def udpsend(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pad = b" " + b"x" * 200
    for i in range(a.count):
        s.sendto(str(i).encode() + pad, addr(a.target))
    out({"sent": a.count})

p = argparse.ArgumentParser()
sub = p.add_subparsers(dest="cmd", required=True)
x = sub.add_parser("serve"); x.add_argument("host"); x.add_argument("port", type=int)
x.set_defaults(fn=serve)
x = sub.add_parser("connect"); x.add_argument("targets", nargs="+")
x.add_argument("--bind", type=int, default=0); x.add_argument("--ttl", type=int, default=0)
x.add_argument("--timeout", type=float, default=5.0); x.set_defaults(fn=connect)
x = sub.add_parser("simopen"); x.add_argument("target"); x.add_argument("--bind", type=int, required=True)
x.add_argument("--start", type=float, required=True); x.add_argument("--deadline", type=float, required=True)
x.add_argument("--name", required=True); x.set_defaults(fn=simopen)
x = sub.add_parser("prime"); x.add_argument("target"); x.add_argument("--bind", type=int, required=True)
x.add_argument("--ttl", type=int, required=True); x.add_argument("--timeout", type=float, default=10.0)
x.set_defaults(fn=prime)
x = sub.add_parser("udprecv"); x.add_argument("count", type=int)
x.add_argument("--timeout", type=float, default=3.0); x.set_defaults(fn=udprecv)
x = sub.add_parser("udpsend"); x.add_argument("target"); x.add_argument("count", type=int)
x.set_defaults(fn=udpsend)
a = p.parse_args()
a.fn(a)
'''

DELAY_MS = 20.0


class LabTestCase(unittest.TestCase):
    """Builds a lab per test and always tears it down (addCleanup)."""

    def setUp(self) -> None:
        reason = lab_unavailable()
        if reason:
            raise unittest.SkipTest(reason)

    def make_lab(self, nats: dict[str, NATSpec], **kw) -> Lab:
        lab = Lab(nats, **kw)
        self.addCleanup(lab.teardown)
        lab.build()
        return lab

    def tool(self, lab: Lab, host, *args: str, timeout: float = 30.0) -> list[dict]:
        proc = lab.run(host, lab.python_argv(TOOL, *args), timeout=timeout)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return [json.loads(line) for line in proc.stdout.splitlines() if line]

    def start_tool(self, lab: Lab, host, *args: str) -> tuple[subprocess.Popen, dict]:
        """Start a long-running tool (server/receiver); returns it and its
        first line (which carries the port it bound)."""
        proc = lab.popen(host, lab.python_argv(TOOL, *args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        if not first:
            self.fail(f"tool {args} did not start: {proc.stderr.read()}")
        return proc, json.loads(first)

    def server(self, lab: Lab, host=None, bind: str = "0.0.0.0") -> tuple[subprocess.Popen, int]:
        proc, first = self.start_tool(lab, host or lab.server, "serve", bind, "0")
        return proc, first["port"]

    def observe(self, lab: Lab, host, target: str, count: int = 1, **opts) -> list[dict]:
        args = ["connect", *([target] * count)]
        for key, value in opts.items():
            args += [f"--{key}", str(value)]
        return self.tool(lab, host, *args)


class DelayTests(LabTestCase):
    def test_rtt_at_least_configured(self) -> None:
        """peer->server RTT >= 2*(20+0) ms, peer->peer RTT >= 4*20 ms."""
        lab = self.make_lab({"a": NATSpec()}, delay_ms=DELAY_MS)
        _, port = self.server(lab)
        _, pport = self.server(lab, lab.peers["public"])
        to_server = self.observe(lab, lab.peers["a1"], f"{lab.server.ip}:{port}", 5)
        to_peer = self.observe(lab, lab.peers["a1"],
                               f"{lab.peers['public'].ip}:{pport}", 5)
        floor_server = 2 * DELAY_MS / 1000.0
        floor_peer = 4 * DELAY_MS / 1000.0
        for rec in to_server:
            self.assertNotIn("error", rec)
            self.assertGreaterEqual(rec["connect_s"], floor_server)
            self.assertGreaterEqual(rec["echo_s"], floor_server)
        for rec in to_peer:
            self.assertNotIn("error", rec)
            self.assertGreaterEqual(rec["connect_s"], floor_peer)
            self.assertGreaterEqual(rec["echo_s"], floor_peer)
        report("rtt a1->server connect_s", [r["connect_s"] for r in to_server])
        report("rtt a1->server echo_s", [r["echo_s"] for r in to_server])
        report("rtt a1->public connect_s", [r["connect_s"] for r in to_peer])
        report("rtt a1->public echo_s", [r["echo_s"] for r in to_peer])

    def test_delay_keeps_order_and_loses_nothing(self) -> None:
        """A burst of numbered UDP datagrams through the core arrives whole
        and in order (the daemon releases a flow in arrival order)."""
        lab = self.make_lab({"a": NATSpec()})
        pub = lab.peers["public"]
        recv, first = self.start_tool(lab, pub, "udprecv", "500")
        self.tool(lab, lab.peers["a1"], "udpsend", f"{pub.ip}:{first['port']}", "500")
        out, _ = recv.communicate(timeout=30)
        got = json.loads(out.splitlines()[-1])["received"]
        self.assertEqual(got, list(range(500)))


class AllocationTests(LabTestCase):
    def test_preserving_keeps_port_endpoint_independent(self) -> None:
        lab = self.make_lab({"a": NATSpec("preserving")})
        a1 = lab.peers["a1"]
        _, port = self.server(lab)
        _, port2 = self.server(lab)
        local = 40000 + os.getpid() % 10000
        recs = self.tool(lab, a1, "connect", "--bind", str(local),
                         f"{lab.server.ip}:{port}", f"{lab.server.ip2}:{port}",
                         f"{lab.server.ip}:{port2}")
        for rec in recs:
            self.assertNotIn("error", rec)
            self.assertEqual(rec["observed"], [a1.nat_public_ip, local])

    def test_sequential_steps_by_delta(self) -> None:
        lab = self.make_lab({
            "b": NATSpec("sequential", delta=1),
            "c": NATSpec("sequential", delta=7),
            "d": NATSpec("sequential", delta=-3),
        })
        _, port = self.server(lab)
        for name, delta in (("b", 1), ("c", 7), ("d", -3)):
            recs = self.observe(lab, lab.peers[f"{name}1"],
                                f"{lab.server.ip}:{port}", 6)
            ports = [r["observed"][1] for r in recs]
            report(f"sequential d={delta} ports", ports)
            self.assertEqual([b - a for a, b in zip(ports, ports[1:])],
                             [delta] * 5, ports)
            start = SEQUENTIAL_BASE if delta > 0 else SEQUENTIAL_TOP
            self.assertEqual(ports[0], start)  # nothing else used the NAT yet
            self.assertEqual({r["observed"][0] for r in recs},
                             {lab.nats[name].ip})

    def test_sequential_is_address_and_port_dependent(self) -> None:
        """Even the same local port gets a new public port per destination."""
        lab = self.make_lab({"b": NATSpec("sequential", delta=4)})
        _, port = self.server(lab)
        recs = self.tool(lab, lab.peers["b1"], "connect", "--bind", "41000",
                         f"{lab.server.ip}:{port}", f"{lab.server.ip2}:{port}")
        ports = [r["observed"][1] for r in recs]
        self.assertEqual(ports[1] - ports[0], 4)

    def test_random_scatters_ports(self) -> None:
        lab = self.make_lab({"r": NATSpec("random")})
        _, port = self.server(lab)
        recs = self.observe(lab, lab.peers["r1"], f"{lab.server.ip}:{port}", 8)
        ports = [r["observed"][1] for r in recs]
        locals_ = [r["local"] for r in recs]
        report("random ports", ports)
        steps = {b - a for a, b in zip(ports, ports[1:])}
        self.assertGreater(len(steps), 3, ports)  # no constant delta
        self.assertGreater(max(ports) - min(ports), 1000, ports)
        self.assertLessEqual(sum(p == local for p, local in zip(ports, locals_)), 1)

    def test_two_peers_share_public_ip(self) -> None:
        lab = self.make_lab({"a": NATSpec()}, peers_per_nat={"a": 2})
        a1, a2 = lab.peers["a1"], lab.peers["a2"]
        _, port = self.server(lab)
        r1 = self.observe(lab, a1, f"{lab.server.ip}:{port}")[0]
        r2 = self.observe(lab, a2, f"{lab.server.ip}:{port}")[0]
        self.assertEqual(r1["observed"][0], r2["observed"][0])
        self.assertEqual(r1["observed"][0], a1.nat_public_ip)
        self.assertNotEqual(a1.ip, a2.ip)
        # They also reach each other directly on their LAN (host candidates).
        _, lport = self.server(lab, a2)
        direct = self.observe(lab, a1, f"{a2.ip}:{lport}")[0]
        self.assertEqual(direct["observed"][0], a1.ip)


class InboundTests(LabTestCase):
    def test_unsolicited_syn_drop_rst_icmp(self) -> None:
        lab = self.make_lab({
            "d": NATSpec(inbound="drop"),
            "r": NATSpec(inbound="rst"),
            "i": NATSpec(inbound="icmp"),
        })
        pub = lab.peers["public"]
        seen = {}
        for name in ("d", "r", "i"):
            rec = self.observe(lab, pub, f"{lab.nats[name].ip}:45000",
                               timeout=2.0)[0]
            seen[name] = rec["error"]
        report("unsolicited SYN outcome", seen)
        self.assertEqual(seen, {"d": "timeout", "r": "ECONNREFUSED",
                                "i": "EHOSTUNREACH"})


class TTLTests(LabTestCase):
    def test_low_ttl_syn_dies_in_transit(self) -> None:
        """NAT is hop 1, core router hop 2: TTL 2 leaves the NAT (creating
        the mapping) but never reaches the server; TTL 3 does."""
        lab = self.make_lab({"a": NATSpec()})
        a1 = lab.peers["a1"]
        server, port = self.server(lab)
        target = f"{lab.server.ip}:{port}"
        low = self.tool(lab, a1, "connect", "--ttl", "1", "--timeout", "2", target,
                        "--bind", "42001")
        low += self.tool(lab, a1, "connect", "--ttl", "2", "--timeout", "2", target,
                         "--bind", "42002")
        report("low TTL (1, 2) connect", [(r.get("error"), round(r["elapsed_s"] * 1000, 1)) for r in low])
        for rec in low:
            self.assertIn("error", rec)
        ok = self.tool(lab, a1, "connect", "--ttl", "3", target, "--bind", "42003")
        self.assertEqual(ok[0]["observed"], [a1.nat_public_ip, 42003])
        # The server accepted exactly one connection: the TTL 3 one.
        server.terminate()
        out, _ = server.communicate(timeout=10)
        accepted = [json.loads(line)["accepted"] for line in out.splitlines()
                    if "accepted" in line]
        self.assertEqual(accepted, [[a1.nat_public_ip, 42003]])


class HolePunchTests(LabTestCase):
    def test_low_ttl_priming_opens_the_mapping(self) -> None:
        """Behind a NAT that answers unsolicited SYNs with RST, a TTL 2 SYN
        (it dies at the core router) creates the mapping: the public peer's
        SYN to it is then let through to a1 instead of being refused."""
        lab = self.make_lab({"a": NATSpec("preserving", inbound="rst")})
        a1, pub = lab.peers["a1"], lab.peers["public"]
        pa, pp = 44001, 44002
        unprimed = self.tool(lab, pub, "connect", "--bind", str(pp + 1),
                             f"{a1.nat_public_ip}:{pa}", "--timeout", "2")[0]
        self.assertEqual(unprimed["error"], "ECONNREFUSED")
        primer = lab.popen(a1, lab.python_argv(TOOL, "prime", f"{pub.ip}:{pp}",
                                               "--bind", str(pa), "--ttl", "2"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = primer.stdout.readline()
        if not line:
            self.fail(primer.stderr.read())
        primed = json.loads(line)
        # Linux aborts a SYN_SENT socket on the router's ICMP time exceeded.
        report("TTL 2 priming SYN saw", primed)
        dial = lab.popen(pub, lab.python_argv(TOOL, "connect", "--bind", str(pp),
                                              f"{a1.nat_public_ip}:{pa}",
                                              "--timeout", "2"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        recv = []
        for _ in range(40):
            ss = lab.run(a1, ["ss", "-Htn", "state", "syn-recv"])
            recv = [line.split()[-1] for line in ss.stdout.splitlines()]
            if recv:
                break
            time.sleep(0.05)
        self.assertIn(f"{pub.ip}:{pp}", recv)
        out, _ = dial.communicate(timeout=10)
        # a1's listener answers with a fresh ISN, outside the window conntrack
        # learned from the priming SYN: the NAT drops that SYN-ACK as invalid,
        # so completing the handshake needs a socket in SYN_SENT on a1's side
        # (simultaneous open), not a listener.
        self.assertNotEqual(json.loads(out).get("error"), "ECONNREFUSED")

    def test_simultaneous_open_through_preserving_nat(self) -> None:
        """a1 (behind a preserving/RST NAT) and the public peer dial each
        other at once from fixed ports, nobody listens: TCP simultaneous
        open gets through the NAT."""
        lab = self.make_lab({"a": NATSpec("preserving", inbound="rst")})
        a1, pub = lab.peers["a1"], lab.peers["public"]
        pa, pp = 43001, 43002
        start = time.time() + 1.0
        deadline = start + 10.0
        common = ["--start", str(start), "--deadline", str(deadline)]
        p1 = lab.popen(a1, lab.python_argv(TOOL, "simopen", f"{pub.ip}:{pp}",
                                           "--bind", str(pa), "--name", "a1",
                                           *common),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p2 = lab.popen(pub, lab.python_argv(TOOL, "simopen",
                                            f"{a1.nat_public_ip}:{pa}",
                                            "--bind", str(pp), "--name", "public",
                                            *common),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out1, err1 = p1.communicate(timeout=30)
        out2, err2 = p2.communicate(timeout=30)
        r1, r2 = json.loads(out1), json.loads(out2)
        report("simultaneous open", {"a1": r1, "public": r2})
        self.assertTrue(r1["connected"], (r1, err1))
        self.assertTrue(r2["connected"], (r2, err2))
        self.assertEqual(r1["peer_said"], "public")
        self.assertEqual(r2["peer_said"], "a1")
        self.assertEqual(r2["peer"], [a1.nat_public_ip, pa])


class LifecycleTests(LabTestCase):
    def test_build_teardown_twice_leaves_nothing(self) -> None:
        for _ in range(2):
            lab = Lab({"a": NATSpec(), "b": NATSpec("random")},
                      peers_per_nat={"a": 2})
            with lab:
                names = [h.netns for h in lab.hosts()]
                present = set(list_netns())
                self.assertTrue(set(names) <= present)
                server, _ = self.server(lab)
                daemon = lab._delay_proc
            self.assertIsNotNone(server.poll())
            self.assertEqual(daemon.returncode, 0)  # stopped cleanly
            left = [n for n in list_netns() if n.startswith(lab.prefix)]
            self.assertEqual(left, [])
            lab.teardown()  # idempotent

    def test_teardown_after_failed_build(self) -> None:
        lab = Lab({"a": NATSpec()})
        lab._start_delay = _boom  # type: ignore[method-assign]
        self.assertRaises(RuntimeError, lab.build)
        self.assertEqual([n for n in list_netns() if n.startswith(lab.prefix)], [])

    def test_sweeper_removes_only_dead_owners(self) -> None:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = f"kjl{dead.pid}n1-core"
        mine = f"kjl{os.getpid()}n999-core"
        for name in (stale, mine):
            subprocess.run(["ip", "netns", "add", name], check=True)
            self.addCleanup(subprocess.run, ["ip", "netns", "delete", name],
                            capture_output=True)
        swept = sweep_stale()
        present = set(list_netns())
        self.assertIn(stale, swept)
        self.assertNotIn(stale, present)
        self.assertIn(mine, present)


def _boom(*args) -> None:
    raise RuntimeError("boom")


def report(what: str, value) -> None:
    """Measured values go to the test log (trial's stderr capture)."""
    if isinstance(value, list) and value and isinstance(value[0], float):
        value = [round(v * 1000, 1) for v in value]
        what += " (ms)"
    print(f"natlab: {what}: {value}", file=sys.stderr)
