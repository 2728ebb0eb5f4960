"""End-to-end scenarios in the NAT lab: the real server and real peers.

A ``Scenario`` runs, inside a built ``Lab``:

- ``twistd -n kerjostunt`` in the server namespace, bound to the server's IP
  (signaling on ``SIP_PORT``, probes on ``PROBE_PORTS`` on both server IPs);
- the ``kerjostunt`` admin commands that create users and groups in the
  server's SQLite file;
- ``kerjostunt echo-server`` / ``echo-client`` (and, for the trusted peers
  work, ``kerjostunt join``) in peer namespaces.

Everything is a child process started with ``reactor.spawnProcess`` and
watched as its output arrives, so nothing blocks the reactor: it runs under
trial (``tests/test_traversal.py``) and under ``task.react``
(``python3 -m tests.natlab.matrix``).  Every process has a time limit and is
killed by ``Scenario.stop()`` (TERM, then KILL); the lab's teardown kills
whatever is still left in its namespaces.  The database is read for
assertions from a worker thread (``deferToThread``), never on the reactor
thread.

In trial::

    lab = Lab({"a": NATSpec(), "b": NATSpec()}, delay_ms=20)
    lab.build()
    self.addCleanup(lab.teardown)
    sc = Scenario(lab, Path(self.mktemp()))
    self.addCleanup(sc.stop)           # runs before lab.teardown (LIFO)
    yield sc.add_users({"alice": "pw-a", "bob": "pw-b"})
    yield sc.start_server()
    yield sc.start_echo_server("b1", "bob")
    result = yield sc.echo_client("a1", "alice", "bob", message="hello")
"""

from __future__ import annotations

import compileall
import csv
import io
import json
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from .lab import Host, Lab
from .v6 import SERVER_V6

#: The repository root: holds ``twisted/plugins/kerjostunt_plugin.py``,
#: which an editable install does not put on a child's path.
REPO = Path(__file__).resolve().parents[2]

DOMAIN = "kerjo.lab"
SIP_PORT = 5061
PROBE_PORTS = (3478, 3479)

#: "connected to bob via simultaneous-open in 183 ms"
CONNECTED_RE = re.compile(
    r"connected to (?P<peer>\S+) via (?P<technique>\S+) in (?P<ms>\d+(?:\.\d+)?) ms"
)
FAILED_RE = re.compile(r"^failed: (?P<reason>.*)$", re.M)

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
_KERJOSTUNT = "import sys; from kerjostunt.cli import main; sys.argv[0] = 'kerjostunt'; sys.exit(main())"

#: Run inside the server namespace: exits 0 once every ip:port given accepts
#: a TCP connection, 1 if one still does not at the deadline.
_WAIT_LISTENING = r"""
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
todo = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in sys.argv[2:]]
while todo:
    addr = todo[0]
    try:
        socket.create_connection(addr, timeout=1).close()
        todo.pop(0)
    except OSError:
        if time.monotonic() > deadline:
            print("not listening: %s:%d" % addr)
            sys.exit(1)
        time.sleep(0.05)
"""


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ProcessExited(Exception):
    """A process ended while we waited for it to do something."""


class LabProcess(ProcessProtocol):
    """A child process in a lab host: its output as it arrives, its end.

    ``ended`` fires with the exit code (None when a signal ended it); it
    never fails.  ``wait_for(pattern)`` fires when the output (stdout and
    stderr together) matches.
    """

    def __init__(self, name: str, clock: Any) -> None:
        self.name = name
        self.clock = clock
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.timed_out = False
        self.started_at = clock.seconds()
        self.ended_at: float | None = None
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred]] = []
        self._limit: Any = None

    # -- output ---------------------------------------------------------------

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def running(self) -> bool:
        return not self.ended.called

    def childDataReceived(self, fd: int, data: bytes) -> None:
        (self.out if fd == 1 else self.err).extend(data)
        self._check()

    def _check(self) -> None:
        text = self.output
        for pattern, d in list(self._waiters):
            m = pattern.search(text)
            if m:
                self._waiters.remove((pattern, d))
                d.callback(m)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> defer.Deferred:
        """Fires with the ``re.Match`` once the output matches ``pattern``;
        fails with ProcessExited if the process ends first, TimeoutError
        after ``timeout`` seconds."""
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        m = rx.search(self.output)
        if m:
            return defer.succeed(m)
        if not self.running:
            return defer.fail(ProcessExited(self._gone(rx.pattern)))
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((rx, d))

        def expire() -> None:
            if (rx, d) in self._waiters:
                self._waiters.remove((rx, d))
                d.errback(TimeoutError(
                    f"{self.name}: no {rx.pattern!r} within {timeout:g} s; "
                    f"output:\n{self.output[-3000:]}"))

        call = self.clock.callLater(timeout, expire)
        return d.addBoth(_cancel_call, call)

    def _gone(self, what: str) -> str:
        return (f"{self.name} exited ({self.describe_exit()}) before {what!r}; "
                f"output:\n{self.output[-3000:]}")

    # -- life -----------------------------------------------------------------

    def set_limit(self, seconds: float) -> None:
        """Kill the process if it still runs after ``seconds``."""
        def expire() -> None:
            self._limit = None
            if self.running:
                self.timed_out = True
                self.kill(signal.SIGKILL)
        self._limit = self.clock.callLater(seconds, expire)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(sig)
            except Exception:  # already gone (ProcessExitedAlready)
                pass

    def stop(self, grace: float = 3.0) -> defer.Deferred:
        """TERM, then KILL after ``grace`` seconds; fires once it is gone."""
        if not self.running:
            return defer.succeed(self.exit_code)
        self.kill(signal.SIGTERM)
        call = self.clock.callLater(grace, self.kill, signal.SIGKILL)
        d: defer.Deferred = defer.Deferred()
        self.ended.addBoth(lambda r: (call.active() and call.cancel(), d.callback(r), r)[-1])
        return d

    def describe_exit(self) -> str:
        if self.running:
            return "running"
        if self.timed_out:
            return "killed at its time limit"
        if self.exit_signal is not None:
            return f"signal {self.exit_signal}"
        return f"exit {self.exit_code}"

    def processEnded(self, reason: Failure) -> None:
        if self._limit is not None and self._limit.active():
            self._limit.cancel()
        self._limit = None
        self.ended_at = self.clock.seconds()
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            self.exit_code = reason.value.exitCode
            self.exit_signal = reason.value.signal
        for pattern, d in self._waiters:
            d.errback(ProcessExited(self._gone(pattern.pattern)))
        self._waiters = []
        self.ended.callback(self.exit_code)


def _cancel_call(result: Any, call: Any) -> Any:
    if call.active():
        call.cancel()
    return result


@dataclass
class ClientResult:
    """What one ``kerjostunt echo-client`` run did."""

    code: int | None
    stdout: str
    stderr: str
    elapsed: float  # seconds, process start to end
    timed_out: bool
    message: str
    peer: str | None = None
    technique: str | None = None
    connect_ms: float | None = None
    failed: str | None = None

    @property
    def echo_ok(self) -> bool:
        return bool(re.search(r"^echo ok$", self.stdout, re.M))

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.echo_ok and self.technique is not None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> str:
        return (f"exit {self.code}{' (timed out)' if self.timed_out else ''} after "
                f"{self.elapsed:.2f} s\n--- stdout\n{self.stdout}--- stderr\n{self.stderr[-4000:]}")


def compile_once() -> None:
    """Byte-compile this checkout's package, as an installation would, once per process.

    Every lab host is a fresh process of this checkout; where the machine
    forbids writing byte code (``PYTHONDONTWRITEBYTECODE``), each would
    compile every module it imports again: 0.13 s of CPU per start, twelve
    starts at once on two cores in the group scenario.
    """
    global _COMPILED
    if not _COMPILED:
        compileall.compile_dir(str(REPO / "kerjostunt"), quiet=1)
        _COMPILED = True


_COMPILED = False


class Scenario:
    """The server and peers of one end-to-end run in a built ``Lab``."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        *,
        reactor: Any = None,
        domain: str = DOMAIN,
        verbose: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        compile_once()
        self.lab = lab
        self.reactor = reactor
        self.domain = domain
        self.verbose = verbose
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.workdir / "kerjostunt.sqlite"
        self.db_url = f"sqlite:///{self.db_path}"
        self.certs = self.workdir / "certs"
        self.ca = self.certs / "ca.pem"
        self.passwords: dict[str, str] = {}
        self.processes: list[LabProcess] = []
        self.server_process: LabProcess | None = None
        self.web_port = 0
        self._counter_names: list[str] = []
        self._counters_ready = False
        self._nft_names: dict[str, str] = {"kj_server": "server"}
        self._names: dict[str, int] = {}

    # -- addresses ------------------------------------------------------------

    @property
    def server_address(self) -> str:
        return f"{self.lab.server.ip}:{SIP_PORT}"

    def host(self, name: str | Host) -> Host:
        if isinstance(name, Host):
            return name
        if name == "server":
            return self.lab.server
        if name == "core":
            return self.lab.core
        return self.lab.peers[name]

    def public_ip(self, peer: str) -> str:
        """The address the world sees ``peer`` at (its NAT's, or its own)."""
        host = self.host(peer)
        return host.nat_public_ip or host.ip

    # -- processes ------------------------------------------------------------

    def spawn(
        self,
        host: str | Host,
        argv: Sequence[str],
        *,
        name: str | None = None,
        stdin: str | None = None,
        limit: float | None = None,
    ) -> LabProcess:
        """Start ``argv`` in ``host``'s namespace; ``stdin`` is written and
        closed; ``limit`` kills it after that many seconds."""
        h = self.host(host)
        base = name or f"{h.name}:{Path(argv[0]).name}"
        n = self._names[base] = self._names.get(base, 0) + 1
        proto = LabProcess(base if n == 1 else f"{base}#{n}", self.reactor)
        full = self.lab.exec_argv(h, list(argv))
        self.reactor.spawnProcess(proto, full[0], full, env=child_env(),
                                  path=str(self.workdir))
        self.processes.append(proto)
        if stdin is not None:
            proto.transport.write(stdin.encode())
        proto.transport.closeStdin()
        if limit is not None:
            proto.set_limit(limit)
        return proto

    @defer.inlineCallbacks
    def run(self, host: str | Host, argv: Sequence[str], *, limit: float = 60.0,
            stdin: str | None = None, name: str | None = None):
        """Run to completion; fires with the ``LabProcess`` (check
        ``exit_code``)."""
        proc = self.spawn(host, argv, name=name, stdin=stdin, limit=limit)
        yield proc.ended
        return proc

    @defer.inlineCallbacks
    def stop(self):
        """Stop every process still running (the server last), and save the
        outputs next to the database for a post-mortem."""
        procs = [p for p in self.processes if p is not self.server_process]
        yield defer.DeferredList([p.stop() for p in procs])
        if self.server_process is not None:
            yield self.server_process.stop(grace=5.0)
        for p in self.processes:
            safe = re.sub(r"[^A-Za-z0-9_.#-]", "_", p.name)
            try:
                (self.workdir / f"{safe}.log").write_text(
                    f"# {p.describe_exit()}\n{p.output}")
            except OSError:
                pass

    def processes_named(self, part: str) -> list[LabProcess]:
        """Processes whose name contains ``part`` (e.g. ``"echo-server"``)."""
        return [p for p in self.processes if part in p.name]

    def transcript(self, tail: int = 4000) -> str:
        """Every process's status and output tail (for failure messages)."""
        parts = []
        for p in self.processes:
            parts.append(f"=== {p.name} ({p.describe_exit()})\n{p.output[-tail:]}")
        return "\n".join(parts)

    # -- kerjostunt commands ----------------------------------------------------

    def kerjostunt_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", _KERJOSTUNT, *args]

    @defer.inlineCallbacks
    def admin(self, *args: str, stdin: str | None = None):
        """``kerjostunt ARGS --db URL`` on the server; fails unless exit 0."""
        proc = yield self.run("server", self.kerjostunt_argv(*args, "--db", self.db_url),
                              stdin=stdin, limit=60.0, name="admin")
        if proc.exit_code != 0:
            raise RuntimeError(f"kerjostunt {' '.join(args)}: {proc.describe_exit()}: "
                               f"{proc.output}")
        return proc

    @defer.inlineCallbacks
    def add_users(self, users: dict[str, str] | Iterable[str],
                  groups: dict[str, Sequence[str]] | None = None):
        """Create users (``{id: password}``, or ids with random passwords)
        and groups (default: one group ``friends`` holding all of them)."""
        if not isinstance(users, dict):
            users = {u: secrets.token_urlsafe(12) for u in users}
        if groups is None:
            groups = {"friends": list(users)}
        # One `user import` (CSV) creates users, groups and memberships at once.
        member_of: dict[str, list[str]] = {u: [] for u in users}
        for group, members in groups.items():
            for m in members:
                member_of[m].append(group)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["user_id", "password", "groups"])
        for user_id, password in users.items():
            writer.writerow([user_id, password, " ".join(member_of[user_id])])
        yield self.admin("user", "import", "-", "--create", "--domain", self.domain,
                         stdin=buf.getvalue())
        self.passwords.update(users)
        for group, members in groups.items():
            if not members:
                yield self.admin("group", "add", group)

    def server_ips(self) -> list[str]:
        """The server's addresses it listens on: its IPv6 one too in a lab with dual-stack sites
        (tests/natlab/v6.py), so their agents also probe it over IPv6 and the server lists both
        of their addresses (the peers signal over IPv4)."""
        return [self.lab.server.ip] + ([SERVER_V6] if self.lab.ipv6 else [])

    def server_argv(self, *extra: str) -> list[str]:
        """``twistd -n kerjostunt`` bound to the server's IPs; the HTTPS web
        service only when ``web_port`` is set (``start_server(web_port=...)``)."""
        s = self.lab.server
        return [
            sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "kerjostunt",
            "--port", str(SIP_PORT), "--interface", ",".join(self.server_ips()),
            "--domain", self.domain, "--db", self.db_url,
            "--certs", str(self.certs), "--cert-host", s.ip,
            "--probe-ports", ",".join(map(str, PROBE_PORTS)),
            "--probe-alt-ip", s.ip2 or "",
            "--web-port", str(self.web_port), *extra,
        ]

    @defer.inlineCallbacks
    def start_server(self, *extra: str, web_port: int = 0, timeout: float = 30.0):
        """Start ``twistd kerjostunt`` in the server namespace; fires once
        the signaling, every probe port (and the web port, if any) accept
        connections."""
        s = self.lab.server
        self.web_port = web_port
        proc = self.spawn("server", self.server_argv(*extra), name="twistd")
        self.server_process = proc
        addrs = [f"{ip}:{SIP_PORT}" for ip in self.server_ips()]
        addrs += [f"{ip}:{p}" for ip in (s.ip, s.ip2, *self.server_ips()[1:]) for p in PROBE_PORTS]
        if web_port:
            addrs.append(f"{s.ip}:{web_port}")
        probe = self.spawn("server", [sys.executable, "-c", _WAIT_LISTENING,
                                      str(timeout), *addrs],
                           name="wait-listening", limit=timeout + 10)
        # Whichever ends first: the wait (good) or the server (bad).
        winner = yield defer.DeferredList(
            [probe.ended, proc.ended], fireOnOneCallback=True, consumeErrors=True)
        _, index = winner
        if index == 1 or not proc.running:
            yield probe.stop()
            raise ProcessExited(proc._gone("listening"))
        if probe.exit_code != 0:
            raise TimeoutError(f"server not listening: {probe.output}\n"
                               f"server output:\n{proc.output[-3000:]}")
        return proc

    def client_args(self, user: str, verbose: bool | None = None) -> list[str]:
        args = ["--server", self.server_address, "--user", user,
                "--password-stdin", "--ca", str(self.ca), "--domain", self.domain]
        if self.verbose if verbose is None else verbose:
            args.append("--verbose")  # the details go to stderr, into transcripts
        return args

    def _password(self, user: str, password: str | None) -> str:
        return (password if password is not None else self.passwords[user]) + "\n"

    @defer.inlineCallbacks
    def start_echo_server(self, peer: str, user: str, *extra: str,
                          password: str | None = None, timeout: float = 30.0,
                          limit: float = 900.0):
        """``kerjostunt echo-server`` in ``peer``'s namespace; fires with the
        process once the server has seen it register."""
        argv = self.kerjostunt_argv("echo-server", *self.client_args(user), *extra)
        proc = self.spawn(peer, argv, name=f"{peer}:echo-server",
                          stdin=self._password(user, password), limit=limit)
        yield self.wait_registered(user, proc, timeout)
        return proc

    @defer.inlineCallbacks
    def wait_registered(self, user: str, proc: LabProcess | None = None,
                        timeout: float = 30.0, since: float = 0.0):
        """Fires once the database says ``user`` was seen (REGISTER records
        it) after ``since``; fails if ``proc`` ends first."""
        deadline = self.reactor.seconds() + timeout
        while True:
            record = yield self.user(user)
            if record.last_seen is not None and record.last_seen >= since:
                return record
            if proc is not None and not proc.running:
                raise ProcessExited(proc._gone("registered"))
            if self.reactor.seconds() > deadline:
                raise TimeoutError(f"{user} did not register within {timeout:g} s\n"
                                   + self.transcript())
            yield task.deferLater(self.reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def echo_client(self, peer: str, user: str, target: str, *extra: str,
                    message: str | None = None, timeout: float = 20.0,
                    password: str | None = None):
        """Run ``kerjostunt echo-client ... TARGET --message M --timeout T``
        in ``peer``'s namespace; fires with a ``ClientResult``.  The process
        is killed 15 s after its own ``--timeout``."""
        if message is None:
            message = unique_message()
        argv = self.kerjostunt_argv(
            "echo-client", *self.client_args(user), target,
            "--message", message, "--timeout", f"{timeout:g}", *extra)
        proc = self.spawn(peer, argv, name=f"{peer}:echo-client",
                          stdin=self._password(user, password), limit=timeout + 15)
        yield proc.ended
        result = ClientResult(
            code=proc.exit_code, stdout=proc.stdout, stderr=proc.stderr,
            elapsed=(proc.ended_at or self.reactor.seconds()) - proc.started_at,
            timed_out=proc.timed_out, message=message,
        )
        m = CONNECTED_RE.search(proc.stdout)
        if m:
            result.peer = m["peer"]
            result.technique = m["technique"]
            result.connect_ms = float(m["ms"])
        f = FAILED_RE.search(proc.stdout + proc.stderr)
        if f:
            result.failed = f["reason"]
        return result

    # -- groups of peers (kerjostunt join, issue 6) -------------------------------

    def join_argv(self, user: str, group: str, *extra: str) -> list[str]:
        """``kerjostunt join`` (the peer manager); it fetches the group's
        trusted peers over HTTPS, so the server needs a web port."""
        web = ["--web-port", str(self.web_port)] if self.web_port else []
        return self.kerjostunt_argv("join", *self.client_args(user, verbose=False),
                                    *web, group, *extra)

    def start_join(self, peer: str, user: str, group: str, *extra: str,
                   password: str | None = None, limit: float = 300.0) -> LabProcess:
        """``kerjostunt join ... GROUP`` in ``peer``'s namespace (not waited for)."""
        return self.spawn(peer, self.join_argv(user, group, *extra),
                          name=f"{peer}:join", stdin=self._password(user, password),
                          limit=limit)

    @defer.inlineCallbacks
    def start_group(self, members: dict[str, str], group: str = "friends",
                    *extra: str, start_server: bool = True, limit: float = 300.0,
                    stagger: float = 0.0, web_port: int = 8443):
        """Peers of one group, one per lab host: ``members`` maps a host
        (``"a1"``, ``"b1"``, ``"c1"``...) to a user ID.  Creates the users
        (random passwords) and the group, starts the server unless told not
        to, then runs ``kerjostunt join`` for each member (``stagger``
        seconds apart).  Fires with ``{user: LabProcess}``."""
        users = list(members.values())
        yield self.add_users(users, {group: users})
        if start_server:
            yield self.start_server(web_port=web_port)
        procs = {}
        for host, user in members.items():
            procs[user] = self.start_join(host, user, group, *extra, limit=limit)
            if stagger:
                yield task.deferLater(self.reactor, stagger, lambda: None)
        return procs

    # -- the database (read in a worker thread) -----------------------------------

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _with_db(self, fn: Callable[[Any], Any]) -> defer.Deferred:
        url = self.db_url

        def work() -> Any:
            from kerjostunt.store import Database

            db = Database(url)
            try:
                return fn(db)
            finally:
                db.close()

        return self._in_thread(work)

    def user(self, user_id: str) -> defer.Deferred:
        """Fires with the user's ``UserRecord``."""
        return self._with_db(lambda db: db.get_user(user_id))

    def attempts(self, user_id: str, limit: int = 50) -> defer.Deferred:
        """Fires with the user's attempts (``AttemptRecord``), newest first."""
        return self._with_db(lambda db: db.recent_attempts(user_id, limit))

    @defer.inlineCallbacks
    def wait_attempt(self, caller: str, callee: str, *, since: float = 0.0,
                     count: int = 1, timeout: float = 45.0):
        """Fires with the newest attempt caller -> callee recorded at or after
        ``since`` (wall clock), once ``count`` of them exist.  The server
        records a failure only when both sides reported it or 30 s after the
        dial moment, hence the long default."""
        deadline = self.reactor.seconds() + timeout
        while True:
            rows = yield self.attempts(caller)
            found = [a for a in rows if a.caller == caller and a.callee == callee
                     and a.when >= since - 1.0]
            if len(found) >= count:
                return found[0]
            if self.reactor.seconds() > deadline:
                raise TimeoutError(
                    f"no attempt {caller} -> {callee} recorded within {timeout:g} s "
                    f"(rows: {rows})")
            yield task.deferLater(self.reactor, 0.2, lambda: None)

    # -- traffic counters in the core router ---------------------------------------

    @defer.inlineCallbacks
    def _nft(self, host: str, script: str):
        proc = yield self.run(host, ["nft", "-f", "-"], stdin=script, limit=30.0,
                              name=f"{host}:nft")
        if proc.exit_code != 0:
            raise RuntimeError(f"nft in {host}: {proc.output}\n{script}")

    def _table_script(self) -> str:
        """The counting table and the server link's counter, the first time."""
        if self._counters_ready:
            return ""
        self._counters_ready = True
        self._counter_names.append("server")
        return ("table inet kjcount {\n"
                "  counter kj_server { }\n"
                "  chain counting {\n"
                "    type filter hook forward priority -150; policy accept;\n"
                '    iifname "s0" counter name kj_server\n'
                '    oifname "s0" counter name kj_server\n'
                "  }\n}\n")

    def _counter_script(self, name: str, matches: list[str]) -> str:
        """nft commands adding counter ``name`` and one rule per match; the
        first call also creates the table and the server link's counter."""
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise ValueError(f"bad counter name {name!r}")
        lines = [self._table_script()]
        # Prefixed: a bare name like "all" would be an nft keyword.
        nft_name = "kj_" + name.replace("-", "_")
        self._nft_names[nft_name] = name
        lines.append(f"add counter inet kjcount {nft_name}\n")
        for match in matches:
            lines.append(f"add rule inet kjcount counting {match} counter name {nft_name}\n")
        self._counter_names.append(name)
        return "".join(lines)

    def count_traffic(self, name: str, a_ip: str, b_ip: str | None = None) -> defer.Deferred:
        """Count, in the core router, packets forwarded between ``a_ip`` and
        ``b_ip`` (both ways), or to and from ``a_ip`` alone.  The server link
        is always counted as ``"server"``.  Read with ``read_counters``."""
        if b_ip is None:
            matches = [f"ip saddr {a_ip}", f"ip daddr {a_ip}"]
        else:
            matches = [f"ip saddr {s} ip daddr {d}" for s, d in ((a_ip, b_ip), (b_ip, a_ip))]
        return self._nft("core", self._counter_script(name, matches))

    def count_traffic_data(self, name: str, a_ip: str, b_ip: str,
                           min_length: int = 400) -> defer.Deferred:
        """Like ``count_traffic`` between two addresses, but only TCP packets
        of at least ``min_length`` bytes (IP length) without SYN or RST: the
        ones that carry application data, not handshakes or punch attempts."""
        matches = [f"ip saddr {s} ip daddr {d} ip length >= {min_length} "
                   f"tcp flags & (syn | rst) == 0" for s, d in ((a_ip, b_ip), (b_ip, a_ip))]
        return self._nft("core", self._counter_script(name, matches))

    @defer.inlineCallbacks
    def read_counters(self):
        """Fires with ``{name: (packets, bytes)}`` (``"server"`` at least)."""
        if not self._counters_ready:
            yield self._nft("core", self._table_script())
        proc = yield self.run("core", ["nft", "-j", "list", "counters", "table",
                                       "inet", "kjcount"], limit=30.0, name="core:nft")
        if proc.exit_code != 0:
            raise RuntimeError(f"nft list counters: {proc.output}")
        result = {}
        for item in json.loads(proc.stdout)["nftables"]:
            c = item.get("counter")
            if c:
                name = self._nft_names.get(c["name"], c["name"])
                result[name] = (c["packets"], c["bytes"])
        return result


def unique_message(length: int = 48) -> str:
    """A random line no other traffic contains."""
    text = "kj-" + secrets.token_hex(length)
    return text[:max(length, 8)]


def wall_clock() -> float:
    """The database records attempts with wall-clock times."""
    return time.time()
