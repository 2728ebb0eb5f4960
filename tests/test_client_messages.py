"""What the client says when something fails or takes a while: one test per message, exact text.

The wording is in client/reasons.py (connection and call failures) and
client/cli/progress.py (progress lines, broken pipes, the ``--timeout``
bound); docs/client.rst lists them. The connection failures are shown on
real sockets with ``connect_signaling``; the call failures and progress
with the real ``kerjostunt echo-client`` process against an in-process
server.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet import error as net_error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt import __version__, cli, tls
from kerjostunt.client import reasons
from kerjostunt.client.cli.progress import Output, Progress, bounded
from kerjostunt.client.signaling import SignalingClientProtocol, SignalingError, connect_signaling

from .processes import child_env, free_port
from .support import DOMAIN, add_users, connect_client, start_server


class WordsTests(unittest.TestCase):
    def test_call_codes(self) -> None:
        self.assertEqual(reasons.call_failure(404, "bob", 0.2), "no user bob on this server")
        self.assertEqual(reasons.call_failure(480, "bob", 0.2), "bob is not online")
        self.assertEqual(reasons.call_failure(408, "bob", 15.02), "bob did not answer within 15 s")
        self.assertIsNone(reasons.call_failure(488, "bob", 1.0))

    def test_registration(self) -> None:
        self.assertEqual(reasons.registration_failure(403, "Forbidden: wrong credentials", "bob"),
                         "the server refused bob's password (403): check --user and the password "
                         "(an operator sets it with 'kerjostunt user passwd')")
        self.assertEqual(reasons.registration_failure(403, "Forbidden: too many failed attempts", "bob", "30"),
                         "the server refuses bob for now: too many failed logins (retry in 30 s)")
        self.assertEqual(reasons.registration_failure(503, "Service Unavailable", "bob"),
                         "REGISTER answered 503 Service Unavailable")

    def test_plain_never_shows_a_repr(self) -> None:
        from twisted.python.failure import Failure

        self.assertEqual(reasons.plain(Failure(net_error.ConnectionRefusedError())), "connection refused")
        self.assertEqual(reasons.plain(defer.CancelledError()), "CancelledError")
        self.assertEqual(reasons.plain(ValueError("two\nlines")), "two lines")

    def test_connect_failures(self) -> None:
        self.assertEqual(reasons.connect_failure(net_error.DNSLookupError("x"), "nowhere.example", 5061, 10),
                         "cannot resolve nowhere.example: is the --server name right?")
        self.assertEqual(reasons.connect_failure(net_error.TimeoutError(), "192.0.2.1", 5061, 10),
                         "no answer from 192.0.2.1:5061 within 10 s: is the server up, or does a firewall drop it?")


class SignalingConnectTests(unittest.TestCase):
    """The four ways a connection to the server fails, on real sockets, each in its own words."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)

    def connect(self, port: int, ca: Path, name: str = "localhost", timeout: float = 5.0):  # type: ignore[no-untyped-def]
        return connect_signaling(reactor, "127.0.0.1", port, tls.client_options(ca, name),
                                 lambda: SignalingClientProtocol(reactor, "bob", "pw", DOMAIN),
                                 timeout=timeout, expected_name=name)

    @defer.inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        port = free_port()
        e = yield self.assertFailure(self.connect(port, self.running.ca), SignalingError)
        self.assertEqual(str(e), f"127.0.0.1:{port} refused the connection: is the server running, and on this port?")

    @defer.inlineCallbacks
    def test_silent_server(self):  # type: ignore[no-untyped-def]
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        e = yield self.assertFailure(self.connect(port, self.running.ca, timeout=0.3), SignalingError)
        self.assertEqual(str(e), f"127.0.0.1:{port} accepted the connection but did not complete TLS within 0.3 s: "
                                 "is it a kerjostunt signaling port (--port of the server)?")

    @defer.inlineCallbacks
    def test_untrusted_ca(self):  # type: ignore[no-untyped-def]
        other = tls.ensure_certificates(Path(self.mktemp()), DOMAIN).ca
        assert other is not None
        e = yield self.assertFailure(self.connect(self.running.port, other), SignalingError)
        self.assertEqual(str(e), "the server's certificate is not signed by the --ca certificate: "
                                 "give the server's own certs/ca.pem")

    @defer.inlineCallbacks
    def test_host_name_mismatch(self):  # type: ignore[no-untyped-def]
        e = yield self.assertFailure(self.connect(self.running.port, self.running.ca, "wrong.example"),
                                     SignalingError)
        self.assertEqual(str(e), "the server's certificate is not valid for wrong.example: give the name it was made "
                                 "for with --tls-hostname, or add this one to the server's --cert-host")

    @defer.inlineCallbacks
    def test_wrong_password(self):  # type: ignore[no-untyped-def]
        add_users(self.running, {"bob": "pw"}, group=None)
        client = yield connect_client(self, self.running, "bob", "not-pw")
        e = yield self.assertFailure(client.register(), SignalingError)
        self.assertEqual(str(e), "the server refused bob's password (403): check --user and the password "
                                 "(an operator sets it with 'kerjostunt user passwd')")


class ProgressTests(unittest.TestCase):
    def test_a_step_over_a_second_gets_a_line(self) -> None:
        clock, err = Clock(), io.StringIO()
        progress = Progress(clock, err)
        progress.step("registering")
        clock.advance(0.9)
        progress.step("calling bob")  # registering took 0.9 s: no line
        clock.advance(1.0)
        progress.step("punching (simultaneous open)")
        clock.advance(1.5)
        progress.done()
        clock.advance(5)
        self.assertEqual(err.getvalue(), "calling bob…\npunching (simultaneous open)…\n")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_quiet(self) -> None:
        clock, err = Clock(), io.StringIO()
        progress = Progress(clock, err, quiet=True)
        progress.step("registering")
        progress.begin("bob", "calling bob")
        clock.advance(5)
        self.assertEqual(err.getvalue(), "")

    def test_keyed_steps_run_side_by_side(self) -> None:
        clock, err = Clock(), io.StringIO()
        progress = Progress(clock, err)
        progress.begin("bob", "calling bob")
        clock.advance(0.5)
        progress.begin("carol", "calling carol")
        clock.advance(0.6)  # bob's second is up, carol's is not
        progress.end("carol")
        progress.begin("bob", "punching (simultaneous open)")  # bob's next step: its own second
        clock.advance(0.9)
        progress.end("nobody")
        self.assertEqual(err.getvalue(), "calling bob…\n")
        clock.advance(0.1)
        progress.end_all()
        clock.advance(5)
        self.assertEqual(err.getvalue(), "calling bob…\npunching (simultaneous open)…\n")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bounded(self) -> None:
        clock = Clock()
        d = bounded(defer.Deferred(), clock, 2.0, lambda: ValueError("not registered within 2 s (--timeout)"))
        clock.advance(2.0)
        self.assertEqual(str(self.failureResultOf(d, ValueError).value), "not registered within 2 s (--timeout)")


class BrokenPipeStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError()


class OutputTests(unittest.TestCase):
    def test_broken_pipe_ends_quietly_once(self) -> None:
        gone: list[bool] = []
        out = Output(BrokenPipeStream(), lambda: gone.append(True))
        out.say("peer bob connected")
        out.say("peer carol connected")
        self.assertEqual(gone, [True])
        self.assertTrue(out.broken)

    def test_version(self) -> None:
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.assertEqual(cli.main(["--version"]), 0)
        self.assertEqual(stdout.getvalue(), f"kerjostunt {__version__}\n")


class EchoClientFailureTests(unittest.TestCase):
    """The real ``kerjostunt echo-client``: its ``failed:`` line for each refusal, and its progress."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self, call_answer_timeout=1.5)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})

    @defer.inlineCallbacks
    def echo_client(self, peer: str, *extra: str):  # type: ignore[no-untyped-def]
        args = ["-m", "kerjostunt.cli", "echo-client", "--server", f"127.0.0.1:{self.running.port}",
                "--user", "alice", "--password-stdin", "--ca", str(self.running.ca.resolve()),
                "--domain", DOMAIN, "--tls-hostname", "localhost", peer, *extra]
        out, err, code = yield _run(sys.executable, args, b"wonderland\n")
        return out.decode(), err.decode(), code

    @defer.inlineCallbacks
    def test_no_such_user(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.echo_client("nobody", "--timeout", "10")
        self.assertEqual((out, code), ("failed: no user nobody on this server\n", 1), err)

    @defer.inlineCallbacks
    def test_not_online(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.echo_client("bob", "--timeout", "10")
        self.assertEqual((out, code), ("failed: bob is not online\n", 1), err)

    @defer.inlineCallbacks
    def test_no_answer_and_progress(self):  # type: ignore[no-untyped-def]
        bob = yield connect_client(self, self.running, "bob", "builder", on_request=lambda proto, request: None)
        yield bob.register()
        out, err, code = yield self.echo_client("bob", "--timeout", "10")
        self.assertEqual((out, code), ("failed: bob did not answer within 2 s\n", 1), err)
        self.assertIn("calling bob…\n", err)
        self.assertNotIn("Traceback", err)
        out, err, code = yield self.echo_client("bob", "--timeout", "10", "-q")
        self.assertEqual((out, code), ("failed: bob did not answer within 2 s\n", 1), err)
        self.assertEqual(err, "")

    @defer.inlineCallbacks
    def test_timeout_bounds_a_silent_server(self):  # type: ignore[no-untyped-def]
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        args = ["-m", "kerjostunt.cli", "echo-client", "--server", f"127.0.0.1:{port}", "--user", "alice",
                "--password-stdin", "--ca", str(self.running.ca.resolve()), "bob", "--timeout", "2", "-q"]
        began = reactor.seconds()
        out, err, code = yield _run(sys.executable, args, b"wonderland\n")
        took = reactor.seconds() - began
        self.assertEqual(code, 1)
        self.assertEqual(out.decode(), f"failed: 127.0.0.1:{port} accepted the connection but did not complete TLS "
                                       "within 1.6 s: is it a kerjostunt signaling port (--port of the server)?\n")
        self.assertLess(took, 2 + 8.0)  # the interpreter's start-up is most of the rest


def _run(executable: str, args: list[str], stdin: bytes):  # type: ignore[no-untyped-def]
    from twisted.internet.protocol import ProcessProtocol

    class Collect(ProcessProtocol):
        def __init__(self) -> None:
            self.out, self.err = b"", b""
            self.done: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred()

        def connectionMade(self) -> None:
            self.transport.write(stdin)  # type: ignore[union-attr]
            self.transport.closeStdin()  # type: ignore[union-attr]

        def outReceived(self, data: bytes) -> None:
            self.out += data

        def errReceived(self, data: bytes) -> None:
            self.err += data

        def processEnded(self, reason) -> None:  # type: ignore[no-untyped-def]
            self.done.callback((self.out, self.err, reason.value.exitCode))

    proto = Collect()
    reactor.spawnProcess(proto, executable, [executable, *args], env=child_env())
    return proto.done


