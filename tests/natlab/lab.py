"""The NAT lab: real NATs made of network namespaces, veth pairs and nftables.

Test setup, not reactor code: every call here blocks on ``ip``/``nft``
subprocesses.  Build it in ``setUp`` (or a ``with`` block), run the processes
under test inside its namespaces (``Lab.popen``, or ``Lab.exec_argv`` for
``reactor.spawnProcess``), and always tear it down (``addCleanup``)::

    lab = Lab({"a": NATSpec(), "b": NATSpec("sequential", delta=4)})
    lab.build()
    self.addCleanup(lab.teardown)
    proc = lab.popen(lab.peers["a1"], ["kerjostunt", "echo-client", ...])

Topology, addresses and the NAT behaviours are described in docs/nat-lab.rst.
Run ``python3 -m tests.natlab.lab --shell`` from the repository to build one
by hand and get a shell inside it.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import v6
from .nat import ALLOCATIONS, INBOUND, core_queue_argvs, nat_ruleset

#: Namespace names are ``kjl<pid>n<counter>-<role>``: the owning pid makes
#: two runs (and two labs in one run) collide never, and lets the sweeper
#: tell a crashed run's leftovers from a live run's namespaces.
NAME_RE = re.compile(r"^kjl(\d+)n(\d+)-")
#: Where each lab notes its owner's process start time (pid reuse guard).
STATE_DIR = Path("/run/kerjostunt-natlab")

DELAY_SCRIPT = str(Path(__file__).with_name("delay.py"))

#: Public ("Internet") side: 198.18.0.0/15 is the benchmarking range, routed
#: nowhere.  Private LANs are 10.K.0.0/24 and exist only inside the lab.
SERVER_NET = "198.18.0"
PUBLIC_PEER_NET = "198.18.100"
CORE_HOST = 1

_counter = itertools.count(1)


@dataclass(frozen=True)
class NATSpec:
    """How one NAT box behaves."""

    allocation: str = "preserving"  # 'preserving' | 'sequential' | 'random'
    delta: int = 1  # port step of a sequential NAT (may be negative)
    inbound: str = "rst"  # unsolicited inbound SYN: 'drop' | 'rst' | 'icmp'
    hairpin: bool = False  # not supported yet: True raises ValueError

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}")
        if self.inbound not in INBOUND:
            raise ValueError(f"inbound must be one of {INBOUND}")
        if self.allocation == "sequential" and self.delta == 0:
            raise ValueError("a sequential NAT needs a non-zero delta")
        if self.hairpin:
            raise ValueError(
                "hairpin NAT is not implemented by the lab (see docs/nat-lab.rst)"
            )

    def describe(self) -> str:
        alloc = self.allocation
        if alloc == "sequential":
            alloc = f"sequential(d={self.delta})"
        return f"{alloc}/{self.inbound}"


@dataclass(frozen=True)
class Host:
    """One namespace of the lab.

    ``ip`` is the host's own address (a private 10.x address behind a NAT, a
    198.18.x address otherwise); ``nat_public_ip`` is the public address of
    the NAT in front of it (None without a NAT).  The server has a second
    address ``ip2``.  For a NAT box itself ``ip`` is its public address and
    ``lan_ip`` its LAN address.
    """

    name: str
    netns: str
    ip: str
    nat_public_ip: str | None = None
    ip2: str | None = None
    nat: str | None = None
    lan_ip: str | None = None


def _run(argv: list[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(argv)} failed ({proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


class LabError(RuntimeError):
    pass


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def list_netns() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _kill_netns_processes(netns: str) -> None:
    proc = _run(["ip", "netns", "pids", netns], check=False)
    pids = [int(p) for p in proc.stdout.split() if p.strip().isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + 2.0
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if os.path.exists(f"/proc/{p}")
                     and _proc_state(p) != "Z"]
        pids = alive


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    _run(["ip", "netns", "delete", netns], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces that crashed earlier runs left behind.

    Only names of the lab's pattern whose owning process is gone (or is a
    different process that reused the pid) are touched.  Returns the names
    deleted.
    """
    swept = []
    for netns in list_netns():
        m = NAME_RE.match(netns)
        if not m:
            continue
        pid = int(m.group(1))
        prefix = m.group(0)
        start = _proc_start_time(pid)
        noted = None
        marker = STATE_DIR / prefix.rstrip("-")
        try:
            noted = marker.read_text().strip()
        except OSError:
            pass
        if start is not None and (noted is None or noted == start):
            continue  # the owner is alive
        _delete_netns(netns)
        swept.append(netns)
    if STATE_DIR.is_dir():
        for marker in STATE_DIR.iterdir():
            m = NAME_RE.match(marker.name + "-")
            if m and _proc_start_time(int(m.group(1))) is None:
                marker.unlink(missing_ok=True)
    return swept


_unavailable: list[str | None] = []


def lab_unavailable() -> str | None:
    """None when the lab can run here; otherwise why not (a skip reason)."""
    if _unavailable:
        return _unavailable[0]
    _unavailable.append(_probe())
    return _unavailable[0]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and nftables)"
    for tool in ("ip", "nft", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (run .ci/natlab-deps)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return "the NAT lab needs the netfilterqueue package (run .ci/natlab-deps)"
    probe = f"kjl{os.getpid()}n0-probe"
    try:
        proc = _run(["ip", "netns", "add", probe], check=False)
        if proc.returncode != 0:
            return f"cannot create network namespaces: {proc.stderr.strip()}"
        proc = _run(["ip", "netns", "exec", probe, "nft", "-f", "-"],
                    input=nat_ruleset(allocation="sequential", delta=1,
                                      inbound="icmp", wan_if="wan",
                                      public_ip="198.18.1.2"), check=False)
        if proc.returncode != 0:
            return f"nftables NAT does not work in a namespace: {proc.stderr.strip()}"
        for argv in core_queue_argvs(0):
            proc = _run(["ip", "netns", "exec", probe, *argv], check=False)
            if proc.returncode != 0:
                break
        if proc.returncode != 0:
            return ("iptables -j NFQUEUE does not work in a namespace: "
                    f"{proc.stderr.strip()}")
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return None


class Lab:
    """A NAT lab: build it, run processes in its hosts, tear it down.

    ``nats`` maps a short NAT name (``[a-z][a-z0-9]{0,5}``) to its behaviour;
    each NAT gets ``peers_per_nat[name]`` peers (default 1) called
    ``<name>1``, ``<name>2``...  ``delay_ms`` is the one-way delay of every
    access link (NATs and the public peer); the server's link has
    ``server_delay_ms`` (default 0), so the RTT from a peer behind a NAT to
    the server is 2 * (delay_ms + server_delay_ms) and between two peers
    4 * delay_ms.
    """

    def __init__(
        self,
        nats: dict[str, NATSpec],
        *,
        delay_ms: float = 20.0,
        peers_per_nat: dict[str, int] | None = None,
        public_peer: bool = True,
        server_delay_ms: float = 0.0,
        ipv6: frozenset[str] | set[str] = frozenset(),  # dual-stack sites (natlab/v6.py)
    ) -> None:
        if len(nats) > 90:
            raise ValueError("too many NATs")
        for name in nats:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", name):
                raise ValueError(f"bad NAT name {name!r}")
            if name == "public":
                raise ValueError("'public' is reserved")
        self.specs = dict(nats)
        self.delay_ms = float(delay_ms)
        self.server_delay_ms = float(server_delay_ms)
        self.peers_per_nat = dict.fromkeys(nats, 1)
        self.peers_per_nat.update(peers_per_nat or {})
        self.public_peer = public_peer
        self.ipv6 = set(ipv6)

        self.prefix = f"kjl{os.getpid()}n{next(_counter)}-"
        self.core = Host("core", self.prefix + "core", f"{SERVER_NET}.{CORE_HOST}")
        self.server = Host(
            "server", self.prefix + "server", f"{SERVER_NET}.10",
            ip2=f"{SERVER_NET}.11",
        )
        self.nats: dict[str, Host] = {}
        self.peers: dict[str, Host] = {}
        for k, name in enumerate(nats, start=1):
            public_ip = f"198.18.{k}.2"
            self.nats[name] = Host(
                name, self.prefix + "nat-" + name, public_ip,
                lan_ip=f"10.{k}.0.1",
            )
            for i in range(1, self.peers_per_nat[name] + 1):
                pname = f"{name}{i}"
                self.peers[pname] = Host(
                    pname, self.prefix + pname, f"10.{k}.0.{10 + i}",
                    nat_public_ip=public_ip, nat=name,
                )
        if public_peer:
            self.peers["public"] = Host(
                "public", self.prefix + "public", f"{PUBLIC_PEER_NET}.10"
            )

        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._delay_proc: subprocess.Popen | None = None
        self._built = False
        self._torn_down = False
        self._ip = shutil.which("ip") or "/usr/sbin/ip"

    # -- public API ---------------------------------------------------------

    def hosts(self) -> Iterator[Host]:
        yield self.core
        yield self.server
        yield from self.nats.values()
        yield from self.peers.values()

    def exec_argv(self, host: Host, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``host``'s namespace (its first
        element is an absolute path, as ``reactor.spawnProcess`` needs)."""
        return [self._ip, "netns", "exec", host.netns, *argv]

    def popen(self, host: Host, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace; teardown stops it."""
        proc = subprocess.Popen(self.exec_argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], *, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace to completion (text output)."""
        return subprocess.run(
            self.exec_argv(host, argv), capture_output=True, text=True,
            timeout=timeout, input=input,
        )

    def python_argv(self, code: str, *args: str) -> list[str]:
        """argv for a Python snippet run by this interpreter."""
        return [sys.executable, "-c", code, *args]

    def build(self) -> None:
        if self._built:
            return
        if self._torn_down:
            raise LabError("a torn-down lab cannot be built again; make a new one")
        reason = lab_unavailable()
        if reason:
            raise LabError(reason)
        sweep_stale()
        self._built = True
        atexit.register(self.teardown)
        try:
            self._note_owner()
            self._build()
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Stop every process started in the lab and delete its namespaces.
        Idempotent; safe after a failed or partial build."""
        if self._torn_down:
            return
        self._torn_down = True
        for proc in reversed(self._procs):
            _stop(proc)
        if self._delay_proc is not None:
            _stop(self._delay_proc)
        for netns in reversed(self._namespaces):
            _delete_netns(netns)
        # Anything of ours that an exception kept out of _namespaces.
        for netns in list_netns():
            if netns.startswith(self.prefix):
                _delete_netns(netns)
        (STATE_DIR / self.prefix.rstrip("-")).unlink(missing_ok=True)
        try:
            atexit.unregister(self.teardown)
        except Exception:
            pass

    def check(self) -> dict[str, object]:
        """What the lab looks like now (for debugging a failed test)."""
        present = set(list_netns())
        return {
            "namespaces": {ns: ns in present for ns in self._namespaces},
            "delay_daemon_alive": self._delay_proc is not None
            and self._delay_proc.poll() is None,
            "processes": [p.args for p in self._procs if p.poll() is None],
        }

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def describe(self) -> str:
        lines = [f"NAT lab {self.prefix}* (one-way delay {self.delay_ms} ms "
                 f"per access link, {self.server_delay_ms} ms to the server)"]
        lines.append(f"  server  {self.server.netns:24} {self.server.ip}, "
                     f"{self.server.ip2}")
        for name, nat in self.nats.items():
            lines.append(f"  NAT {name:3} {nat.netns:24} {nat.ip} "
                         f"(LAN {nat.lan_ip}/24) {self.specs[name].describe()}")
        for name, peer in self.peers.items():
            via = f" behind {peer.nat_public_ip}" if peer.nat_public_ip else ""
            lines.append(f"  {name:7} {peer.netns:24} {peer.ip}{via}")
        lines.append(f"  core    {self.core.netns:24} (router, delay daemon)")
        return "\n".join(lines)

    # -- building -----------------------------------------------------------

    def _note_owner(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        start = _proc_start_time(os.getpid()) or ""
        (STATE_DIR / self.prefix.rstrip("-")).write_text(start + "\n")

    def _ipn(self, netns: str, *args: str) -> None:
        _run([self._ip, "-n", netns, *args])

    def _sysctl(self, netns: str, *settings: str) -> None:
        _run([self._ip, "netns", "exec", netns, "sysctl", "-q", "-w", *settings])

    def _add_netns(self, host: Host) -> None:
        _run([self._ip, "netns", "add", host.netns])
        self._namespaces.append(host.netns)
        self._ipn(host.netns, "link", "set", "lo", "up")
        # No IPv6 noise (router solicitations, DAD) in the queue or captures,
        # unless some site is dual-stack (then no router advertisements).
        off = "0" if self.ipv6 else "1"
        self._sysctl(host.netns, f"net.ipv6.conf.all.disable_ipv6={off}",
                     f"net.ipv6.conf.default.disable_ipv6={off}", "net.ipv6.conf.all.accept_ra=0")

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        self._ipn(ns_a, "link", "add", if_a, "type", "veth",
                  "peer", "name", if_b, "netns", ns_b)
        self._ipn(ns_a, "link", "set", if_a, "up")
        self._ipn(ns_b, "link", "set", if_b, "up")

    def _build(self) -> None:
        for host in self.hosts():
            self._add_netns(host)
        core = self.core.netns
        self._sysctl(core, "net.ipv4.ip_forward=1")
        links = {}

        # Server: two addresses on one link.
        self._veth(core, "s0", self.server.netns, "eth0")
        self._ipn(core, "addr", "add", f"{SERVER_NET}.{CORE_HOST}/24", "dev", "s0")
        for ip in (self.server.ip, self.server.ip2):
            self._ipn(self.server.netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        self._ipn(self.server.netns, "route", "add", "default",
                  "via", f"{SERVER_NET}.{CORE_HOST}")
        links["s0"] = self.server_delay_ms

        # Public peer.
        if self.public_peer:
            pub = self.peers["public"]
            self._veth(core, "p0", pub.netns, "eth0")
            self._ipn(core, "addr", "add", f"{PUBLIC_PEER_NET}.{CORE_HOST}/24",
                      "dev", "p0")
            self._ipn(pub.netns, "addr", "add", f"{pub.ip}/24", "dev", "eth0")
            self._ipn(pub.netns, "route", "add", "default",
                      "via", f"{PUBLIC_PEER_NET}.{CORE_HOST}")
            links["p0"] = self.delay_ms

        # NAT boxes and their LANs (a bridge, so peers share one L2 segment).
        for k, (name, nat) in enumerate(self.nats.items(), start=1):
            core_if = f"n{name}"
            self._veth(core, core_if, nat.netns, "wan")
            self._ipn(core, "addr", "add", f"198.18.{k}.{CORE_HOST}/24",
                      "dev", core_if)
            self._ipn(nat.netns, "addr", "add", f"{nat.ip}/24", "dev", "wan")
            self._ipn(nat.netns, "route", "add", "default",
                      "via", f"198.18.{k}.{CORE_HOST}")
            self._ipn(nat.netns, "link", "add", "lan", "type", "bridge")
            self._ipn(nat.netns, "addr", "add", f"{nat.lan_ip}/24", "dev", "lan")
            self._ipn(nat.netns, "link", "set", "lan", "up")
            for peer in self.peers.values():
                if peer.nat != name:
                    continue
                port_if = f"p{peer.name[len(name):]}"
                self._veth(nat.netns, port_if, peer.netns, "eth0")
                self._ipn(nat.netns, "link", "set", port_if, "master", "lan")
                self._ipn(peer.netns, "addr", "add", f"{peer.ip}/24", "dev", "eth0")
                self._ipn(peer.netns, "route", "add", "default", "via", nat.lan_ip)
            self._sysctl(nat.netns, "net.ipv4.ip_forward=1")
            spec = self.specs[name]
            _run([self._ip, "netns", "exec", nat.netns, "nft", "-f", "-"],
                 input=nat_ruleset(allocation=spec.allocation, delta=spec.delta,
                                   inbound=spec.inbound, wan_if="wan",
                                   public_ip=nat.ip))
            links[core_if] = self.delay_ms

        if self.ipv6:
            v6.build(self, self._ipn, self._sysctl, lambda ns, rule: _run(
                [self._ip, "netns", "exec", ns, "nft", *rule.split()]), self.ipv6)
        self._start_delay(links)
        for queue_argv in core_queue_argvs(0) + (v6.queue_argvs(0) if self.ipv6 else []):
            _run([self._ip, "netns", "exec", core, *queue_argv])

    def _start_delay(self, links: dict[str, float]) -> None:
        argv = [sys.executable, DELAY_SCRIPT, "--queue", "0", "--delay-ms", "0"]
        for ifname, ms in links.items():
            argv += ["--link", f"{ifname}={ms:g}"]
        proc = subprocess.Popen(
            self.exec_argv(self.core, argv), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self._delay_proc = proc
        line = proc.stdout.readline()  # the daemon says "ready" once bound
        if line.strip() != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise LabError(f"delay daemon did not start: {line!r} {err.strip()}")


def _stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Build a NAT lab and open a shell in it (root).")
    parser.add_argument("--shell", action="store_true",
                        help="build the lab, print how to enter it, run a shell "
                        "in the peer a1 namespace; tear down when it exits")
    parser.add_argument("--nat", action="append", default=[],
                        metavar="NAME=ALLOC[:DELTA][/INBOUND]",
                        help="e.g. a=preserving/rst, b=sequential:4/drop "
                        "(default: a=preserving/rst b=preserving/rst)")
    parser.add_argument("--peers", action="append", default=[],
                        metavar="NAME=N", help="peers behind NAT NAME")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--sweep", action="store_true",
                        help="only delete namespaces left by crashed runs")
    args = parser.parse_args(argv)

    reason = lab_unavailable()
    if reason:
        print(f"natlab: {reason}", file=sys.stderr)
        return 2
    if args.sweep:
        for netns in sweep_stale():
            print(f"deleted {netns}")
        return 0
    nats = {}
    for spec in args.nat or ["a=preserving/rst", "b=preserving/rst"]:
        name, _, rest = spec.partition("=")
        alloc, _, inbound = rest.partition("/")
        alloc, _, delta = alloc.partition(":")
        nats[name] = NATSpec(alloc or "preserving", int(delta or 1),
                             inbound or "rst")
    peers = {n: int(c) for n, c in (p.split("=") for p in args.peers)}
    with Lab(nats, delay_ms=args.delay_ms, peers_per_nat=peers) as lab:
        print(lab.describe())
        print("\nenter a host:  ip netns exec NETNS bash")
        if not args.shell:
            print("--shell not given: tearing down")
            return 0
        first = next(iter(lab.peers.values()))
        print(f"starting a shell in {first.netns}; exit it to tear the lab down")
        subprocess.call(lab.exec_argv(first, [os.environ.get("SHELL", "bash")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
