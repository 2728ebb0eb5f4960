"""``twistd -n kerjostunt`` as a real process in an empty directory.

It must create the SQLite database (schema through Alembic) and the local CA
and server certificate there, answer REGISTER over TLS verified against the
generated ``certs/ca.pem``, see users added by the ``kerjostunt`` CLI in
another process, and exit cleanly on SIGTERM.  Ports are free ports found at
run time (never 5061): the option parsing is the real one, only the numbers
differ.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.signaling import RegistrationFailed, SignalingClientProtocol, connect_signaling

from .processes import ProcessExited, child_env, free_port, spawn, wait_until_listening

DOMAIN = "kerjo.local"  # the default: no --domain given


def _twistd() -> list[str]:
    """The twistd of the Python running the tests (not whichever is first on PATH)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.assertEqual(list(self.dir.iterdir()), [])
        yield self._start()

    @defer.inlineCallbacks
    def _start(self):  # type: ignore[no-untyped-def]
        """Free ports can be taken between finding and binding them: try twice."""
        for attempt in (1, 2):
            self.port = free_port()
            probes = [free_port(), free_port()]
            command = _twistd()
            args = [
                *command[1:], "-n", "kerjostunt",
                "--interface", "127.0.0.1",
                "--port", str(self.port),
                "--probe-ports", ",".join(map(str, probes)),
                "--web-port", "0",
            ]
            self.twistd = spawn(self, "twistd", command[0], args, env=child_env(), path=str(self.dir))
            try:
                # Its own word that it bound the port (so a stranger on the port
                # does not count), then proof that the port accepts.
                yield self.twistd.wait_for(f"starting on {self.port}".encode())
                yield wait_until_listening("127.0.0.1", self.port, self.twistd, attempts=50, delay=0.1)
            except ProcessExited:
                if attempt == 2 or "already in use" not in self.twistd.output.lower():
                    raise
                continue
            return

    @defer.inlineCallbacks
    def register(self, user_id: str, password: str, *, authenticate: bool = True):  # type: ignore[no-untyped-def]
        options = tls.client_options(self.dir / "certs" / "ca.pem", "localhost")
        client = yield connect_signaling(
            reactor, "127.0.0.1", self.port, options,
            lambda: SignalingClientProtocol(reactor, user_id, password, DOMAIN),
        )
        try:
            if authenticate:
                result = yield client.register()
            else:
                result = yield client.request("REGISTER", f"sips:{DOMAIN}", to=client.uri_of(user_id))
        finally:
            client.transport.loseConnection()
            yield client.disconnected
        return result

    @defer.inlineCallbacks
    def add_user(self, user_id: str, password: str):  # type: ignore[no-untyped-def]
        cli = spawn(
            self, "kerjostunt user add", sys.executable,
            ["-m", "kerjostunt.cli", "user", "add", user_id, "--password-stdin", "--db", f"sqlite:///{self.dir / 'kerjostunt.sqlite'}"],
            env=child_env(), path=str(self.dir), stdin=password.encode() + b"\n",
        )
        code = yield cli.ended
        self.assertEqual(code, 0, cli.output)

    @defer.inlineCallbacks
    def test_fresh_directory_server(self):  # type: ignore[no-untyped-def]
        # The certificates; private keys readable by the owner only.
        certs = self.dir / "certs"
        for name in ("ca.pem", "server.pem"):
            self.assertTrue((certs / name).exists(), name)
        for name in ("ca-key.pem", "server-key.pem"):
            self.assertEqual(stat.S_IMODE(os.stat(certs / name).st_mode), 0o600, name)
        self.assertIn("ca.pem", self.twistd.output)  # the CA path is logged for admins
        # One start line: version, every port, the database, the CA's absolute path; no object reprs.
        yield self.twistd.wait_for(b" serving kerjo.local: signaling TLS 127.0.0.1:")
        start = next(line for line in self.twistd.output.splitlines() if " serving kerjo.local: " in line)
        self.assertIn(f"signaling TLS 127.0.0.1:{self.port}, probes 127.0.0.1:", start)
        self.assertIn(f"database {self.dir / 'kerjostunt.sqlite'}; CA {certs / 'ca.pem'} SHA-256 ", start)
        self.assertNotIn("Starting factory", self.twistd.output)
        self.assertNotIn(" object at 0x", self.twistd.output)

        # No such user yet: challenged, then refused.
        response = yield self.register("carol", "s3cret", authenticate=False)
        self.assertEqual(response.code, 401)
        failure = yield self.assertFailure(self.register("carol", "s3cret"), RegistrationFailed)
        self.assertEqual(failure.response.code, 403)

        # The database, with the schema Alembic made.  (twistd binds its ports
        # before the services start, so look once the server has answered.)
        db = self.dir / "kerjostunt.sqlite"
        self.assertTrue(db.exists(), self.twistd.output)
        self.assertEqual(stat.S_IMODE(os.stat(db).st_mode), 0o600)  # it holds every HA1
        with sqlite3.connect(db) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self.assertTrue({"alembic_version", "users", "groups", "memberships"} <= tables, tables)
            self.assertEqual(len(conn.execute("SELECT version_num FROM alembic_version").fetchall()), 1)

        # The admin CLI, another process, writes the same database.
        yield self.add_user("carol", "s3cret")
        registration = yield self.register("carol", "s3cret")
        self.assertEqual(registration.public_ip, "127.0.0.1")
        self.assertIsNotNone(registration.probe)

        # SIGTERM: an orderly shutdown, pid file removed, nothing unhandled in the log.
        # Recent twistd ends by re-raising the signal it got once
        # it has shut down, so the exit status is "killed by SIGTERM", as a shell expects.
        self.assertTrue((self.dir / "twistd.pid").exists())
        yield self.twistd.stop(grace=20)
        self.assertIn((self.twistd.exit_code, self.twistd.signal), [(0, None), (None, signal.SIGTERM)], self.twistd.output)
        self.assertFalse((self.dir / "twistd.pid").exists())
        self.assertIn("Main loop terminated", self.twistd.output)
        self.assertIn("Server Shut Down", self.twistd.output)
        for bad in ("Traceback", "Unhandled"):
            self.assertNotIn(bad, self.twistd.output)
