"""The matrix rows of issue 17: IPv6 through stateful firewalls, and port mappings.

``python3 -m tests.natlab.matrix17 [--tries N]`` (root) runs, like
``tests.natlab.matrix`` and printing the same table:

- dual-stack pairs (``+v6``: the site also routes IPv6 behind its stateful
  firewall, tests/natlab/v6.py; the firewall turns unsolicited SYNs away as
  the NAT's inbound behaviour says), a dual-stack caller with an IPv4-only
  callee;
- a random-port NAT whose router runs miniupnpd (``+pcp``: PCP/NAT-PMP and
  UPnP on; ``+upnp``: UPnP only, tests/natlab/upnp.py), as the callee's and
  as the caller's (facing another random NAT), and the same NAT without it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from twisted.internet import defer, task

from . import upnp
from .lab import NATSpec, lab_unavailable
from .matrix import Pair, run_pair, table

SPECS = {
    "preserving/drop": NATSpec("preserving", inbound="drop"),
    "random/drop": NATSpec("random", inbound="drop"),
    "random/icmp": NATSpec("random", inbound="icmp"),
    "random/rst": NATSpec("random", inbound="rst"),
}

#: (caller site, callee site); a suffix names what the site has besides its NAT
ROWS = [
    ("preserving/drop +v6", "preserving/drop +v6"),
    ("random/drop +v6", "random/drop +v6"),
    ("random/icmp +v6", "random/rst +v6"),
    ("preserving/drop +v6", "preserving/drop"),
    ("preserving/drop", "random/rst +pcp"),
    ("preserving/drop", "random/rst +upnp"),
    ("random/rst +pcp", "random/rst"),
    ("random/rst", "random/rst +pcp"),
    ("preserving/drop", "random/rst"),
]


def _site(label: str) -> tuple[NATSpec, str]:
    name, _, extra = label.partition(" +")
    return SPECS[name], extra


def _routers(mapped: list[tuple[str, bool]], lab: object, directory: Path) -> None:
    """miniupnpd on each named site's router: PCP/NAT-PMP and UPnP, or UPnP only."""
    for site, pcp in mapped:
        upnp.start(lab, site, directory, pcp=pcp, upnp=True)


@defer.inlineCallbacks
def main_async(reactor, args):  # type: ignore[no-untyped-def]
    base = Path(tempfile.mkdtemp(prefix="kerjostunt-matrix17-"))
    rows = []
    started = time.monotonic()
    chosen = [r for r in ROWS if not args.only or any(o in " ".join(r) for o in args.only)]
    for i, (a, b) in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {a} -> {b}", file=sys.stderr, flush=True)
        (spec_a, extra_a), (spec_b, extra_b) = _site(a), _site(b)
        ipv6 = frozenset(n for n, extra in (("a", extra_a), ("b", extra_b)) if extra == "v6")
        mapped = [(site, extra == "pcp") for site, extra in (("a", extra_a), ("b", extra_b)) if extra in ("pcp", "upnp")]
        built = partial(_routers, mapped) if mapped else None
        row = yield run_pair(reactor, Pair(a, b), args.tries, args.delay_ms, args.timeout, base / f"pair{i}",
                             args.verbose, specs={"a": spec_a, "b": spec_b}, ipv6=ipv6, built=built)
        rows.append(row)
    print(f"NAT lab, issue 17 rows: {args.tries} tries per pair, {args.delay_ms:g} ms one-way delay per access "
          f"link (both families), 0 ms to the server; {time.strftime('%Y-%m-%d')}, "
          f"{time.monotonic() - started:.0f} s\n")
    print(table(rows))
    for r in rows:
        for f in sorted(set(r.failures))[:3]:
            print(f"  {r.nat_a} -> {r.nat_b}: {f[:300]}")
    print(f"\n(logs in {base})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.natlab.matrix17", description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--only", action="append", default=[], metavar="TEXT")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    reason = lab_unavailable() or upnp.unavailable()
    if reason:
        print(f"matrix17: {reason}", file=sys.stderr)
        return 2
    task.react(main_async, (args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
