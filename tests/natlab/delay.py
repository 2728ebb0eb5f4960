"""The NAT lab's link-delay daemon (userspace, because the kernel has no netem).

Runs as its own process inside the core router's namespace.  The core
router sends every packet to NFQUEUE queue ``--queue`` twice: in PREROUTING
(as it arrives over a link) and in POSTROUTING (as it leaves by a link).
The daemon holds it each time for the one-way delay of that link (looked up
by interface name) and then accepts it.  A forwarded packet so pays for both
links it crosses; a packet the router itself answers (ICMP time exceeded for
a low-TTL SYN, which dies before the forward hook) pays for the link to the
router and back, as on a real path.

Order: packets are released from one heap ordered by (due time, arrival
number).  At one hook every packet of a flow direction crosses the same link
and so gets the same delay, which makes its due times non-decreasing in
arrival order: a flow is never reordered.

Stopping: SIGTERM or SIGINT makes the daemon accept every packet it still
holds (nothing is lost), unbind the queue and exit 0.

Standalone on purpose (stdlib plus ``netfilterqueue``), so the lab can start
it by file path with any working directory::

    python3 tests/natlab/delay.py --queue 0 --delay-ms 0 --link na=20 --link s0=0

It prints ``ready`` on stdout once the queue is bound, and a one-line summary
on stderr when it stops.
"""

from __future__ import annotations

import argparse
import heapq
import select
import signal
import socket
import sys
import time

HOOK_PREROUTING = 0  # NF_INET_PRE_ROUTING
HOOK_POSTROUTING = 4  # NF_INET_POST_ROUTING


def parse_links(specs: list[str]) -> dict[str, float]:
    links: dict[str, float] = {}
    for spec in specs:
        name, sep, ms = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"delay: bad --link {spec!r}, expected IFNAME=MS")
        links[name] = float(ms)
    return links


class Delayer:
    """Holds queued packets until their due time."""

    def __init__(self, default_s: float, by_ifindex: dict[int, float]) -> None:
        self.default_s = default_s
        self.by_ifindex = by_ifindex
        self.held: list[tuple[float, int, object]] = []
        self.seq = 0
        self.count = 0
        self.max_held = 0

    def link(self, ifindex: int) -> float:
        return self.by_ifindex.get(ifindex, self.default_s)

    def delay_for(self, hook: int, indev: int, outdev: int) -> float:
        """PREROUTING: the link the packet came in by; POSTROUTING: the link
        it leaves by; FORWARD (a single queue rule there): both."""
        if hook == HOOK_PREROUTING:
            return self.link(indev)
        if hook == HOOK_POSTROUTING:
            return self.link(outdev)
        return self.link(indev) + self.link(outdev)

    def on_packet(self, pkt) -> None:  # called by netfilterqueue
        self.count += 1
        delay = self.delay_for(pkt.hook, pkt.indev, pkt.outdev)
        if delay <= 0:  # its flow is never held, so never reordered
            pkt.accept()
            return
        self.seq += 1
        heapq.heappush(self.held, (time.monotonic() + delay, self.seq, pkt))
        if len(self.held) > self.max_held:
            self.max_held = len(self.held)

    def release_due(self, now: float) -> None:
        held = self.held
        while held and held[0][0] <= now:
            heapq.heappop(held)[2].accept()

    def release_all(self) -> None:
        while self.held:
            heapq.heappop(self.held)[2].accept()

    def timeout(self, now: float, idle: float) -> float:
        if not self.held:
            return idle
        return max(0.0, self.held[0][0] - now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=0, help="NFQUEUE number")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="one-way delay of every link not named by --link (ms)",
    )
    parser.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="IFNAME=MS",
        help="one-way delay of the link on this interface of the router",
    )
    parser.add_argument("--max-len", type=int, default=8192, help="queue length")
    args = parser.parse_args(argv)

    from netfilterqueue import COPY_META, NetfilterQueue

    by_ifindex = {
        socket.if_nametoindex(name): ms / 1000.0
        for name, ms in parse_links(args.link).items()
    }
    delayer = Delayer(args.delay_ms / 1000.0, by_ifindex)

    stop_r, stop_w = socket.socketpair()
    stop_r.setblocking(False)
    stop_w.setblocking(False)
    signal.set_wakeup_fd(stop_w.fileno())
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    nfq = NetfilterQueue()
    nfq.bind(args.queue, delayer.on_packet, max_len=args.max_len, mode=COPY_META)
    nfq_fd = nfq.get_fd()
    print("ready", flush=True)
    try:
        while not stopping:
            now = time.monotonic()
            delayer.release_due(now)
            readable, _, _ = select.select(
                [nfq_fd, stop_r], [], [], delayer.timeout(now, 1.0)
            )
            if nfq_fd in readable:
                nfq.run(block=False)
    finally:
        delayer.release_all()
        nfq.unbind()
        print(
            f"delay: stopped, {delayer.count} packets, at most "
            f"{delayer.max_held} held at once",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
