#!/usr/bin/env python
"""A lean REGISTER load generator: non-blocking sockets, pyOpenSSL and ``selectors``, no Twisted.

Issue 16 asks for two instances to register 1.7 times what one does on
this 2-core machine, where the load generators share the cores with the
instances and PostgreSQL. The Twisted workers of ``registrations.py`` cost
about as much CPU per registration as the server, so they ate the second
core. This worker does the same job (a TLS connection per peer, REGISTER,
the 401's digest answered, 200, the connection held and the server's
keepalive pings answered) with as little Python as possible per
registration: one object per peer, a hand-written digest, responses split on
the blank line (the server's 401 and 200 have no body).

TLS: pyOpenSSL's OpenSSL (the server's own library, so the same key
exchange as the Twisted workers negotiate, X25519MLKEM768 with OpenSSL 3.5
and later), full handshakes without resumption. ``verify`` true checks the
chain against the bench CA and the name ``localhost``; false skips both.

It speaks ``registrations.py``'s worker protocol (commands ``warmup N``,
``go``, ``hold``, ``stop`` on stdin, and its own ``refresh SECONDS``: every
held peer registers again on its connection, ``window`` at a time, the
challenge's nonce reused with a growing ``nc``, until SECONDS pass; events ``ready``, ``warm``,
``registered``, ``refreshed``, ``done`` on stdout), so both coordinators can use it:
``--generator lean``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import selectors
import socket
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from OpenSSL import SSL

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')
HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def client_context(ca: str, verify: bool) -> SSL.Context:
    """One context for every connection (what a pool of real clients would share)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # every peer a full handshake, as a fresh device
    if verify:
        ctx.load_verify_locations(ca)
        ctx.set_verify(SSL.VERIFY_PEER)
        lib = SSL._lib  # type: ignore[attr-defined]
        param = lib.SSL_CTX_get0_param(ctx._context)  # type: ignore[attr-defined]
        if lib.X509_VERIFY_PARAM_set1_host(param, b"localhost", 9) != 1:
            raise RuntimeError("cannot set the expected server name")
    return ctx


def digest_answer(challenge: str, user: str, password: str, uri: str, nc: int) -> str:
    """The Authorization value for one Digest challenge (RFC 7616, qop=auth)."""
    params = {m[0].lower(): m[1] or m[2] for m in PARAM.findall(challenge)}
    algorithm = params.get("algorithm", "MD5").upper()
    h = HASHES[algorithm]
    realm, nonce = params["realm"], params["nonce"]
    cnonce, count = secrets.token_hex(8), f"{nc:08x}"
    ha1 = h(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = h(f"REGISTER:{uri}".encode()).hexdigest()
    response = h(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    opaque = f', opaque="{params["opaque"]}"' if "opaque" in params else ""
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm={algorithm}, cnonce="{cnonce}", qop=auth, nc={count}{opaque}')


class Peer:
    """One TLS peer: connect, handshake, REGISTER, 401, REGISTER with credentials, 200, then held."""

    __slots__ = ("buf", "challenge", "closed", "conn", "cseq", "local", "nc", "pings", "pongs", "registered",
                 "run", "sock", "started", "state", "uid")

    def __init__(self, run: Run, uid: str) -> None:
        self.run, self.uid = run, uid
        self.sock: socket.socket | None = None
        self.conn: SSL.Connection | None = None
        self.buf = b""
        self.state = "new"  # connecting, handshake, challenge, answer, held
        self.cseq = 0
        self.local = ("0.0.0.0", 0)
        self.started = 0.0
        self.registered = self.closed = False
        self.pings = self.pongs = 0
        self.challenge, self.nc = "", 0  # the server's digest challenge and how often it was answered

    def start(self, source: str) -> None:
        self.started = time.time()
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        code = sock.connect_ex(self.run.server)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        self.local = sock.getsockname()
        self.state = "connecting"
        self.run.sel.register(sock, WRITE, self)

    def ready(self, events: int) -> None:
        """The selector's callback: drive whatever this peer is waiting for."""
        if self.state == "connecting":
            assert self.sock is not None
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(f"connect: {os.strerror(code)}")
                return
            self.conn = SSL.Connection(self.run.ctx, self.sock)
            self.conn.set_tlsext_host_name(b"localhost")
            self.conn.set_connect_state()
            self.state = "handshake"
        if self.state == "handshake":
            self.handshake()
        else:
            self.receive()

    def handshake(self) -> None:
        assert self.conn is not None
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            self.want(READ)
            return
        except SSL.WantWriteError:
            self.want(WRITE)
            return
        except SSL.Error as exc:
            self.fail(f"TLS: {exc!r}"[:120])
            return
        self.want(READ)
        self.state = "challenge"
        self.send_register(None)

    def want(self, events: int) -> None:
        self.run.sel.modify(self.sock, events, self)  # type: ignore[arg-type]

    def send_register(self, authorization: str | None) -> None:
        self.cseq += 1
        host, port = self.local
        uid, domain = self.uid, common.DOMAIN
        auth = f"Authorization: {authorization}\r\n" if authorization else ""
        msg = (f"REGISTER sips:{domain} SIP/2.0\r\n"
               f"Via: SIP/2.0/TLS {host}:{port};branch=z9hG4bK{secrets.token_hex(8)};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: <sips:{uid}@{domain}>;tag={uid}t\r\nTo: <sips:{uid}@{domain}>\r\n"
               f"Call-ID: {uid}-{self.started:.6f}@lean\r\nCSeq: {self.cseq} REGISTER\r\n"
               f"Contact: <sips:{uid}@{host}:{port};transport=tls>;expires=3600\r\n{auth}Content-Length: 0\r\n\r\n")
        self.write(msg.encode())

    def write(self, data: bytes) -> None:
        assert self.conn is not None
        try:
            self.conn.sendall(data)  # a few hundred bytes: the socket buffer takes them at once
        except SSL.Error as exc:
            self.fail(f"send: {exc!r}"[:120])

    def receive(self) -> None:
        assert self.conn is not None
        while True:
            try:
                data = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except (SSL.ZeroReturnError, SSL.SysCallError, SSL.Error) as exc:
                self.fail(f"lost: {type(exc).__name__}")
                return
            if not data:
                self.fail("lost: EOF")
                return
            self.buf += data
        self.messages()

    def messages(self) -> None:
        while self.buf and not self.closed:
            if self.buf.startswith(b"\r\n\r\n"):  # the server's ping: answer with a pong
                self.buf = self.buf[4:]
                self.write(b"\r\n")
                continue
            if self.buf.startswith(b"\r\n"):
                self.buf = self.buf[2:]
                self.pongs += 1
                continue
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.buf = rest  # our server's 401 and 200 have no body
            self.response(head.decode(errors="replace"))

    def response(self, head: str) -> None:
        first, _, headers = head.partition("\r\n")
        parts = first.split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[0] == "SIP/2.0" and parts[1].isdigit() else 0
        if self.state in ("challenge", "refresh") and code == 401:  # a refresh's: the nonce went stale
            challenge = next((line.split(":", 1)[1] for line in headers.split("\r\n")
                              if line.lower().startswith("www-authenticate:") and "digest" in line.lower()), None)
            if challenge is None:
                self.fail("401 without a Digest challenge")
                return
            self.challenge, self.nc = challenge, 0
            self.state = "answer" if self.state == "challenge" else "refresh"
            self.answer()
        elif self.state == "answer" and code == 200:
            self.state, self.registered = "held", True
            self.run.finish(self, None)
        elif self.state == "refresh" and code == 200:
            self.state = "held"
            self.run.refreshed(self)
        elif self.state in ("challenge", "answer", "refresh"):
            self.fail(f"REGISTER {code}")

    def answer(self) -> None:
        """REGISTER with credentials for the challenge we hold, its nonce counted once more."""
        self.nc += 1
        self.send_register(digest_answer(self.challenge, self.uid, common.password_of(self.uid),
                                         f"sips:{common.DOMAIN}", self.nc))

    def refresh(self) -> None:
        """A registered peer registers again on its connection (RFC 7616: the nonce reused, nc grown)."""
        self.state = "refresh"
        self.answer()

    def ping(self) -> None:
        if not self.closed and self.state == "held":
            self.pings += 1
            self.write(b"\r\n\r\n")

    def fail(self, why: str) -> None:
        if self.closed:
            return
        self.close()
        self.run.error(self, why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            try:
                self.run.sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()


class Run:
    """The worker: a window of registrations in flight, the holding, the reports."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.server = (config["host"], config["port"])
        self.ctx = client_context(config["ca"], config.get("verify", True))
        self.sel = selectors.DefaultSelector()
        self.peers: list[Peer] = []
        self.todo: list[tuple[Peer, str]] = []
        self.inflight = 0
        self.tally = common.RegistrationTally()
        self.hold_errors: Counter[str] = Counter()
        self.phase = "idle"  # warmup, register, registered, hold, stopping
        self.pings: deque[tuple[float, Peer]] = deque()
        self.running = True
        self.refreshing: deque[Peer] = deque()
        self.refresh_until = self.refresh_first = self.refresh_last = 0.0
        self.refreshes = self.refresh_inflight = 0
        self.refresh_errors: Counter[str] = Counter()

    def command(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        sources = self.config["sources"]
        if word == "warmup":
            lo = self.config["warmup_from"]
            self.start(range(lo, lo + int(rest)), sources, "warmup")
        elif word == "go":
            self.start(range(*self.config["indices"]), sources, "register")
        elif word == "hold":
            self.phase = "hold"
            interval = self.config["keepalive"]
            now = time.time()
            self.pings = deque(sorted(((now + random.uniform(0, interval), p) for p in self.peers if not p.closed),
                                      key=lambda x: x[0]))  # then each ping goes to the back: still in order
        elif word == "refresh":
            self.phase = "refresh"
            self.refreshing = deque(p for p in self.peers if p.registered and not p.closed)
            self.refresh_first = time.time()
            self.refresh_until = self.refresh_first + float(rest)
            self.pump_refreshes()
        elif word == "stop" and self.phase != "stopping":
            self.phase = "stopping"
            common.emit({"event": "done", "held": sum(1 for p in self.peers if p.registered and not p.closed),
                         "errors": dict(self.hold_errors), "pings": sum(p.pings for p in self.peers),
                         "pongs": sum(p.pongs for p in self.peers)})
            for peer in self.peers:
                peer.close()
            self.running = False

    def start(self, indices: range, sources: int, phase: str) -> None:
        self.phase = phase
        self.peers = [Peer(self, common.user_id(i)) for i in indices]
        self.todo = [(p, common.source_address(i, sources)) for p, i in zip(self.peers, indices)]
        self.todo.reverse()
        self.tally = common.RegistrationTally()
        self.pump()

    def pump(self) -> None:
        while self.inflight < self.config["window"] and self.todo:
            peer, source = self.todo.pop()
            self.inflight += 1
            try:
                peer.start(source)
            except OSError as exc:
                peer.close()
                self.finish(peer, f"connect: {exc.strerror}")
                continue
            self.tally.started(peer.started)
        if not self.todo and self.inflight == 0 and self.phase in ("warmup", "register"):
            self.report()

    def report(self) -> None:
        if self.phase == "warmup":
            for peer in self.peers:
                peer.close()
            self.phase = "idle"
            self.tally.report(warmup=True)
            return
        self.phase = "registered"
        self.tally.report(warmup=False)

    def pump_refreshes(self) -> None:
        """Keep ``window`` refreshes in flight, round the held peers, until the phase's end."""
        while self.refresh_inflight < self.config["window"] and self.refreshing and time.time() < self.refresh_until:
            peer = self.refreshing.popleft()
            if peer.closed:  # lost while waiting its turn (counted by error): its socket is gone
                continue
            self.refresh_inflight += 1
            peer.refresh()
        if self.phase == "refresh" and self.refresh_inflight == 0 and time.time() >= self.refresh_until:
            self.phase = "registered"
            common.emit({"event": "refreshed", "count": self.refreshes, "errors": dict(self.refresh_errors),
                         "first": self.refresh_first, "last": self.refresh_last})

    def refreshed(self, peer: Peer) -> None:
        self.refreshes += 1
        self.refresh_last = time.time()
        self.refresh_inflight -= 1
        self.refreshing.append(peer)
        self.pump_refreshes()

    def finish(self, peer: Peer, error: str | None) -> None:
        if error is None:
            self.tally.succeeded(peer.started)
        else:
            self.tally.failed(error)
        self.inflight -= 1
        self.pump()

    def error(self, peer: Peer, why: str) -> None:
        if peer.registered and self.phase == "refresh":
            self.refresh_errors[why] += 1
            if peer.state == "refresh":
                self.refresh_inflight -= 1
            self.pump_refreshes()
        elif peer.registered:
            if self.phase in ("registered", "hold"):
                self.hold_errors[why] += 1
        else:
            self.finish(peer, why)

    def loop(self, deadline: float) -> None:
        """Commands on stdin, the peers' sockets and the keepalive pings, until stop or ``deadline``."""
        stdin = sys.stdin.buffer.raw  # type: ignore[attr-defined]
        os.set_blocking(stdin.fileno(), False)
        self.sel.register(stdin, READ, None)
        pending = b""
        while self.running:
            if time.time() > deadline:
                common.emit({"event": "error", "why": "worker deadline reached"})
                break
            timeout = 1.0 if not self.pings else max(0.0, min(1.0, self.pings[0][0] - time.time()))
            for key, events in self.sel.select(timeout):
                if key.data is None:
                    chunk = stdin.read(65536)
                    if not chunk:
                        self.command("stop")
                        break
                    pending += chunk
                    while b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        self.command(line.decode().strip())
                else:
                    key.data.ready(events)
            self.keepalives()
            if self.phase == "refresh":
                self.pump_refreshes()  # the phase ends with nothing in flight

    def keepalives(self) -> None:
        now = time.time()
        interval = self.config["keepalive"]
        while self.pings and self.pings[0][0] <= now and self.phase == "hold":
            _, peer = self.pings.popleft()
            peer.ping()
            self.pings.append((now + interval, peer))


def worker(config: dict[str, Any]) -> int:
    run = Run(config)
    common.emit({"event": "ready"})
    run.loop(config["deadline"])
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(json.loads(sys.argv[2])))
    sys.exit(f"usage: a worker of registrations.py / cluster.py (--generator lean): {sys.argv[0]} --worker CONFIG")
