"""The traversal matrix: every pair of NAT behaviours, real server and peers.

``python3 -m tests.natlab.matrix [--tries N] [--delay-ms 20]`` (root, as the
lab needs) builds one lab per pair, runs ``twistd kerjostunt`` and
``kerjostunt echo-server`` (user bob, behind NAT B) and then N times
``kerjostunt echo-client`` (user alice, behind NAT A, calling bob), and
prints a table (reStructuredText, ready for docs/nat-lab.rst):

- NAT A, NAT B: the caller's and the callee's NAT (``same NAT``: both
  behind one; ``public``: the callee has a public address);
- result: successful tries out of N (``ok``: connected and echoed);
- technique: what the client reported (most frequent among the successes);
- connect: median time the client reported, ``connected ... in N ms`` (from
  asking the agent to connect: INVITE, the callee's probes, the dial
  moment, the punch and the peer handshake; the caller's own probes come
  first too);
- punch: median time from the dial moment to a verified connection (the
  client's ``punched ... in S s`` or ``birthday ...: connected ... in S s``
  log line; ``-`` for a direct connection);
- floor: what the lab's delays alone allow for that sequence: the INVITE to
  the callee and its answer back (twice the RTT to the server) plus a TCP
  handshake and the peer handshake between the peers (twice the peers'
  RTT); probes and processing not counted.  A relayed row's floor is
  ``relay_floor_ms`` (the relay's round trips instead of the peers').

``--relay`` runs coturn in the server namespace and the server with
``--relay`` (tests/natlab/relay.py): pairs no technique joins then relay.

Pairs run one after another (timing is measured, so nothing runs beside
them); ``--only TEXT`` keeps the rows whose NAT names contain TEXT.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer, task

from .lab import Lab, NATSpec, lab_unavailable
from .relay import start_coturn
from .scenario import Scenario, unique_message

#: The NAT behaviours of the matrix, by the name the table shows.
BEHAVIOURS: dict[str, NATSpec] = {
    "preserving/drop": NATSpec("preserving", inbound="drop"),
    "preserving/rst": NATSpec("preserving", inbound="rst"),
    "sequential:1/drop": NATSpec("sequential", delta=1, inbound="drop"),
    "sequential:4/drop": NATSpec("sequential", delta=4, inbound="drop"),
    "random/rst": NATSpec("random", inbound="rst"),
}

#: The client's log lines for a won punch / birthday search (--verbose).
PUNCHED_RE = re.compile(
    r"(?:punched \S+ via \S+ after \d+ attempts|birthday \(\w+\): connected \S+ after \d+ dials)"
    r" in (?P<s>\d+(?:\.\d+)?) s")


@dataclass
class Row:
    nat_a: str
    nat_b: str
    tries: int = 0
    ok: int = 0
    techniques: Counter = field(default_factory=Counter)
    connect_ms: list[float] = field(default_factory=list)
    punch_ms: list[float] = field(default_factory=list)
    floor_ms: float = 0.0
    failures: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        technique = self.techniques.most_common(1)[0][0] if self.techniques else "-"
        if len(self.techniques) > 1:
            technique += " (" + ", ".join(f"{t} {n}" for t, n in self.techniques.most_common()) + ")"
        return [
            self.nat_a,
            self.nat_b,
            f"{'ok' if self.ok == self.tries else 'failed' if not self.ok else 'mixed'} "
            f"{self.ok}/{self.tries}",
            technique,
            _ms(self.connect_ms),
            _ms(self.punch_ms),
            f"{self.floor_ms:.0f}",
        ]


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "-"


@dataclass(frozen=True)
class Pair:
    nat_a: str
    nat_b: str
    #: "nat": a1 behind A calls b1 behind B; "same": a1 calls a2, both behind
    #: A; "public": a1 behind A calls the public peer.
    kind: str = "nat"

    def label_b(self) -> str:
        return {"nat": self.nat_b, "same": "same NAT", "public": "public peer"}[self.kind]


def pairs() -> list[Pair]:
    names = list(BEHAVIOURS)
    result = [Pair(a, b) for i, a in enumerate(names) for b in names[i:]]
    result.append(Pair("preserving/rst", "preserving/rst", "same"))
    result += [Pair(a, "", "public") for a in names]
    return result


def floor_ms(delay_ms: float, server_delay_ms: float, kind: str) -> float:
    server_rtt = 2 * (delay_ms + server_delay_ms)
    peer_rtt = {"nat": 4 * delay_ms, "public": 4 * delay_ms, "same": 0.0}[kind]
    return 2 * server_rtt + 2 * peer_rtt


def relay_floor_ms(delay_ms: float, server_delay_ms: float) -> float:
    """A relayed call's floor (coturn beside the server, docs/relay.rst): the INVITE and its
    answer; the callee's allocation before it answers (TCP connect, Allocate and its 401:
    three round trips to the relay); the caller's five after the answer (TCP connect,
    Allocate and its 401, Connect with its CreatePermission, ConnectionBind, the data
    connection's TCP connect overlapping the Connect); then the peer handshake across the
    relay (one peer-to-relay-to-peer round trip)."""
    server_rtt = 2 * (delay_ms + server_delay_ms)
    return 2 * server_rtt + (3 + 5) * server_rtt + 2 * server_rtt


#: relayed techniques: their floor is relay_floor_ms
RELAYED = {"relay"}


@defer.inlineCallbacks
def run_pair(reactor, pair: Pair, tries: int, delay_ms: float, timeout: float,
             workdir: Path, verbose: bool, caller_args: tuple[str, ...] = (),
             callee_args: tuple[str, ...] = (), relay: bool = False, *, specs: dict[str, NATSpec] | None = None,
             ipv6: frozenset[str] = frozenset(), built=None):
    """One row; ``specs``/``ipv6``/``built(lab, workdir)``: the issue 17 rows (matrix17.py)."""
    if specs is not None:
        nats, peers, caller, callee = specs, None, "a1", "b1"
    elif pair.kind == "nat":
        nats = {"a": BEHAVIOURS[pair.nat_a], "b": BEHAVIOURS[pair.nat_b]}
        peers, caller, callee = None, "a1", "b1"
    elif pair.kind == "same":
        nats = {"a": BEHAVIOURS[pair.nat_a]}
        peers, caller, callee = {"a": 2}, "a1", "a2"
    else:
        nats = {"a": BEHAVIOURS[pair.nat_a]}
        peers, caller, callee = None, "a1", "public"
    row = Row(pair.nat_a, pair.label_b(),
              floor_ms=floor_ms(delay_ms, 0.0, pair.kind))
    lab = Lab(nats, delay_ms=delay_ms, peers_per_nat=peers,
              public_peer=pair.kind == "public", ipv6=ipv6)
    lab.build()
    if built is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        built(lab, workdir)
    sc = Scenario(lab, workdir, reactor=reactor)
    try:
        yield sc.add_users(["alice", "bob"])
        server_args = (yield start_coturn(sc, workdir / "coturn")) if relay else ()
        yield sc.start_server(*server_args)
        yield sc.start_echo_server(callee, "bob", *callee_args)
        for n in range(tries):
            result = yield sc.echo_client(caller, "alice", "bob", *caller_args,
                                          message=unique_message(64), timeout=timeout)
            row.tries += 1
            if result.ok:
                row.ok += 1
                row.techniques[result.technique] += 1
                if result.technique in RELAYED:
                    row.floor_ms = relay_floor_ms(delay_ms, 0.0)
                row.connect_ms.append(result.connect_ms)
                m = PUNCHED_RE.search(result.stderr)
                if m:
                    row.punch_ms.append(float(m["s"]) * 1000.0)
            else:
                row.failures.append(result.failed or f"exit {result.code}")
            if verbose:
                print(f"  try {n + 1}: {'ok ' + str(result.technique) if result.ok else 'failed'}"
                      f" {result.connect_ms or ''} {result.failed or ''}"[:300],
                      file=sys.stderr, flush=True)
    except Exception as e:
        row.failures.append(f"harness: {e}")
        print(sc.transcript(2000), file=sys.stderr)
    finally:
        yield sc.stop()
        lab.teardown()
    return row


def table(rows: list[Row]) -> str:
    header = ["NAT A (caller)", "NAT B (callee)", "result", "technique",
              "connect ms", "punch ms", "floor ms"]
    cells = [r.cells() for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    lines.append(rule)
    return "\n".join(lines)


@defer.inlineCallbacks
def main_async(reactor, args):
    chosen = [p for p in pairs()
              if not args.only or any(o in f"{p.nat_a} {p.label_b()}" for o in args.only)]
    base = Path(tempfile.mkdtemp(prefix="kerjostunt-matrix-"))
    rows = []
    started = time.monotonic()
    for i, pair in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {pair.nat_a} -> {pair.label_b()}", file=sys.stderr, flush=True)
        row = yield run_pair(reactor, pair, args.tries, args.delay_ms, args.timeout,
                             base / f"pair{i}", args.verbose, relay=args.relay)
        rows.append(row)
    relay = ", coturn relay on (--relay)" if args.relay else ""
    print(f"NAT lab traversal matrix: {args.tries} tries per pair{relay}, "
          f"{args.delay_ms:g} ms one-way delay per access link, 0 ms to the server; "
          f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    failures = [(r, f) for r in rows for f in r.failures]
    if failures:
        print("\nfailures:")
        seen = set()
        for r, f in failures:
            key = (r.nat_a, r.nat_b, f[:120])
            if key in seen:
                continue
            seen.add(key)
            print(f"  {r.nat_a} -> {r.nat_b}: {f[:300]}")
    print(f"\n(logs in {base})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.natlab.matrix",
        description="Run every pair of NAT behaviours in the NAT lab; print the table.")
    parser.add_argument("--tries", type=int, default=5, help="calls per pair (default 5)")
    parser.add_argument("--delay-ms", type=float, default=20.0,
                        help="one-way delay of every access link (default 20)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="echo-client --timeout per try (default 30)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only pairs whose NAT names contain TEXT (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every try")
    parser.add_argument("--relay", action="store_true",
                        help="run coturn in the server namespace and the server with --relay (docs/relay.rst)")
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"matrix: {reason}", file=sys.stderr)
        return 2
    task.react(main_async, (args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
