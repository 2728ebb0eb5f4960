"""A real SIP tool registers: sipp's REGISTER-with-authentication scenario.

sipp has no TLS, so it talks TCP to a local stunnel client (stunnel4), which
verifies the server's certificate against the CA the server generated
(``verifyChain`` + ``CAfile`` + ``checkHost``) and carries the bytes over TLS to
a real server on 127.0.0.1.  sipp exits 0 only when every call of the
scenario went as written (tests/sipp/*.xml).

About the challenges: sipp 3.6 (Debian's sip-tester, what CI installs)
computes only MD5 and reads the algorithm of the *first* challenge, so the
server offers MD5 first by default, and SHA-256 only to clients that ask for
it (``X-Kerjo-Digest``, as ours do); see ``--digest-algorithms``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from .processes import ProcessExited, free_port, spawn
from .support import DOMAIN, add_users, start_server

SIPP = shutil.which("sipp")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
SCENARIOS = Path(__file__).parent / "sipp"

USER, PASSWORD = "alice", "wonderland"

def _missing_tools() -> str | None:
    missing = [name for name, path in (("sipp (Debian: sip-tester)", SIPP), ("stunnel4", STUNNEL)) if path is None]
    return f"{' and '.join(missing)} not installed" if missing else None


@dataclass
class SIPpRun:
    code: int
    out: str
    err: str
    errors_log: str

    def report(self) -> str:
        return f"sipp exit code {self.code}\n--- stdout (tail)\n{self.out[-3000:]}\n--- stderr\n{self.err}\n--- errors log\n{self.errors_log}"


class _SIPpTestBase(unittest.TestCase):
    skip = _missing_tools()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {USER: PASSWORD})
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.stunnel_port = yield self._start_stunnel()

    @defer.inlineCallbacks
    def _start_stunnel(self):  # type: ignore[no-untyped-def]
        """stunnel on a free port; another process may grab the port first, so try twice."""
        for attempt in (1, 2):
            port = free_port()
            conf = self.workdir / f"stunnel-{attempt}.conf"
            conf.write_text(
                "\n".join(
                    [
                        "foreground = yes",
                        "debug = info",  # logs "bound to" once it listens
                        f"pid = {self.workdir / f'stunnel-{attempt}.pid'}",
                        "[sip]",
                        "client = yes",
                        f"accept = 127.0.0.1:{port}",
                        f"connect = {self.running.host}:{self.running.port}",
                        "verifyChain = yes",
                        f"CAfile = {self.running.ca.resolve()}",
                        "checkHost = localhost",
                        "",
                    ]
                )
            )
            stunnel = spawn(self, "stunnel", STUNNEL, [str(conf)], path=str(self.workdir))
            try:
                yield stunnel.wait_for(f"bound to 127.0.0.1:{port}".encode())
            except ProcessExited:
                if attempt == 2:
                    raise
                continue
            self.stunnel = stunnel
            return port

    @defer.inlineCallbacks
    def run_sipp(self, scenario: str, password: str):  # type: ignore[no-untyped-def]
        errors_log = self.workdir / f"{Path(scenario).stem}-errors.log"
        args = [
            f"127.0.0.1:{self.stunnel_port}",
            "-sf", str(SCENARIOS / scenario),
            "-t", "t1",             # TCP, one socket: into stunnel
            "-i", "127.0.0.1",
            "-m", "1",
            "-s", USER,
            "-au", USER,
            "-ap", password,
            "-key", "domain", DOMAIN,
            "-auth_uri", DOMAIN,    # digest uri sip:kerjo.test (sipp always prefixes sip:)
            "-nostdin",
            "-recv_timeout", "10000",
            "-timeout", "30s",
            "-timeout_error",
            "-trace_err", "-error_file", str(errors_log),
            "-trace_msg", "-message_file", str(self.workdir / f"{Path(scenario).stem}-messages.log"),
        ]
        out, err, code = yield getProcessOutputAndValue(SIPP, args, env=dict(os.environ), path=str(self.workdir))
        text = errors_log.read_text(errors="replace") if errors_log.exists() else ""
        return SIPpRun(code, out.decode(errors="replace"), err.decode(errors="replace"), text)

    def check(self, run: SIPpRun) -> None:
        if run.code != 0:
            self.fail(run.report())

    def messages(self, scenario: str) -> str:
        path = self.workdir / f"{Path(scenario).stem}-messages.log"
        return path.read_text(errors="replace") if path.exists() else ""


class SIPpRegisterTests(_SIPpTestBase):
    """The server as it ships (MD5 challenge; SHA-256 only for clients that ask)."""

    @defer.inlineCallbacks
    def test_register_with_authentication_gets_200(self):  # type: ignore[no-untyped-def]
        run = yield self.run_sipp("register_auth.xml", PASSWORD)
        self.check(run)
        self.assertEqual(run.code, 0)
        # sipp has hung up by now, which unbinds alice; the counters remember.
        self.assertEqual(self.running.server.counters["registrations"], 1)
        self.assertEqual(self.running.server.counters["challenges"], 1)
        log = self.messages("register_auth.xml")
        self.assertIn("SIP/2.0 401", log)
        self.assertRegex(log, re.compile(r"^Authorization: Digest .*algorithm=MD5", re.M))
        # received/rport name stunnel's socket on loopback (the scenario checks them too).
        self.assertRegex(log, re.compile(r"^Via: .*;received=127\.0\.0\.1", re.M))

    @defer.inlineCallbacks
    def test_wrong_password_gets_403_after_401(self):  # type: ignore[no-untyped-def]
        run = yield self.run_sipp("register_wrong_password.xml", "not-her-password")
        self.check(run)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.running.server.counters["auth_failures"], 1)
        self.assertEqual(self.running.server.counters["registrations"], 0)
