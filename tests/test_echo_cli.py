"""``kerjostunt echo-server`` / ``echo-client`` as real processes against a server on loopback."""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.trial import unittest

from .support import DOMAIN, add_users, start_server, subprocess_env

CLI = [sys.executable, "-m", "kerjostunt.cli"]


class Process(protocol.ProcessProtocol):
    """A spawned echo-server: its stdout lines as they come, its exit."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.out = b""
        self.err = b""
        self.line_waiters: list[tuple[re.Pattern, defer.Deferred]] = []
        self.ended: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.password.encode() + b"\n")
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        text = self.out.decode()
        for item in list(self.line_waiters):
            m = item[0].search(text)
            if m:
                self.line_waiters.remove(item)
                item[1].callback(m)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(error.ProcessDone, error.ProcessTerminated) else None
        for _, d in self.line_waiters:
            d.errback(RuntimeError(f"process ended: {self.out!r} {self.err[-2000:]!r}"))
        self.line_waiters = []
        self.ended.callback(code)

    def wait_line(self, pattern: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        regex = re.compile(pattern, re.M)
        m = regex.search(self.out.decode())
        if m:
            d.callback(m)
        elif self.ended.called:
            d.errback(RuntimeError(f"process ended: {self.out!r} {self.err[-2000:]!r}"))
        else:
            self.line_waiters.append((regex, d))
        return d.addTimeout(30, reactor)


class EchoCLITests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder", "dave": "diver"})

    def common(self, user: str) -> list[str]:
        return ["--server", f"{self.running.host}:{self.running.port}", "--user", user, "--password-stdin",
                "--ca", str(self.running.ca), "--domain", DOMAIN, "--verbose"]

    def start_echo_server(self, user: str, password: str) -> Process:
        proc = Process(password)
        reactor.spawnProcess(proc, sys.executable, CLI + ["echo-server", *self.common(user)], env=subprocess_env())

        def stop() -> defer.Deferred:
            if not proc.ended.called:
                proc.transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(stop)
        return proc

    def echo_client(self, user: str, password: str, *args: str) -> defer.Deferred:
        return _run_with_stdin(CLI + ["echo-client", *self.common(user), *args], password + "\n")

    @defer.inlineCallbacks
    def test_echo_ok_and_the_server_logs_the_peer(self):  # type: ignore[no-untyped-def]
        server = self.start_echo_server("bob", "builder")
        yield server.wait_line(r"^registered as bob")
        out, err, code = yield self.echo_client("alice", "wonderland", "bob", "--message", "ping 123", "--timeout", "20")
        self.assertEqual(code, 0, err.decode()[-3000:])
        lines = out.decode().splitlines()
        self.assertRegex(lines[0], r"^connected to bob via (lan|public|simultaneous-open|low-ttl|accepted) in \d+ ms$")
        self.assertEqual(lines[1], "echo ok")
        m = yield server.wait_line(r"^peer alice connected via (\S+) from 127\.0\.0\.1:\d+$")
        self.assertIn(m.group(1), ("lan", "public", "simultaneous-open", "low-ttl", "accepted"))

        # SIGTERM: unregisters and exits 0.
        server.transport.signalProcess("TERM")
        code = yield server.ended
        self.assertEqual(code, 0, server.err.decode()[-3000:])
        self.assertIsNone(self.running.server.registrar.lookup("bob"))

    @defer.inlineCallbacks
    def test_offline_peer_fails_with_exit_1(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.echo_client("alice", "wonderland", "dave", "--timeout", "10")
        self.assertEqual(code, 1)
        self.assertRegex(out.decode(), r"(?m)^failed: dave is not online$")

    @defer.inlineCallbacks
    def test_unknown_peer_fails_with_exit_1(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.echo_client("alice", "wonderland", "nobody", "--timeout", "10")
        self.assertEqual(code, 1)
        self.assertRegex(out.decode(), r"(?m)^failed: no user nobody on this server$")

    @defer.inlineCallbacks
    def test_wrong_password_fails_with_exit_1(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.echo_client("alice", "nope", "bob", "--timeout", "10")
        self.assertEqual(code, 1)
        self.assertRegex(out.decode(), r"(?m)^failed: .*403")

    @defer.inlineCallbacks
    def test_usage_errors_exit_2(self):  # type: ignore[no-untyped-def]
        # No PEER_ID.
        _, _, code = yield self.echo_client("alice", "wonderland")
        self.assertEqual(code, 2)
        # Bad port.
        _, _, code = yield _run_with_stdin(
            CLI + ["echo-client", "--server", "127.0.0.1:0", "--user", "alice", "--password-stdin",
                   "--ca", str(self.running.ca), "bob"], "x\n")
        self.assertEqual(code, 2)
        # No password on stdin.
        _, err, code = yield _run_with_stdin(CLI + ["echo-client", *self.common("alice"), "bob"], "")
        self.assertEqual(code, 2)
        self.assertIn(b"password", err)
        # Missing CA file.
        _, _, code = yield _run_with_stdin(
            CLI + ["echo-server", "--server", "127.0.0.1", "--user", "bob", "--password-stdin",
                   "--ca", "/nonexistent/ca.pem"], "x\n")
        self.assertEqual(code, 2)


def _run_with_stdin(argv: list[str], stdin: str) -> defer.Deferred:
    """Like getProcessOutputAndValue, with text on stdin."""
    d: defer.Deferred = defer.Deferred()

    class Collect(protocol.ProcessProtocol):
        out = b""
        err = b""

        def connectionMade(self) -> None:
            self.transport.write(stdin.encode())
            self.transport.closeStdin()

        def outReceived(self, data: bytes) -> None:
            self.out += data

        def errReceived(self, data: bytes) -> None:
            self.err += data

        def processEnded(self, reason: Any) -> None:
            d.callback((self.out, self.err, reason.value.exitCode))

    reactor.spawnProcess(Collect(), argv[0], argv, env=subprocess_env())
    return d



class PunchPortAgeOptionTests(unittest.TestCase):
    """--punch-port-max-age reaches the agent; negative ages are usage errors."""

    def parse(self, *extra: str):  # type: ignore[no-untyped-def]
        from kerjostunt.cli import build_parser
        return build_parser().parse_args([
            "echo-client", "--server", "127.0.0.1", "--user", "alice", "--password-stdin",
            "--ca", "ca.pem", "bob", *extra])

    def test_default_and_zero(self) -> None:
        from twisted.internet.task import Clock

        from kerjostunt.client.cli.echo import _agent

        self.assertEqual(self.parse().punch_port_max_age, 30.0)
        agent = _agent(Clock(), self.parse("--punch-port-max-age", "0"), "pw")
        self.assertEqual(agent.ready_port.max_age, 0.0)

    def test_negative_is_refused(self) -> None:
        with self.assertRaises(SystemExit):
            self.parse("--punch-port-max-age", "-1")
