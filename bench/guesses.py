#!/usr/bin/env python
"""How many password guesses per second the server checks over SIP (issue 13), loopback only.

Starts the real server (``twistd -n kerjostunt``) with one user, registers
it once from 127.0.0.1 (its usual address), then runs ``--connections``
TLS connections spread over ``--sources`` loopback source addresses
(127.0.0.2...) for ``--duration`` seconds. Each connection guesses as fast
as the server lets it: it reuses a challenge's nonce with a growing ``nc``
while the server accepts that, and takes the fresh challenge when it gets
a 401. Bounded by ``--duration`` and ``--max-guesses``.

Reports guesses the server checked (403 "wrong credentials") per second,
answers refused unchecked (403 "too many failed attempts") and re-challenges
(401), server log lines about failures, and whether the right password from
the usual address still registers at the end.

With ``--web``, the same over HTTPS Basic auth (``GET
/v1/groups/bench/peers`` on persistent connections, from 127.0.0.1 only):
guesses checked are the server's ``web_auth_failures`` less its
``auth_throttled`` (read from ``/metrics``), as every refusal is a 401.

Example: ``python bench/guesses.py --connections 100 --sources 1 --duration 10``
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's kerjostunt
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from twisted.internet import defer, reactor, task
from twisted.web import client as web_client
from twisted.web.http_headers import Headers

from kerjostunt import tls
from kerjostunt.client.directory import CAFilePolicy
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.wire.sip.digest import authorization
from kerjostunt.wire.sip.headers import parse_auth

URI = f"sips:{common.DOMAIN}"


def _challenge(response: Any) -> dict[str, str]:
    values = [parse_auth(v) for v in response.headers.get_all("WWW-Authenticate")]
    return [p for s, p in values if s.lower() == "digest" and p.get("algorithm") == "MD5"][0]


@defer.inlineCallbacks
def _connect(server: common.ServerProcess, source: str, user: str, password: str):  # type: ignore[no-untyped-def]
    proto = yield connect_signaling(
        reactor, "127.0.0.1", server.port, tls.client_options(server.ca, "localhost"),
        lambda: SignalingClientProtocol(reactor, user, password, common.DOMAIN, None),
        bind_address=(source, 0),
    )
    return proto


def _register(proto: SignalingClientProtocol, auth: str | None = None) -> defer.Deferred[Any]:
    headers = [("Contact", f"<sips:{proto.user_id}@127.0.0.1:5000;transport=tls>")]
    if auth is not None:
        headers.append(("Authorization", auth))
    return proto.request("REGISTER", URI, to=proto.uri_of(proto.user_id), headers=headers)


@defer.inlineCallbacks
def _guesser(server: common.ServerProcess, source: str, user: str, end: float, tally: Counter[str],
             limit: int):  # type: ignore[no-untyped-def]
    proto = yield _connect(server, source, user, "guess")
    try:
        challenge = _challenge((yield _register(proto)))
        nc = 0
        while time.monotonic() < end and tally["sent"] < limit:
            nc += 1
            tally["sent"] += 1
            auth = authorization(challenge, user, f"guess-{tally['sent']}", "REGISTER", URI, "c0ffee", nc)
            response = yield _register(proto, auth)
            if response.code == 401:
                tally["rechallenged"] += 1
                challenge, nc = _challenge(response), 0
            elif response.reason == "Forbidden: wrong credentials":
                tally["checked"] += 1
            elif response.code == 403:
                tally["refused"] += 1
            else:
                tally[f"other {response.code}"] += 1
    finally:
        proto.transport.loseConnection()


@defer.inlineCallbacks
def _login(server: common.ServerProcess, user: str, password: str):  # type: ignore[no-untyped-def]
    proto = yield _connect(server, "127.0.0.1", user, password)
    try:
        challenge = _register(proto)
        response = yield _register(proto, authorization(_challenge((yield challenge)), user, password,
                                                        "REGISTER", URI, "c0ffee"))
        return f"{response.code} {response.reason}"
    finally:
        proto.transport.loseConnection()


@defer.inlineCallbacks
def _web_guesser(agent: web_client.Agent, url: str, user: str, end: float, tally: Counter[str],
                 limit: int):  # type: ignore[no-untyped-def]
    while time.monotonic() < end and tally["sent"] < limit:
        tally["sent"] += 1
        value = base64.b64encode(f"{user}:guess-{tally['sent']}".encode())
        response = yield agent.request(b"GET", url.encode(), Headers({b"authorization": [b"Basic " + value]}))
        yield web_client.readBody(response)
        tally[f"http {response.code}"] += 1


def _metric(text: str, name: str, labels: str = "") -> float:
    """One counter's value in a Prometheus text page (0 when absent)."""
    match = re.search(rf"^kerjostunt_{name}_total{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@defer.inlineCallbacks
def run_web(args: argparse.Namespace, server: common.ServerProcess, web_port: int):  # type: ignore[no-untyped-def]
    user = common.user_id(0)
    pool = web_client.HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = args.connections
    agent = web_client.Agent(reactor, CAFilePolicy(server.ca), pool=pool)
    base = f"https://localhost:{web_port}"
    tally: Counter[str] = Counter()
    started = time.monotonic()
    end = started + args.duration
    yield defer.DeferredList([_web_guesser(agent, f"{base}/v1/groups/{common.GROUP}/peers", user, end, tally,
                                           args.max_guesses) for _ in range(args.connections)], consumeErrors=True)
    elapsed = time.monotonic() - started
    metrics = yield agent.request(b"GET", f"{base}/metrics".encode())
    text = (yield web_client.readBody(metrics)).decode()
    value = base64.b64encode(f"{user}:{common.password_of(user)}".encode())
    right = yield agent.request(b"GET", f"{base}/v1/groups/{common.GROUP}/peers".encode(),
                                Headers({b"authorization": [b"Basic " + value]}))
    yield web_client.readBody(right)
    yield pool.closeCachedConnections()
    failures = _metric(text, "web_auth_failures")
    throttled = _metric(text, "events", '{event="auth_throttled"}')
    checked = failures - throttled
    common.print_table(f"password guessing over HTTPS Basic: {args.connections} connections from 127.0.0.1", [
        ("duration (s)", round(elapsed, 1)),
        ("guesses sent", tally["sent"]),
        *((key, n) for key, n in sorted(tally.items()) if key.startswith("http")),
        ("guesses checked by the server", int(checked)),
        ("checked guesses per second", round(checked / elapsed, 1)),
        ("refused unchecked (auth_throttled)", int(throttled)),
        ("right password from the same address, after", right.code),
    ])


@defer.inlineCallbacks
def run(args: argparse.Namespace, server: common.ServerProcess):  # type: ignore[no-untyped-def]
    user = common.user_id(0)
    before = yield _login(server, user, common.password_of(user))
    tally: Counter[str] = Counter()
    started = time.monotonic()
    end = started + args.duration
    guessers = [
        _guesser(server, f"127.0.0.{2 + i % args.sources}", user, end, tally, args.max_guesses)
        for i in range(args.connections)
    ]
    results = yield defer.DeferredList(guessers, consumeErrors=True)
    elapsed = time.monotonic() - started
    errors = sum(1 for ok, _ in results if not ok)
    after = yield _login(server, user, common.password_of(user))
    yield task.deferLater(reactor, 0.5, lambda: None)
    common.print_table(f"password guessing over SIP: {args.connections} connections from {args.sources} address(es)", [
        ("duration (s)", round(elapsed, 1)),
        ("guesses sent", tally["sent"]),
        ("guesses checked by the server", tally["checked"]),
        ("checked guesses per second", round(tally["checked"] / elapsed, 1)),
        ("refused unchecked (locked out)", tally["refused"]),
        ("answered with a new challenge (401)", tally["rechallenged"]),
        ("connections failed", errors),
        *((key, n) for key, n in sorted(tally.items()) if key.startswith("other")),
        ("server log lines about wrong credentials", server.log_count("wrong credentials")
         + server.log_count("failed logins")),
        ("right password from the usual address, before", before),
        ("right password from the usual address, after", after),
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--sources", type=int, default=1, help="loopback source addresses 127.0.0.2 and up (max 250)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-guesses", type=int, default=200_000)
    p.add_argument("--web", action="store_true", help="guess over the web's Basic auth instead of SIP")
    args = p.parse_args()
    args.sources = max(1, min(args.sources, 250))
    with tempfile.TemporaryDirectory(prefix="kerjo-guesses-") as tmp:
        web_port = common.free_ports(1)[0]
        server = common.ServerProcess(Path(tmp), users=1, extra_args=["--web-port", str(web_port)])
        return common.run_to_exit(server, lambda: run_web(args, server, web_port) if args.web else run(args, server))


if __name__ == "__main__":
    sys.exit(main())
