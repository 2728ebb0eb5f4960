"""An operator's first hour: the realm in the database, start failures in one line, the start line.

The exact texts are part of the interface (README.rst, docs/admin.rst); each
message has a test here. One test runs real ``twistd`` to show what an
operator sees: one line, exit code 1, no traceback.
"""

from __future__ import annotations

import io
import os
import socket
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from kerjostunt import __version__, cli
from kerjostunt.server.service import ServerSettings, StuntServer
from kerjostunt.server.startup import StartFailed, StartGuard, start_line
from kerjostunt.store import Database
from kerjostunt.store.realm import RealmMismatch
from kerjostunt.wire.sip.digest import ha1

from .processes import child_env, free_port, spawn
from .support import DOMAIN, add_users, connect_client, start_loopback_server
from .test_twistd import _twistd


def _settings(base: Path, db_url: str, domain: str = DOMAIN) -> ServerSettings:
    return ServerSettings(
        domain=domain, db_url=db_url, certs_dir=base / "certs",
        sip_endpoint="tcp:0:interface=127.0.0.1",
        probe_endpoints=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
        probe_ports=[0, 0], web_endpoint=None,
    )


class Captured:
    """Log events of one level and up, as text, while a test runs."""

    def __init__(self, case: unittest.TestCase, level: LogLevel = LogLevel.info) -> None:
        self.lines: list[str] = []

        def observe(event: dict) -> None:  # type: ignore[type-arg]
            from twisted.logger import formatEvent

            if event.get("log_level", LogLevel.info) >= level and event.get("log_namespace", "").startswith("kerjostunt"):
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        case.addCleanup(globalLogPublisher.removeObserver, observe)


class RealmTests(unittest.TestCase):
    """The realm is stored once; every later user of the database reads it."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"

    def db(self) -> Database:
        db = Database(self.url)
        self.addCleanup(db.close)
        db.upgrade()
        return db

    def run_cli(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main([*argv, "--db", self.url])
        return code, out.getvalue(), err.getvalue()

    def test_first_claim_stores_the_realm(self) -> None:
        db = self.db()
        self.assertIsNone(db.realm())
        self.assertEqual(db.claim_realm(None, "kerjo.local"), "kerjo.local")
        self.assertEqual(db.realm(), "kerjo.local")
        self.assertEqual(db.claim_realm("kerjo.local", "other"), "kerjo.local")
        with self.assertRaises(RealmMismatch) as caught:
            db.claim_realm("example.org", "kerjo.local")
        self.assertEqual(str(caught.exception),
                         f"the database sqlite:///{self.path} has realm 'kerjo.local' (set when it was created), "
                         "not 'example.org': use --domain kerjo.local or another --db")

    def test_admin_commands_read_the_realm(self) -> None:
        """A user added without --domain gets the database's realm, not the default."""
        self.db().claim_realm("example.org", "kerjo.local")
        code, out, err = self.run_cli("user", "add", "bob", "--password-stdin", stdin="pw\n")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.db().get_user("bob").realm, "example.org")
        self.assertEqual(self.db().get_ha1("bob", "MD5"), ha1("bob", "example.org", "pw", "MD5"))

    def test_a_different_domain_is_refused_by_every_admin_command(self) -> None:
        self.db().claim_realm("example.org", "kerjo.local")
        for argv in (("user", "add", "bob", "--password-stdin"), ("user", "list"), ("group", "list")):
            code, _, err = self.run_cli(*argv, "--domain", "kerjo.local", stdin="pw\n")
            self.assertEqual(code, 1, argv)
            self.assertEqual(err, f"kerjostunt: error: the database sqlite:///{self.path} has realm 'example.org' "
                                  "(set when it was created), not 'kerjo.local': use --domain example.org or another "
                                  "--db\n")
        self.assertEqual(self.db().list_users(), [])

    def test_user_show_names_a_realm_mismatch(self) -> None:
        db = self.db()
        db.add_user("bob", "old.example", password="pw")  # added before the realm was stored
        db.claim_realm("kerjo.local", "kerjo.local")
        code, out, _ = self.run_cli("user", "show", "bob")
        self.assertEqual(code, 0)
        self.assertIn("realm:       old.example (logins fail: bob's password was set for realm 'old.example', "
                      "not this server's 'kerjo.local': set it again with 'kerjostunt user passwd bob')\n", out)
        code, out, _ = self.run_cli("user", "passwd", "bob", "--password-stdin", stdin="pw2\n")
        code, out, _ = self.run_cli("user", "show", "bob")
        self.assertIn("realm:       kerjo.local\n", out)

    def test_migration_takes_the_users_realm(self) -> None:
        """A database from before the realm was stored: its users' one realm becomes the database's."""
        db = Database(self.url)
        self.addCleanup(db.close)
        from alembic import command
        from alembic.config import Config

        from kerjostunt.store.database import MIGRATIONS_DIR

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0004")  # the revision before the realm's
        db.add_user("alice", "old.example", password="pw")
        db.upgrade()
        self.assertEqual(db.realm(), "old.example")


class ServerRealmTests(unittest.TestCase):
    def test_server_with_another_domain_does_not_start(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        url = f"sqlite:///{base / 'k.sqlite'}"
        db = Database(url)
        db.upgrade()
        db.claim_realm("example.org", "kerjo.local")
        db.close()
        captured = Captured(self, LogLevel.critical)
        guard = StartGuard(url, lambda: StuntServer(_settings(base, url, "kerjo.local"), reactor))
        self.addCleanup(_close_ports, guard)
        with self.assertRaises(StartFailed) as caught:
            guard.privilegedStartService()
            guard.startService()
        self.assertEqual(caught.exception.code, 1)
        expected = (f"cannot start with --domain kerjo.local: the database {url} has realm 'example.org' "
                    "(set when it was created), not 'kerjo.local': use --domain example.org or another --db")
        self.assertEqual(caught.exception.message, expected)
        self.assertEqual(captured.lines, [expected])

    @defer.inlineCallbacks
    def test_failed_login_names_the_realm_mismatch(self):  # type: ignore[no-untyped-def]
        running, _ = yield start_loopback_server(self, web_endpoint=None)
        db = running.database()
        db.add_user("bob", "old.example", password="pw")
        db.close()
        captured = Captured(self, LogLevel.warn)
        client = yield connect_client(self, running, "bob", "pw")
        failure = yield self.assertFailure(client.register(), Exception)
        self.assertEqual(failure.response.code, 403)
        for _ in range(50):
            if captured.lines:
                break
            yield _tick()
        self.assertEqual(len(captured.lines), 1, captured.lines)
        self.assertRegex(captured.lines[0],
                         r"^REGISTER bob from 127\.0\.0\.1:\d+ refused \(403\): bob's password was set for realm "
                         r"'old\.example', not this server's 'kerjo\.test': set it again with "
                         r"'kerjostunt user passwd bob'$")

    @defer.inlineCallbacks
    def test_wrong_password_alone_is_not_blamed_on_the_realm(self):  # type: ignore[no-untyped-def]
        running, _ = yield start_loopback_server(self, web_endpoint=None)
        add_users(running, {"bob": "pw"}, group=None)
        captured = Captured(self, LogLevel.warn)
        client = yield connect_client(self, running, "bob", "not-pw")
        yield self.assertFailure(client.register(), Exception)
        for _ in range(5):
            yield _tick()
        self.assertEqual(captured.lines, [])


def _close_ports(guard: StartGuard) -> defer.Deferred[object]:
    """Stop what a failed start left listening (twistd would exit instead)."""
    closing: list[defer.Deferred[object]] = []
    for listening in guard.server.ports.values():  # type: ignore[attr-defined]
        if listening.called:
            listening.addCallback(lambda port: closing.append(defer.maybeDeferred(port.stopListening)))
    return defer.gatherResults(closing)  # type: ignore[return-value]


def _tick() -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


class StartFailureTests(unittest.TestCase):
    """Each start failure an operator can fix: its exact line."""

    def start(self, url: str) -> str:
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        guard = StartGuard(url, lambda: StuntServer(_settings(base, url), reactor))
        self.addCleanup(_close_ports, guard)
        with self.assertRaises(StartFailed) as caught:
            guard.privilegedStartService()
            guard.startService()
        return caught.exception.message

    def test_missing_directory(self) -> None:
        folder = os.path.abspath(self.mktemp())
        self.assertEqual(self.start(f"sqlite:///{folder}/k.sqlite"),
                         f"cannot open the database {folder}/k.sqlite: the directory {folder} does not exist")

    def test_corrupt_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        Path(path).write_bytes(b"this is not SQLite\n" * 100)
        self.assertEqual(self.start(f"sqlite:///{path}"),
                         f"the database {path} is not a usable SQLite database (corrupt, or another kind of file)")

    def test_read_only_database(self) -> None:
        path = os.path.abspath(self.mktemp())
        db = Database(f"sqlite:///{path}")
        db.upgrade()
        db.claim_realm(DOMAIN, DOMAIN)
        db.close()
        self.assertEqual(self.start(f"sqlite:///file:{path}?mode=ro&uri=true"),
                         f"the database {path} is read-only: the server writes to it (who is seen, NAT, call outcomes)")

    def test_port_in_use(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        url = f"sqlite:///{base / 'k.sqlite'}"
        settings = _settings(base, url)
        settings.sip_endpoint = f"tcp:{port}:interface=127.0.0.1"
        guard = StartGuard(url, lambda: StuntServer(settings, reactor))
        self.addCleanup(_close_ports, guard)
        with self.assertRaises(StartFailed) as caught:
            guard.privilegedStartService()
        self.assertEqual(caught.exception.message,
                         f"cannot listen on port {port} (127.0.0.1): address already in use (another server running?)")

    def test_unreadable_certificate_directory(self) -> None:
        base = Path(self.mktemp())
        base.mkdir(parents=True)
        (base / "certs").write_text("a file where the directory should be")
        url = f"sqlite:///{base / 'k.sqlite'}"
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(StartFailed) as caught:
            StartGuard(url, lambda: StuntServer(_settings(base, url), reactor))
        self.assertIn(str(base / "certs"), caught.exception.message)
        self.assertTrue(caught.exception.message.startswith("cannot start: "), caught.exception.message)


class StartLineTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_one_line_with_every_port_database_and_ca(self):  # type: ignore[no-untyped-def]
        running, ports = yield start_loopback_server(self, web_endpoint="tcp:0:interface=127.0.0.1")
        line = start_line(running.server, ports)
        ca = running.ca.resolve()
        db = running.db_url[len("sqlite:///"):]
        p = {name: port.getHost().port for name, port in ports.items()}
        from kerjostunt.tls import fingerprint

        self.assertEqual(line, (
            f"kerjostunt {__version__} serving {DOMAIN}: signaling TLS 127.0.0.1:{p['sip']}, "
            f"probes 127.0.0.1:{p['probe0']} 127.0.0.1:{p['probe1']}, web HTTPS 127.0.0.1:{p['web']}; "
            f"database {os.path.abspath(db)}; CA {ca} SHA-256 {fingerprint(ca)}"))
        self.assertTrue(ca.is_absolute())


class TwistdStartFailureTests(unittest.TestCase):
    """What an operator sees: real twistd, a busy port."""

    timeout = 60

    @defer.inlineCallbacks
    def test_port_in_use_is_one_line_and_exit_1(self):  # type: ignore[no-untyped-def]
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = _twistd()
        args = [*command[1:], "--pidfile=", "-n", "kerjostunt", "--interface", "127.0.0.1", "--port", str(port),
                "--probe-ports", f"{free_port()},{free_port()}", "--web-port", "0"]
        proc = spawn(self, "twistd", command[0], args, env=child_env(), path=str(folder))
        code = yield proc.ended
        self.assertEqual(code, 1, proc.output)
        self.assertNotIn("Traceback", proc.output)
        critical = [line for line in proc.output.splitlines() if "#critical]" in line]
        self.assertEqual(len(critical), 1, proc.output)
        self.assertTrue(critical[0].endswith(
            f"cannot listen on port {port} (127.0.0.1): address already in use (another server running?)"),
            critical[0])


class OperatorLogTests(unittest.TestCase):
    """A line per REGISTER and per refused call; the normal first 401 only at debug."""

    @defer.inlineCallbacks
    def test_register_and_refused_call_lines(self):  # type: ignore[no-untyped-def]
        running, _ = yield start_loopback_server(self, web_endpoint=None)
        add_users(running, {"alice": "pw"})
        info = Captured(self, LogLevel.info)
        debug = Captured(self, LogLevel.debug)
        client = yield connect_client(self, running, "alice", "pw")
        yield client.register()
        port = client.local[1]
        from .callsupport import offer

        headers = [("Contact", f"<sips:alice@{client.local[0]}:{port};transport=tls>"),
                   ("Content-Type", "application/sdp")]
        request = client.build_request("INVITE", client.uri_of("nobody"), headers=headers,
                                       body=offer("alice", 40001, [7000], ip="127.0.0.1"))
        response = yield client.send_request(request, 10.0)
        self.assertEqual(response.code, 404)
        for _ in range(20):
            if any("refused" in line for line in info.lines):
                break
            yield _tick()
        self.assertIn(f"REGISTER alice from 127.0.0.1:{port}: registered for 3600 s", info.lines)
        self.assertIn("Call alice -> nobody refused: 404 Not Found", info.lines)
        self.assertFalse([line for line in info.lines if "401" in line], info.lines)
        self.assertIn(f"REGISTER from 127.0.0.1:{port}: 401 challenge", debug.lines)

    @defer.inlineCallbacks
    def test_daemonized_twistd_reports_it_and_exits_1(self):  # type: ignore[no-untyped-def]
        """Without -n the parent waits on twistd's status pipe: it gets the line, not a hang."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = _twistd()
        args = [*command[1:], "--pidfile", str(folder / "twistd.pid"), "--logfile", str(folder / "twistd.log"),
                "kerjostunt", "--interface", "127.0.0.1", "--port", str(port),
                "--probe-ports", f"{free_port()},{free_port()}", "--web-port", "0"]
        proc = spawn(self, "twistd", command[0], args, env=child_env(), path=str(folder))
        code = yield proc.ended
        self.assertEqual(code, 1, proc.output)
        self.assertIn(f"An error has occurred: b'cannot listen on port {port} (127.0.0.1): address already in use",
                      proc.output)
        self.assertFalse((folder / "twistd.pid").exists())
        log = (folder / "twistd.log").read_text()
        self.assertNotIn("Traceback", log)
        self.assertEqual(len([line for line in log.splitlines() if "#critical]" in line]), 1, log)
