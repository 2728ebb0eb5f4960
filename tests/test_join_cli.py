"""``kerjostunt join`` on loopback: three members of one group reach each other and hang up.

A real server (signaling, probes, calls, web) on 127.0.0.1 port 0; three
``join`` runs, in-process with this reactor and as child processes. Nothing
sleeps: every wait is for a line the command prints.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt import cli
from kerjostunt.client.cli import join as commands_join
from kerjostunt.client.directory import PeerEntry

from .processes import child_env, spawn
from .support import DOMAIN, add_users
from .test_web import start_web_server

TRIO = {"xena": "warrior-princess", "yuri": "cosmonaut-1961", "zack": "saved-by-the-bell"}


class WatchedOutput(io.StringIO):
    """stdout for an in-process run: fires waiters when a line shows up."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[str, defer.Deferred[None]]] = []

    def write(self, text: str) -> int:
        n = super().write(text)
        seen = self.getvalue()
        ready = [(m, d) for m, d in self._waiters if m in seen]
        self._waiters = [(m, d) for m, d in self._waiters if m not in seen]
        for _, d in ready:
            d.callback(None)
        return n

    def wait_for(self, marker: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if marker in self.getvalue():
            d.callback(None)
        else:
            self._waiters.append((marker, d))
        return d


def expectations(user: str) -> list[str]:
    """What ``user``'s join prints once it has reached both others and hung up."""
    others = [u for u in TRIO if u != user]
    lines = [f"peer {o} connected" for o in others]
    lines += [f"says: hello from {o}" for o in others]
    lines.append("signaling closed (all 2 peers done)")
    lines.append(f"peers: 2 connected ({', '.join(others)})")
    return lines


class JoinLoopbackTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)
        add_users(self.web.running, TRIO, group="trio")

    def argv(self, user: str, *extra: str) -> list[str]:
        return [
            "join",
            "--server", f"localhost:{self.web.running.port}",
            "--web-port", str(self.web.web_port),
            "--user", user,
            "--password-stdin",
            "--ca", str(self.web.running.ca),
            "--domain", DOMAIN,
            *extra,
            "trio",
        ]

    @defer.inlineCallbacks
    def test_three_in_process_reach_each_other_and_hang_up(self):  # type: ignore[no-untyped-def]
        runs: dict[str, tuple[WatchedOutput, io.StringIO, defer.Deferred, defer.Deferred]] = {}
        for user, password in TRIO.items():
            args = cli.build_parser().parse_args(self.argv(user))
            out, err, stopped = WatchedOutput(), io.StringIO(), defer.Deferred()
            done = commands_join.run(reactor, args, io.StringIO(password + "\n"), out, err, stopped=stopped)
            runs[user] = (out, err, stopped, done)
        self.addCleanup(self._stop_all, runs)
        try:
            yield defer.gatherResults(
                [out.wait_for(line) for user, (out, *_rest) in runs.items() for line in expectations(user)],
                consumeErrors=True,
            )
            # Hanging up is asynchronous on the server's side: wait for it to see all three go.
            yield self._registrar_empty()
        except BaseException:
            for user, (out, err, *_rest) in runs.items():
                print(f"--- {user}\n{out.getvalue()}{err.getvalue()}", file=sys.stderr)
            raise
        self.assertEqual(len(self.web.server.registrar), 0)
        for user, (out, *_rest) in runs.items():
            text = out.getvalue()
            self.assertIn("signaling opened (starting)", text)
            others = [u for u in TRIO if u != user]
            for other in others:
                # Our hello reached each peer and came back.
                self.assertIn(f"peer {other} echoed: hello from {user}", text)
            self.assertNotIn("unreachable", text)

        # Stopping one: the other two see it drop and open signaling again.
        out_x, _, stopped_x, done_x = runs["xena"]
        stopped_x.callback(None)
        self.assertEqual((yield done_x), 0)
        yield defer.gatherResults([runs[u][0].wait_for("signaling opened (xena dropped)") for u in ("yuri", "zack")])

    def _registrar_empty(self) -> defer.Deferred[None]:
        from twisted.internet import task

        registrar = self.web.server.registrar

        def check() -> None:
            if len(registrar) == 0:
                loop.stop()

        loop = task.LoopingCall(check)
        loop.clock = reactor
        return loop.start(0.05).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def _stop_all(self, runs: dict[str, Any]):  # type: ignore[no-untyped-def]
        for _out, _err, stopped, done in runs.values():
            if not stopped.called:
                stopped.callback(None)
            yield done

    @defer.inlineCallbacks
    def test_three_child_processes_reach_each_other_and_hang_up(self):  # type: ignore[no-untyped-def]
        procs = {}
        for user, password in TRIO.items():
            verbose = ["--verbose"] if user == "xena" else []
            procs[user] = spawn(
                self, f"join {user}", sys.executable, ["-m", "kerjostunt.cli", *self.argv(user, *verbose)],
                env=child_env(PYTHONUNBUFFERED="1"), stdin=(password + "\n").encode(),
            )
        try:
            yield defer.gatherResults(
                [procs[u].wait_for(line.encode()) for u in TRIO for line in expectations(u)],
                consumeErrors=True,
            )
            yield self._registrar_empty()
        except BaseException:
            for user, proc in procs.items():
                print(f"--- {user}\n{proc.output}", file=sys.stderr)
            raise
        for proc in procs.values():
            code = yield proc.stop()
            self.assertEqual(code, 0, proc.output)
            self.assertIn("stopped", proc.output)
        # --verbose: the library's debug events on stderr; without it, none.
        self.assertIn(b"#debug] ", bytes(procs["xena"].err))
        self.assertNotIn(b"#debug] ", bytes(procs["yuri"].err) + bytes(procs["zack"].err))

    @defer.inlineCallbacks
    def test_closed_pipe_ends_the_command_quietly(self):  # type: ignore[no-untyped-def]
        """``kerjostunt join | head -1``: the reader goes, join ends with 0 and no traceback."""
        from twisted.internet.protocol import ProcessProtocol

        class HeadOne(ProcessProtocol):
            def __init__(self) -> None:
                self.out, self.err = b"", b""
                self.ended: defer.Deferred[int] = defer.Deferred()

            def connectionMade(self) -> None:
                self.transport.write(TRIO["xena"].encode() + b"\n")  # type: ignore[union-attr]
                self.transport.closeStdin()  # type: ignore[union-attr]

            def outReceived(self, data: bytes) -> None:
                if not self.out:
                    self.out = data
                    self.transport.closeStdout()  # type: ignore[union-attr]  # as head does after its line

            def errReceived(self, data: bytes) -> None:
                self.err += data

            def processEnded(self, reason) -> None:  # type: ignore[no-untyped-def]
                self.ended.callback(reason.value.exitCode)

        proto = HeadOne()
        argv = [sys.executable, "-m", "kerjostunt.cli", *self.argv("xena")]
        process = reactor.spawnProcess(proto, sys.executable, argv, env=child_env(PYTHONUNBUFFERED="1"))
        killer = reactor.callLater(60, process.signalProcess, "KILL")
        code = yield proto.ended
        if killer.active():
            killer.cancel()
        self.assertEqual(code, 0, proto.err.decode())
        self.assertNotIn(b"Traceback", proto.err)
        self.assertNotIn(b"BrokenPipe", proto.err)

    @defer.inlineCallbacks
    def test_wrong_password_exits_1(self):  # type: ignore[no-untyped-def]
        args = cli.build_parser().parse_args(self.argv("xena"))
        out, err = io.StringIO(), io.StringIO()
        code = yield commands_join.run(reactor, args, io.StringIO("nope\n"), out, err)
        self.assertEqual(code, 1)
        self.assertIn("kerjostunt join: error:", err.getvalue())

    @defer.inlineCallbacks
    def test_no_password_exits_2(self):  # type: ignore[no-untyped-def]
        args = cli.build_parser().parse_args(self.argv("xena"))
        out, err = io.StringIO(), io.StringIO()
        code = yield commands_join.run(reactor, args, io.StringIO(""), out, err)
        self.assertEqual(code, 2)


class FakeAgent:
    """Stands in for ``PeerAgent`` in ``join``'s own wiring: start and each call wait for the test."""

    made: list[FakeAgent] = []

    def __init__(self, reactor: Any, config: Any, accept_factory: Any = None, on_peer: Any = None) -> None:
        self.on_progress: Any = None
        self.signaling_up = False
        self.public_ip: str | None = None
        self.started: defer.Deferred[None] = defer.Deferred()
        self.calls: dict[str, defer.Deferred[Any]] = {}
        FakeAgent.made.append(self)

    def start(self) -> defer.Deferred[None]:
        def up(result: None) -> None:
            self.signaling_up = True
            return result

        return self.started.addCallback(up)

    def stop(self) -> defer.Deferred[None]:
        self.signaling_up = False
        return defer.succeed(None)

    def connect(self, peer_id: str, factory: Any, *, timeout: float = 20.0, prefer_stunt: bool = False) -> Any:
        self.calls[peer_id] = defer.Deferred()
        return self.calls[peer_id]


class JoinProgressTests(unittest.TestCase):
    """``join``'s progress lines on stderr, exact text, on a Clock: the list, registering, each call, a punch.

    The directory and the agent are fakes; the manager, the CLI wiring and
    the output are join's own.
    """

    def setUp(self) -> None:
        from kerjostunt.client import agent as agent_module

        FakeAgent.made = []
        self.patch(agent_module, "PeerAgent", FakeAgent)
        self.clock = Clock()
        self.lists: list[defer.Deferred[list[PeerEntry]]] = []

        def fetch(*args: Any, **kwargs: Any) -> defer.Deferred[list[PeerEntry]]:
            self.lists.append(defer.Deferred())
            return self.lists[-1]

        self.patch(commands_join, "fetch_peers", fetch)

    def start(self, *extra: str) -> tuple[defer.Deferred[int], io.StringIO, io.StringIO, defer.Deferred[None]]:
        argv = ["join", "--server", "localhost", "--user", "xena", "--password-stdin", "--ca", "ca.pem",
                "--no-port-mapping", *extra, "trio"]
        out, err, stopped = io.StringIO(), io.StringIO(), defer.Deferred()
        done = commands_join.run(self.clock, cli.build_parser().parse_args(argv), io.StringIO("pw\n"), out, err,
                                 stopped=stopped)
        return done, out, err, stopped

    def load(self, *peers: str) -> None:
        self.lists[0].callback([PeerEntry(p, "unknown", None, None, None, False, None) for p in ("xena", *peers)])

    def stop(self, done: defer.Deferred[int], stopped: defer.Deferred[None]) -> None:
        stopped.callback(None)
        self.assertEqual(self.successResultOf(done), 0)
        self.clock.advance(60)

    def test_two_calls_and_a_punch(self) -> None:
        done, out, err, stopped = self.start()
        self.clock.advance(1.0)
        self.load("yuri", "zack")
        self.clock.advance(1.2)  # registering
        agent = FakeAgent.made[0]
        agent.started.callback(None)
        self.assertEqual(sorted(agent.calls), ["yuri", "zack"])
        self.clock.advance(0.5)
        agent.on_progress("punching (simultaneous open)")  # two calling: whose is not known
        self.clock.advance(0.3)
        agent.calls["zack"].errback(ConnectionError("refused"))  # zack's call: 0.8 s, no line
        self.clock.advance(0.2)  # yuri's call: 1.0 s
        self.assertEqual(err.getvalue(), "loading the peers list of trio…\nregistering…\ncalling yuri…\n")
        self.clock.advance(0.5)  # the punch: 1.0 s
        agent.calls["yuri"].errback(ConnectionError("refused"))
        self.stop(done, stopped)
        self.assertEqual(err.getvalue(), "loading the peers list of trio…\nregistering…\ncalling yuri…\n"
                                         "punching (simultaneous open)…\n")
        # stdout keeps its lines (the per-peer ones are tested above), and no progress line.
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], "joining trio as xena")
        self.assertIn("signaling opened (starting)", lines)
        self.assertIn("stopping", lines)
        self.assertEqual(lines[-1], "stopped")
        self.assertNotIn("…", out.getvalue())

    def test_one_call_its_punch_replaces_its_call(self) -> None:
        done, _, err, stopped = self.start()
        self.load("yuri")
        agent = FakeAgent.made[0]
        agent.started.callback(None)
        self.clock.advance(0.9)
        agent.on_progress("punching (simultaneous open)")  # yuri's step now, with its own second
        self.clock.advance(0.9)
        self.assertEqual(err.getvalue(), "")
        self.clock.advance(0.1)
        self.assertEqual(err.getvalue(), "punching (simultaneous open)…\n")
        self.stop(done, stopped)
        self.assertEqual(err.getvalue(), "punching (simultaneous open)…\n")

    def test_quiet(self) -> None:
        done, _, err, stopped = self.start("-q")
        self.clock.advance(5)
        self.load("yuri")
        self.clock.advance(5)
        FakeAgent.made[0].started.callback(None)
        self.clock.advance(5)
        self.stop(done, stopped)
        self.assertEqual(err.getvalue(), "")
