#!/usr/bin/env python
"""The server while another process holds its SQLite write lock (issue 13), loopback only.

Starts the real server (``twistd -n kerjostunt``, web on), registers two
users, then has a child process take ``BEGIN IMMEDIATE`` on the server's
database (as a backup or an import would) for ``--lock`` seconds. Meanwhile,
every ``--interval`` seconds: a new TLS connection REGISTERs (401, 200) and
``/health`` is fetched; each REGISTER's last-seen row is a usage record the
server must not lose. Then the lock is released, and the script waits for
the last REGISTER's row to reach the database.

Second part: the lock is taken again, a REGISTER is made, and the server is
stopped with SIGTERM while the lock is held; the script counts the lines of
the pending file, releases the lock, starts the server again and waits for
that REGISTER's row. Bounded: the lock time (at most 120 s) plus about 30 s.

Example: ``python bench/store_faults.py --lock 40``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's kerjostunt
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from twisted.internet import defer, reactor, task
from twisted.web import client as web_client

from kerjostunt import tls
from kerjostunt.client.directory import CAFilePolicy
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.store import Database
from kerjostunt.wire.sip.digest import authorization, choose_challenge

URI = f"sips:{common.DOMAIN}"
HOLDER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""


class Lock:
    """Another process holding the write lock until ``release``."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "locked":
            raise RuntimeError("the lock holder did not lock")

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


@defer.inlineCallbacks
def register(server: common.ServerProcess, user: str):  # type: ignore[no-untyped-def]
    """One REGISTER on a new connection: (milliseconds, final status line)."""
    started = time.monotonic()
    proto = yield connect_signaling(
        reactor, "127.0.0.1", server.port, tls.client_options(server.ca, "localhost"),
        lambda: SignalingClientProtocol(reactor, user, common.password_of(user), common.DOMAIN, None),
    )
    try:
        headers = [("Contact", f"<sips:{user}@127.0.0.1:5000;transport=tls>")]
        first = yield proto.request("REGISTER", URI, to=proto.uri_of(user), headers=headers, timeout=30.0)
        params = choose_challenge(first.headers.get_all("WWW-Authenticate"))
        auth = authorization(params, user, common.password_of(user), "REGISTER", URI, "c0ffee")
        final = yield proto.request("REGISTER", URI, to=proto.uri_of(user), timeout=30.0,
                                    headers=[*headers, ("Authorization", auth)])
        return (time.monotonic() - started) * 1000.0, f"{final.code}"
    finally:
        proto.transport.loseConnection()


@defer.inlineCallbacks
def health(agent: web_client.Agent, base: str):  # type: ignore[no-untyped-def]
    """``/health``: (milliseconds, code, its document)."""
    started = time.monotonic()
    response = yield agent.request(b"GET", f"{base}/health".encode())
    body = yield web_client.readBody(response)
    return (time.monotonic() - started) * 1000.0, response.code, json.loads(body)


def last_seen(server: common.ServerProcess, user: str) -> float | None:
    db = Database(server.db_url)
    try:
        return db.get_user(user).last_seen
    finally:
        db.close()


@defer.inlineCallbacks
def written(server: common.ServerProcess, user: str, after: float, limit: float = 30.0):  # type: ignore[no-untyped-def]
    """Seconds until ``user``'s last-seen row is at least ``after`` (None past ``limit``)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        seen = last_seen(server, user)
        if seen is not None and seen >= after:
            return time.monotonic() - started
        yield task.deferLater(reactor, 0.1, lambda: None)
    return None


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {common.percentile(values, 50):.0f}, max {max(values):.0f}"


@defer.inlineCallbacks
def run(args: argparse.Namespace, server: common.ServerProcess, web_port: int):  # type: ignore[no-untyped-def]
    alice, bob = common.user_id(0), common.user_id(1)
    agent = web_client.Agent(reactor, CAFilePolicy(server.ca))
    base = f"https://localhost:{web_port}"
    before = []
    for _ in range(3):
        before.append((yield register(server, alice))[0])
    health_before = yield health(agent, base)
    path = Path(server.db_url[len("sqlite:///"):])

    lock = Lock(path)
    locked_at = time.monotonic()
    registers: list[tuple[float, str]] = []
    checks: list[tuple[float, int, dict[str, Any]]] = []
    last_register = 0.0
    while time.monotonic() - locked_at < args.lock:
        last_register = time.time()
        registers.append((yield register(server, alice)))
        checks.append((yield health(agent, base)))
        yield task.deferLater(reactor, args.interval, lambda: None)
    lock.release()
    catch_up = yield written(server, alice, last_register - 1.0)
    health_after = yield health(agent, base)

    lock = Lock(path)
    stop_register = time.time()
    stopped_register = yield register(server, bob)
    yield task.deferLater(reactor, 1.0, lambda: None)  # its write meets the lock, waits
    stop_started = time.monotonic()
    server.stop()
    stop_seconds = time.monotonic() - stop_started
    pending = path.with_name(path.name + ".pending.jsonl")
    pending_lines = len(pending.read_text().splitlines()) if pending.exists() else 0
    lock.release()
    server.start()
    replayed = yield written(server, bob, stop_register - 1.0)

    codes = sorted({code for _, code in registers})
    statuses = sorted({f"{code} {doc['status']}" for _, code, doc in checks})
    reasons = [doc["reason"] for _, _, doc in checks if doc.get("reason")]
    common.print_table(f"another process holds the SQLite write lock for {args.lock:g} s", [
        ("REGISTER ms before the lock", summary(before)),
        ("REGISTERs during the lock", len(registers)),
        ("their final answers", ", ".join(codes)),
        ("REGISTER ms during the lock", summary([ms for ms, _ in registers])),
        ("/health ms before / during the lock",
         f"{health_before[0]:.0f} / {summary([ms for ms, _, _ in checks])}"),
        ("/health during the lock", ", ".join(statuses)),
        ("/health reason (last)", reasons[-1] if reasons else "-"),
        ("records waiting (largest /health figure)", max((doc["waiting_records"] for _, _, doc in checks), default=0)),
        ("/health after the release", f"{health_after[1]} {health_after[2]['status']}"),
        ("last REGISTER's row written, s after release", "never" if catch_up is None else f"{catch_up:.1f}"),
        ("SIGTERM during the lock: REGISTER answer", stopped_register[1]),
        ("server stopped in (s)", f"{stop_seconds:.1f}"),
        ("lines in the pending file at stop", pending_lines),
        ("pending file after the restart", "present" if pending.exists() else "removed"),
        ("that REGISTER's row after the restart, s", "never" if replayed is None else f"{replayed:.1f}"),
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lock", type=float, default=10.0, help="seconds the lock is held (at most 120)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between two REGISTERs during the lock")
    args = p.parse_args()
    args.lock = max(1.0, min(args.lock, 120.0))
    with tempfile.TemporaryDirectory(prefix="kerjo-store-faults-") as tmp:
        web_port = common.free_ports(1)[0]
        server = common.ServerProcess(Path(tmp), users=2, extra_args=["--web-port", str(web_port)])
        return common.run_to_exit(server, lambda: run(args, server, web_port))


if __name__ == "__main__":
    sys.exit(main())
