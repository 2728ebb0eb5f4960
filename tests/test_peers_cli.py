"""The directory client and ``kerjostunt peers`` against a real server on port 0."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt import cli, tls
from kerjostunt.client import directory
from kerjostunt.client.cli import peers as commands_peers
from kerjostunt.client.directory import PeerEntry

from .support import DOMAIN
from .test_web import USERS, start_web_server


class DirectoryClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)
        self.ca = self.web.running.ca

    def fetch(self, user: str = "alice", password: str | None = None, group: str = "friends", **kwargs: Any):  # type: ignore[no-untyped-def]
        password = USERS[user] if password is None else password
        ca = kwargs.pop("ca", self.ca)
        base = kwargs.pop("base", self.web.url)
        return directory.fetch_peers(reactor, base, group, user, password, ca, **kwargs)

    @defer.inlineCallbacks
    def test_member_gets_peer_entries(self):  # type: ignore[no-untyped-def]
        yield self.web.server.store.record_seen("bob", "198.51.100.4", 6000, 50.0)
        yield self.web.server.store.record_attempt("c", "alice", "bob", "low-ttl", "stunt", None, None, 10.0, 60.0)
        peers = yield self.fetch()
        self.assertEqual(
            peers,
            [
                PeerEntry("alice", "stunt", None, None, None, False, None),
                PeerEntry("bob", "stunt", "198.51.100.4", 6000, None, False, 50.0, ("198.51.100.4:6000",)),
            ],
        )

    @defer.inlineCallbacks
    def test_by_ip_address_too(self):  # type: ignore[no-untyped-def]
        # The generated certificate names 127.0.0.1 as well as localhost.
        peers = yield self.fetch(base=f"https://127.0.0.1:{self.web.web_port}")
        self.assertEqual([p.user_id for p in peers], ["alice", "bob"])

    @defer.inlineCallbacks
    def test_text(self):  # type: ignore[no-untyped-def]
        text = yield directory.fetch_peers_text(reactor, self.web.url, "friends", "bob", USERS["bob"], self.ca)
        self.assertEqual(text.splitlines()[1:], ["alice - unknown", "bob - unknown"])

    @defer.inlineCallbacks
    def test_errors_are_clear(self):  # type: ignore[no-untyped-def]
        e = yield self.assertFailure(self.fetch(password="nope"), directory.WrongPassword)
        self.assertIn("wrong user ID or password", str(e))
        e = yield self.assertFailure(self.fetch("carol"), directory.NotAMember)
        self.assertEqual(str(e), "user 'carol' is not a member of group 'friends'")
        e = yield self.assertFailure(self.fetch(group="nosuch"), directory.UnknownGroup)
        self.assertEqual(str(e), "unknown group 'nosuch'")

    @defer.inlineCallbacks
    def test_wrong_ca_is_not_trusted(self):  # type: ignore[no-untyped-def]
        other = tls.ensure_certificates(Path(self.mktemp()), DOMAIN)
        e = yield self.assertFailure(self.fetch(ca=other.ca), directory.CertificateNotTrusted)
        self.assertEqual(str(e), "the server's certificate is not signed by the --ca certificate: "
                                 "give the server's own certs/ca.pem")

    @defer.inlineCallbacks
    def test_bad_ca_file_and_plain_http(self):  # type: ignore[no-untyped-def]
        missing = Path(self.mktemp())
        yield self.assertFailure(self.fetch(ca=missing), directory.DirectoryError)
        garbage = Path(self.mktemp())
        garbage.write_text("not a certificate")
        e = yield self.assertFailure(self.fetch(ca=garbage), directory.DirectoryError)
        self.assertIn("not a PEM certificate", str(e))
        e = yield self.assertFailure(self.fetch(base=f"http://localhost:{self.web.web_port}"), directory.DirectoryError)
        self.assertIn("https://", str(e))

    @defer.inlineCallbacks
    def test_store_outage_is_server_unavailable(self):  # type: ignore[no-untyped-def]
        yield self.web.server.store.stop()
        yield self.assertFailure(self.fetch(), directory.ServerUnavailable)


class PeersCommandTests(unittest.TestCase):
    """``kerjostunt peers`` in-process: the parser from ``cli``, the command's
    ``run`` with this reactor (trial's is already running, so not ``react``)."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)

    def argv(self, *extra: str, user: str = "alice") -> list[str]:
        return [
            "peers",
            "--server", f"localhost:{self.web.running.port}",
            "--web-port", str(self.web.web_port),
            "--user", user,
            "--password-stdin",
            "--ca", str(self.web.running.ca),
            *extra,
        ]

    @defer.inlineCallbacks
    def run_peers(self, argv: list[str], stdin: str):  # type: ignore[no-untyped-def]
        args = cli.build_parser().parse_args(argv)
        out, err = io.StringIO(), io.StringIO()
        code = yield commands_peers.run(reactor, args, io.StringIO(stdin), out, err)
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_table(self):  # type: ignore[no-untyped-def]
        yield self.web.server.store.record_seen("bob", "203.0.113.9", 7000, 10.0)
        code, out, err = yield self.run_peers(self.argv("friends"), "wonderland\n")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "USER   FLAG     ADDRESS           ONLINE",
                "alice  unknown  -                 no",
                "bob    unknown  203.0.113.9:7000  no",
            ],
        )

    @defer.inlineCallbacks
    def test_json_and_text(self):  # type: ignore[no-untyped-def]
        code, out, _ = yield self.run_peers(self.argv("--format", "json", "friends"), "wonderland\n")
        self.assertEqual(code, 0)
        document = json.loads(out)
        self.assertEqual(document["group"], "friends")
        self.assertEqual([p["user_id"] for p in document["peers"]], ["alice", "bob"])
        self.assertEqual(document["peers"][0]["use_stunt"], "unknown")
        code, out, _ = yield self.run_peers(self.argv("--format", "text", "friends"), "wonderland\n")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[1:], ["alice - unknown", "bob - unknown"])

    @defer.inlineCallbacks
    def test_auth_and_membership_errors_exit_1(self):  # type: ignore[no-untyped-def]
        code, out, err = yield self.run_peers(self.argv("friends"), "wrong\n")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("kerjostunt peers: error: "), err)
        self.assertIn("wrong user ID or password", err)
        code, _, err = yield self.run_peers(self.argv("friends", user="carol"), "christmas\n")
        self.assertEqual(code, 1)
        self.assertIn("not a member", err)
        code, _, err = yield self.run_peers(self.argv("nosuch"), "wonderland\n")
        self.assertEqual(code, 1)
        self.assertIn("unknown group", err)

    @defer.inlineCallbacks
    def test_usage_errors_exit_2(self):  # type: ignore[no-untyped-def]
        code, _, err = yield self.run_peers(self.argv("friends"), "")
        self.assertEqual(code, 2)
        self.assertIn("no password on stdin", err)
        argv = self.argv("friends")
        argv[2] = "::1"
        code, _, err = yield self.run_peers(argv, "wonderland\n")
        self.assertEqual(code, 2)
        self.assertIn("brackets", err)
        # argparse's own usage errors never reach the reactor.
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            self.assertEqual(cli.main(["peers", "--server", "localhost", "friends"]), 2)
        finally:
            sys.stderr = stderr

    def test_split_server(self) -> None:
        split = commands_peers.split_server
        self.assertEqual(split("example.org"), ("example.org", 5061))
        self.assertEqual(split("example.org:6000"), ("example.org", 6000))
        self.assertEqual(split("[2001:db8::1]:7000"), ("2001:db8::1", 7000))
        self.assertEqual(split("[2001:db8::1]"), ("2001:db8::1", 5061))
        for bad in ("", ":5", "host:0", "host:x", "[::1", "2001:db8::1"):
            self.assertRaises(commands_peers.UsageError, split, bad)
        self.assertEqual(commands_peers.web_url("2001:db8::1", 8443), "https://[2001:db8::1]:8443")


class PeersProgressTests(unittest.TestCase):
    """The progress line while the list loads: exact text on stderr, on a Clock, the fetch a fake."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fetches: list[defer.Deferred[list[PeerEntry]]] = []

        def fetch(*args: Any, **kwargs: Any) -> defer.Deferred[list[PeerEntry]]:
            self.fetches.append(defer.Deferred())
            return self.fetches[-1]

        self.patch(commands_peers, "fetch_peers", fetch)

    def start(self, *extra: str):  # type: ignore[no-untyped-def]
        argv = ["peers", "--server", "localhost", "--user", "alice", "--password-stdin", "--ca", "ca.pem",
                *extra, "friends"]
        out, err = io.StringIO(), io.StringIO()
        done = commands_peers.run(self.clock, cli.build_parser().parse_args(argv), io.StringIO("pw\n"), out, err)
        return done, out, err

    def test_a_slow_list_gets_a_line(self) -> None:
        done, out, err = self.start()
        self.clock.advance(0.99)
        self.assertEqual(err.getvalue(), "")
        self.clock.advance(0.01)
        self.assertEqual(err.getvalue(), "loading the peers list of friends…\n")
        self.fetches[0].callback([PeerEntry("bob", "unknown", None, None, None, True, None)])
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(out.getvalue().splitlines(), ["USER  FLAG     ADDRESS  ONLINE", "bob   unknown  -        yes"])
        self.clock.advance(10)
        self.assertEqual(err.getvalue(), "loading the peers list of friends…\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_quick_list_gets_none(self) -> None:
        done, _, err = self.start()
        self.clock.advance(0.5)
        self.fetches[0].errback(directory.WrongPassword("the server refused user 'alice': wrong user ID or password"))
        self.assertEqual(self.successResultOf(done), 1)
        self.clock.advance(10)
        self.assertEqual(err.getvalue(),
                         "kerjostunt peers: error: the server refused user 'alice': wrong user ID or password\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quiet(self) -> None:
        done, _, err = self.start("-q")
        self.clock.advance(5)
        self.fetches[0].callback([])
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(err.getvalue(), "")


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class ConsoleScriptTests(unittest.TestCase):
    """The real thing, reactor and all: ``python -m kerjostunt.cli peers`` in a child process."""

    @defer.inlineCallbacks
    def test_peers_in_a_child_process(self):  # type: ignore[no-untyped-def]
        web = yield start_web_server(self)
        argv = [
            sys.executable, "-m", "kerjostunt.cli", "peers",
            "--server", "localhost", "--web-port", str(web.web_port),
            "--user", "bob", "--password-stdin", "--ca", str(web.running.ca), "friends",
        ]
        child = _Collect(b"builder\n")
        reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
        code = yield child.ended
        self.assertEqual(code, 0, child.err)
        self.assertEqual(child.out.decode().splitlines()[1:], ["alice  unknown  -        no", "bob    unknown  -        no"])

        child = _Collect(b"wrong\n")
        reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
        code = yield child.ended
        self.assertEqual(code, 1)
        self.assertIn(b"error: the server refused user 'bob'", child.err)


class DirectoryFailureWordsTests(unittest.TestCase):
    """What ``kerjostunt peers`` says when the server is not there or does not speak: exact texts."""

    def test_refused(self):  # type: ignore[no-untyped-def]
        from .processes import free_port

        port = free_port()
        ca = tls.ensure_certificates(Path(self.mktemp()), DOMAIN).ca
        d = directory.fetch_peers(reactor, f"https://127.0.0.1:{port}", "friends", "alice", "pw", ca, timeout=5)
        return self.assertFailure(d, directory.ServerUnavailable).addCallback(
            lambda e: self.assertEqual(
                str(e), f"127.0.0.1:{port} refused the connection: is the server running, and on this port?"))

    @defer.inlineCallbacks
    def test_silent(self):  # type: ignore[no-untyped-def]
        from twisted.internet.protocol import Factory, Protocol

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ca = tls.ensure_certificates(Path(self.mktemp()), DOMAIN).ca
        url = f"https://127.0.0.1:{port.getHost().port}"
        e = yield self.assertFailure(directory.fetch_peers(reactor, url, "friends", "alice", "pw", ca, timeout=0.5),
                                     directory.ServerUnavailable)
        self.assertEqual(str(e), f"{url} did not answer within 0.5 s")
        self.assertNotIn("Failure", str(e))
