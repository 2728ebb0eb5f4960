"""A whole group in the NAT lab: twelve ``kerjostunt join`` over five sites (issue 12).

The group of issue 12, as a new user would try it: every member runs the
real ``kerjostunt join`` at once, the real ``twistd kerjostunt`` (with its
HTTPS trusted peers list) in the server namespace, 20 ms one-way on every
access link.  ``run_group`` builds a fresh lab, starts everything, follows
every member's stdout as it arrives (a poll of the processes' buffers every
50 ms on the reactor; nothing sleeps) and ends when the mesh of joinable
pairs is complete and every member's signaling is closed, or at the
deadline.  It fires with a ``GroupRun``: what ``bench/group.py`` tabulates
and ``tests/test_traversal_mesh.py`` asserts.

=====  ==========================  =========================
site   NAT                         hosts
=====  ==========================  =========================
a      preserving, inbound drop    a1 .. a5 (one LAN)
b      sequential (d=4), drop      b1 .. b3 (one LAN)
c      preserving, inbound RST     c1, c2 (one LAN)
d      random, inbound RST         d1
-      none                        public
=====  ==========================  =========================

66 pairs; the three between the random NAT and the sequential one cannot
be joined by any technique (docs/nat-lab.rst, traversal matrix), so 63 are
joinable.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from .lab import Lab, NATSpec
from .scenario import LabProcess, Scenario

GROUP = "friends"
WEB_PORT = 8443
DELAY_MS = 20.0

#: site -> (NAT behaviour, hosts behind it)
SITES: dict[str, tuple[NATSpec, int]] = {
    "a": (NATSpec("preserving", inbound="drop"), 5),
    "b": (NATSpec("sequential", delta=4, inbound="drop"), 3),
    "c": (NATSpec("preserving", inbound="rst"), 2),
    "d": (NATSpec("random", inbound="rst"), 1),
}
#: the issue's larger group: 40 peers, 20 of them behind one NAT (bench/group.py --large)
LARGE_SITES: dict[str, tuple[NATSpec, int]] = {
    "a": (NATSpec("preserving", inbound="drop"), 20),
    "b": (NATSpec("sequential", delta=4, inbound="drop"), 8),
    "c": (NATSpec("preserving", inbound="rst"), 6),
    "d": (NATSpec("random", inbound="rst"), 5),
}
#: pairs of sites no technique joins (random <-> sequential; hosts of one site share a LAN)
UNJOINABLE_SITES = {frozenset({"b", "d"})}

CONNECTED_RE = re.compile(r"^peer (\S+) connected(?: via (\S+))?", re.M)
UNREACHABLE_RE = re.compile(r"^peer (\S+) unreachable(?:: (.*))?$", re.M)
SIGNALING_RE = re.compile(r"^signaling (opened|closed) \((.*)\)$", re.M)


def user_of(host: str) -> str:
    """The member's user ID: its host's name (``a1``, ``public``)."""
    return host


def site_of(host: str) -> str:
    return "public" if host == "public" else host[0]


def joinable(x: str, y: str) -> bool:
    return frozenset({site_of(x), site_of(y)}) not in UNJOINABLE_SITES


@dataclass
class GroupRun:
    """What one run of the group did (times in seconds from starting the members)."""

    members: list[str]
    joinable: list[frozenset[str]]
    #: pair -> when both of its sides had printed ``peer X connected``
    connected: dict[frozenset[str], float] = field(default_factory=dict)
    #: member -> when its signaling was last seen to close (None: open at the end)
    closed_at: dict[str, float | None] = field(default_factory=dict)
    #: member -> when it first printed ``signaling opened`` (its start-up, imports included)
    opened_at: dict[str, float] = field(default_factory=dict)
    techniques: Counter[str] = field(default_factory=Counter)
    unreachable: list[str] = field(default_factory=list)
    server_cpu_s: float = 0.0
    duration: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def pairs_ok(self) -> int:
        return sum(1 for p in self.joinable if p in self.connected)

    @property
    def mesh_s(self) -> float | None:
        """Time to the full mesh of joinable pairs (None: not reached)."""
        if self.pairs_ok < len(self.joinable):
            return None
        return max((self.connected[p] for p in self.joinable), default=0.0)

    @property
    def signaling_open(self) -> list[str]:
        return sorted(m for m, t in self.closed_at.items() if t is None)

    @property
    def all_closed_s(self) -> float | None:
        """Time until every member's signaling was closed (None: some still open)."""
        if self.signaling_open or not self.closed_at:
            return None
        return max(t for t in self.closed_at.values() if t is not None)

    def milestones(self) -> str:
        """When the last member had opened its signaling, and the first and the median pair connected."""
        times = sorted(self.connected.values())
        opened = f"{max(self.opened_at.values()):.1f} s" if self.opened_at else "-"
        first = f"{times[0]:.1f} s" if times else "-"
        half = f"{times[len(times) // 2]:.1f} s" if times else "-"
        return f"all signaling opened {opened}, first pair {first}, median pair {half}"

    def missing(self) -> list[str]:
        return sorted("-".join(sorted(p)) for p in self.joinable if p not in self.connected)


class _Watcher:
    """Follows every member's stdout and notes when each thing first happened."""

    def __init__(self, procs: dict[str, LabProcess], result: GroupRun, started: float) -> None:
        self.procs = procs
        self.result = result
        self.started = started
        self.seen: dict[str, set[str]] = {m: set() for m in procs}

    def poll(self, now: float) -> None:
        for me, proc in self.procs.items():
            out = proc.stdout
            for m in CONNECTED_RE.finditer(out):
                self.seen[me].add(m[1])
            states = SIGNALING_RE.findall(out)
            if states and me not in self.result.opened_at:
                self.result.opened_at[me] = now - self.started
            closed = bool(states) and states[-1][0] == "closed"
            if closed and self.result.closed_at.get(me) is None:
                self.result.closed_at[me] = now - self.started
            elif not closed:
                self.result.closed_at[me] = None
        for pair in self.result.joinable:
            x, y = sorted(pair)
            if pair not in self.result.connected and y in self.seen[x] and x in self.seen[y]:
                self.result.connected[pair] = now - self.started

    def done(self) -> bool:
        return self.result.mesh_s is not None and self.result.all_closed_s is not None

    def finish(self) -> None:
        for me, proc in self.procs.items():
            out = proc.stdout
            self.result.outputs[me] = proc.output
            self.result.techniques.update(m[2] or "?" for m in CONNECTED_RE.finditer(out))
            self.result.unreachable += [f"{me}->{m[1]}: {m[2]}" for m in UNREACHABLE_RE.finditer(out)]


def build_lab(sites: dict[str, tuple[NATSpec, int]] = SITES, public: bool = True) -> Lab:
    lab = Lab({s: spec for s, (spec, _) in sites.items()}, delay_ms=DELAY_MS,
              peers_per_nat={s: n for s, (_, n) in sites.items()}, public_peer=public)
    lab.build()
    return lab


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@defer.inlineCallbacks
def run_group(reactor: Any, workdir: Path, *, deadline: float = 150.0,
              sites: dict[str, tuple[NATSpec, int]] = SITES,
              extra: tuple[str, ...] = ()) -> Generator[Any, Any, GroupRun]:
    """One run in a fresh lab (built and torn down here); fires with its ``GroupRun``."""
    lab = build_lab(sites)
    sc = Scenario(lab, workdir, reactor=reactor, verbose=False)
    try:
        members = list(lab.peers)
        users = [user_of(h) for h in members]
        yield sc.add_users(users, {GROUP: users})
        server = yield sc.start_server(web_port=WEB_PORT)
        cpu0 = cpu_seconds(server.transport.pid)
        result = GroupRun(members=users, joinable=[frozenset(p) for p in combinations(users, 2)
                                                  if joinable(*p)])
        started = reactor.seconds()
        procs = {user_of(h): sc.start_join(h, user_of(h), GROUP, *extra, limit=deadline + 30)
                 for h in members}
        watcher = _Watcher(procs, result, started)
        while not watcher.done() and reactor.seconds() - started < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
            watcher.poll(reactor.seconds())
        result.duration = reactor.seconds() - started
        result.server_cpu_s = cpu_seconds(server.transport.pid) - cpu0
        watcher.finish()
        return result
    finally:
        yield sc.stop()
        lab.teardown()


def summary(run: GroupRun) -> str:
    """One paragraph per run: what a reader of a failure needs first."""
    mesh = "-" if run.mesh_s is None else f"{run.mesh_s:.1f} s"
    closed = "-" if run.all_closed_s is None else f"{run.all_closed_s:.1f} s"
    lines = [f"pairs {run.pairs_ok}/{len(run.joinable)}, mesh {mesh}, all signaling closed {closed}, "
             f"server CPU {run.server_cpu_s:.1f} s, techniques "
             + ", ".join(f"{t} {n}" for t, n in run.techniques.most_common())]
    lines.append("  " + run.milestones())
    slowest = sorted(run.connected.items(), key=lambda kv: -kv[1])[:6]
    if slowest:
        lines.append("  slowest: " + ", ".join(f"{'-'.join(sorted(p))} {t:.1f} s" for p, t in slowest))
    if run.missing():
        lines.append("  missing: " + " ".join(run.missing()))
    if run.signaling_open:
        lines.append("  signaling open: " + " ".join(run.signaling_open))
    if run.unreachable:
        lines.append("  unreachable: " + "; ".join(run.unreachable[:12]))
    return "\n".join(lines)


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
