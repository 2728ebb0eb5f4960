"""The operators' /status page: access, the numbers, and a real browser drawing it.

The real server listens on 127.0.0.1 port 0 (web service included); calls
are recorded into its database as the call code records them (with the
per-technique detail); a peer registers over TLS. Then headless Chromium
(Debian's ``chromium``, run as a child process through the reactor) loads
/status with the operator's credentials in the URL: ``--dump-dom`` gives the
DOM the browser built, whose numbers must match the database, and
``--screenshot`` a PNG. Skips only where no Chromium is installed (CI
installs it: .ci/run).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from kerjostunt.server.calls.detail import attempt_detail, refusal_detail
from kerjostunt.server.status import summarise
from kerjostunt.wire.kerjo import Outcome
from kerjostunt.wire.prediction import APD, EI, PRESERVING, RANDOM, SEQUENTIAL, NATDescription, Prediction
from tests.test_web import USERS, WebTestCase, basic, get

from .support import connect_client

SEQ = NATDescription(True, APD, SEQUENTIAL, 1, "198.18.1.2")
RND = NATDescription(True, APD, RANDOM, None, "198.18.2.2")
EIP = NATDescription(True, EI, PRESERVING, None, "198.18.3.2")
PUB = NATDescription(False, EI, PRESERVING, None, "198.18.100.10")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _detail(caller: NATDescription, callee: NATDescription, tried: tuple[tuple[str, str], ...],
            outcome: str) -> str:
    reports = {"caller": Outcome(outcome, "none" if outcome == "failed" else "simultaneous-open",
                                 None if outcome == "failed" else ("198.18.2.2", 20001), 300, tried)}
    return attempt_detail(reports, {"caller": Prediction(caller.public_ip or "", (20001,), 0.5, caller),
                                    "callee": Prediction(callee.public_ip or "", (30001,), 0.5, callee)})


#: (caller, callee, outcome, technique, ms, caller NAT, callee NAT, caller's race)
CALLS = [
    ("alice", "bob", "stunt", "simultaneous-open", 180.0, SEQ, EIP, (("punch", "connected"),)),
    ("alice", "bob", "stunt", "low-ttl", 420.0, SEQ, EIP, (("public", "refused"), ("punch", "connected"))),
    ("bob", "alice", "direct", "public", 60.0, PUB, SEQ, (("public", "connected"),)),
    ("alice", "bob", "failed", "none", 10500.0, SEQ, RND, (("punch", "timeout"),)),
    ("bob", "alice", "failed", "none", 3000.0, SEQ, RND, (("public", "refused"), ("punch", "timeout"))),
    ("alice", "bob", "stunt", "birthday", 2500.0, RND, EIP, (("birthday", "connected"),)),
]


class StatusPageTests(WebTestCase):
    timeout = 120

    def status_url(self, user: str = "alice", password: str | None = None) -> str:
        password = USERS[user] if password is None else password
        return f"https://{user}:{password}@localhost:{self.web.web_port}/status"

    def record_calls(self) -> None:
        db = self.web.running.database()
        self.addCleanup(db.close)
        now = time.time()
        for i, (caller, callee, outcome, technique, ms, a, b, tried) in enumerate(CALLS):
            db.record_attempt(f"call-{i}", caller, callee, technique, outcome, "198.18.2.2:30001",
                              None if outcome == "failed" else "198.18.2.2:30001", ms, now - 60 + i,
                              detail=_detail(a, b, tried, outcome))
        db.record_attempt("call-488", "carol", "bob", "none", "failed", None, None, 0.0, now - 10,
                          detail=refusal_detail("488 no technique: both NATs allocate ports at random", (RND, RND),
                                         ("caller", "callee")))
        db.record_attempt("call-old", "alice", "bob", "stunt", "stunt", None, None, 100.0, now - 7200, None)
        db.set_operator("alice", True)

    @defer.inlineCallbacks
    def test_only_operators(self) -> Any:
        self.record_calls()
        plain = f"https://localhost:{self.web.web_port}/status"
        answer = yield get(self, plain)
        self.assertEqual(answer.code, 401)
        answer = yield get(self, plain, basic("bob", USERS["bob"]))
        self.assertEqual((answer.code, answer.json()), (403, {
            "error": "bob is not an operator (kerjostunt operator add bob)"}))
        answer = yield get(self, plain, basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"default-src 'none'", answer.headers.getRawHeaders(b"content-security-policy")[0])
        self.assertNotIn(b"<script", answer.body)
        self.assertIn(b"<svg", answer.body)

    @defer.inlineCallbacks
    def test_chromium_draws_the_page_with_the_databases_numbers(self) -> Any:
        if CHROMIUM is None:
            raise unittest.SkipTest("no chromium (apt-get install chromium; .ci/run does)")
        self.record_calls()
        client = yield connect_client(self, self.web.running, "bob", USERS["bob"])
        yield client.register()
        profile = Path(self.mktemp()).resolve()
        profile.mkdir(parents=True)
        dom = yield self.chromium(profile, "--dump-dom")
        shot = profile / "status.png"
        yield self.chromium(profile, f"--screenshot={shot}", "--window-size=1200,1800")
        if os.environ.get("KERJOSTUNT_STATUS_SCREENSHOT"):  # docs/web.rst shows one
            shutil.copy(shot, os.environ["KERJOSTUNT_STATUS_SCREENSHOT"])

        db = self.web.running.database()
        self.addCleanup(db.close)
        expected = summarise(db.attempts_since(time.time() - 3600), [], time.time(), 3600)
        self.assertEqual(expected.calls, 7)  # the two-hour-old call is outside the window
        self.assertEqual(_text(dom, 'id="registered"'), "1")
        self.assertIn("<td>bob</td><td>127.0.0.1:", dom)
        self.assertEqual(_text(dom, 'id="calls"'), str(expected.calls))
        for outcome in ("direct", "stunt", "failed"):
            self.assertEqual(_text(dom, f'data-outcome="{outcome}"'), str(expected.by_outcome[outcome]))
        bars = dict(re.findall(r'data-technique="([^"]+)" data-outcome="stunt" data-count="(\d+)"', dom))
        self.assertEqual(bars, {"simultaneous-open": "1", "low-ttl": "1", "birthday": "1"})
        cells = {pair: (int(ok), int(total)) for pair, ok, total in
                 re.findall(r'data-pair="([^"]+)" data-ok="(\d+)" data-total="(\d+)"', dom)}
        self.assertEqual(cells, {pair: tuple(v) for pair, v in (
            ("|".join(k), v) for k, v in expected.matrix.items())})
        self.assertEqual(cells["APD sequential|EI preserving"], (2, 2))
        self.assertEqual(cells["APD sequential|APD random"], (0, 2))
        self.assertEqual(cells["APD random|APD random"], (0, 1))
        buckets = {html.unescape(k): v for k, v in re.findall(r'data-bucket="([^"]+)" data-count="(\d+)"', dom)}
        self.assertEqual(buckets, {name: str(n) for name, n in expected.histogram})
        self.assertEqual((buckets["<100 ms"], buckets["100-200 ms"], buckets["2-5 s"]), ("1", "1", "1"))
        failures = re.findall(r'<tr class="failure" data-call="([^"]+)">', dom)
        self.assertEqual(failures, ["call-3", "call-4", "call-488"])  # slowest first
        self.assertIn("caller: punch timeout", dom)
        self.assertIn("488 no technique: both NATs allocate ports at random", dom)

        png = shot.read_bytes()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", png[16:24])
        self.assertEqual((width, height), (1200, 1800))
        self.assertGreater(len(png), 20000)  # charts, not a blank page

    def chromium(self, profile: Path, *mode: str) -> defer.Deferred[str]:
        return run_chromium(self, profile, self.status_url(), *mode)


@defer.inlineCallbacks
def run_chromium(case: unittest.TestCase, profile: Path, url: str, *mode: str) -> Any:
    """Headless Chromium on ``url`` (``--dump-dom``: the DOM it built; ``--screenshot``), as a child process.

    The profile (and HOME) is the test's own directory; the server's
    certificate is from the test's CA, which Chromium has no flag to trust,
    hence ``--ignore-certificate-errors``. Credentials go in the URL.
    """
    assert CHROMIUM is not None
    argv = ["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", *mode, url]
    out, err, code = yield getProcessOutputAndValue(CHROMIUM, argv, env={**os.environ, "HOME": str(profile)},
                                                    reactor=reactor)
    case.assertEqual(code, 0, err.decode("utf-8", "replace")[-2000:])
    return out.decode("utf-8")


def _text(dom: str, attribute: str) -> str:
    """The text of the first element carrying ``attribute``."""
    match = re.search(re.escape(attribute) + r"[^>]*>([^<]*)<", dom)
    assert match is not None, attribute
    return match.group(1)
