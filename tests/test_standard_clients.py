"""Standard clients this project did not write, against a server on its defaults.

baresip and Linphone (SIP user agents) register over TLS; Python's urllib,
requests, ``curl --digest`` and headless Chromium read the trusted peers list. Each runs as its own process
(nothing blocking in the reactor), and each is what a new user would try
first. sipp is in tests/test_sipp.py and aioice's STUN codec in
tests/test_probe.py. The defaults they need: docs/protocol.rst ("Digest
answers and password guessing") and docs/web.rst.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from kerjostunt.server import web

from .processes import free_port, spawn
from .support import DOMAIN, start_loopback_server, start_server
from .test_status_page import CHROMIUM, run_chromium
from .test_web import USERS, start_web_server

BARESIP = shutil.which("baresip")
LINPHONEC = shutil.which("linphonec")
CURL = shutil.which("curl")
BARESIP_MODULES = next((p for p in ("/usr/lib/baresip/modules", "/usr/local/lib/baresip/modules")
                        if Path(p, "account.so").exists()), None)

URLLIB_CLIENT = """
import ssl, sys, urllib.request
url, user, password, ca = sys.argv[1:]
manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
manager.add_password(None, url, user, password)
opener = urllib.request.build_opener(
    urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)),
    urllib.request.HTTPDigestAuthHandler(manager))
sys.stdout.write(opener.open(url, timeout=20).read().decode())
"""

REQUESTS_CLIENT = """
import sys, requests
from requests.auth import HTTPDigestAuth
url, user, password, ca = sys.argv[1:]
answer = requests.get(url, auth=HTTPDigestAuth(user, password), verify=ca, timeout=20)
answer.raise_for_status()
sys.stdout.write(answer.text)
"""


class WebDigestClientTests(unittest.TestCase):
    """urllib, requests and curl read alice's group with Digest, the server on its defaults."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)
        self.url = f"{self.web.url}/v1/groups/friends/peers"
        self.ca = str(self.web.running.ca.resolve())

    def check_peers(self, out: bytes, err: bytes, code: int) -> None:
        self.assertEqual(code, 0, err.decode(errors="replace"))
        listed = json.loads(out)
        self.assertIn("bob", json.dumps(listed))

    @defer.inlineCallbacks
    def _python(self, script: str):  # type: ignore[no-untyped-def]
        args = ["-c", script, self.url, "alice", USERS["alice"], self.ca]
        result = yield getProcessOutputAndValue(sys.executable, args)
        return result

    @defer.inlineCallbacks
    def test_urllib(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self._python(URLLIB_CLIENT)
        self.check_peers(out, err, code)

    @defer.inlineCallbacks
    def test_requests(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self._python(REQUESTS_CLIENT)
        self.check_peers(out, err, code)

    @defer.inlineCallbacks
    def test_urllib_wrong_password_is_refused(self):  # type: ignore[no-untyped-def]
        args = ["-c", URLLIB_CLIENT, self.url, "alice", "not-hers", self.ca]
        _, err, code = yield getProcessOutputAndValue(sys.executable, args)
        self.assertNotEqual(code, 0)
        self.assertIn(b"401", err)

    @defer.inlineCallbacks
    def test_curl_digest(self):  # type: ignore[no-untyped-def]
        if CURL is None:
            raise unittest.SkipTest("curl not installed")
        args = ["-sS", "--fail", "--digest", "-u", f"alice:{USERS['alice']}", "--cacert", self.ca, self.url]
        out, err, code = yield getProcessOutputAndValue(CURL, args)
        self.check_peers(out, err, code)


class ChromiumPeersListTests(unittest.TestCase):
    """Headless Chromium reads alice's group with Digest, the server on its defaults.

    The credentials are in the URL of a top-level navigation (``--dump-dom``),
    which Chromium still honours: it sends nothing until the 401, then
    answers with Digest, which it prefers to Basic (the server offers Digest
    MD5, Digest SHA-256 and Basic). Chromium 156 can compute SHA-256 but
    answers the first Digest challenge, so on the defaults (MD5 first) it
    answers MD5. The Authorization headers the server was sent are recorded
    to show which.
    """

    skip = None if CHROMIUM else "no chromium (apt-get install chromium; .ci/run does)"
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)

    def record_authorization(self) -> list[str | None]:
        seen: list[str | None] = []
        parse = web.parse_credentials

        def recording(request: Any, *args: Any, **kwargs: Any) -> Any:
            header = request.getHeader(b"authorization")
            seen.append(header.decode("ascii", "replace") if isinstance(header, bytes) else header)
            return parse(request, *args, **kwargs)

        self.patch(web, "parse_credentials", recording)
        return seen

    def url(self, password: str) -> str:
        return f"https://alice:{password}@localhost:{self.web.web_port}/v1/groups/friends/peers"

    @defer.inlineCallbacks
    def dom(self, password: str):  # type: ignore[no-untyped-def]
        profile = Path(self.mktemp()).resolve()
        profile.mkdir(parents=True)
        dom = yield run_chromium(self, profile, self.url(password), "--dump-dom")
        return dom

    @defer.inlineCallbacks
    def test_reads_the_peers_list_with_digest(self):  # type: ignore[no-untyped-def]
        seen = self.record_authorization()
        dom = yield self.dom(USERS["alice"])
        body = re.search(r"<pre[^>]*>(.*?)</pre>", dom, re.S)
        self.assertIsNotNone(body, dom)
        listed = json.loads(html.unescape(body.group(1)))  # type: ignore[union-attr]
        db = self.web.running.database()
        self.addCleanup(db.close)
        self.assertEqual(listed["group"], "friends")
        self.assertEqual(sorted(p["user_id"] for p in listed["peers"]), sorted(db.list_groups()["friends"]))
        self.assertEqual(sorted(p["user_id"] for p in listed["peers"]), ["alice", "bob"])
        self.assertIsNone(seen[0])  # nothing before the challenge
        answer = seen[-1] or ""
        self.assertTrue(answer.startswith("Digest "), seen)
        self.assertIn('username="alice"', answer)
        self.assertIn("algorithm=MD5", answer)
        self.assertIn('uri="/v1/groups/friends/peers"', answer)

    @defer.inlineCallbacks
    def test_wrong_password_gets_no_list(self):  # type: ignore[no-untyped-def]
        seen = self.record_authorization()
        dom = yield self.dom("not-hers")
        self.assertNotIn("peers", dom)  # headless, it shows nothing after a refused answer
        self.assertTrue(any((h or "").startswith('Digest username="alice"') for h in seen), seen)
        self.assertEqual(self.web.server.counters["web_auth_failures"], len(seen))


class AioiceProbeTests(unittest.TestCase):
    """aioice's STUN codec, as stuntman's stunclient sends it (an empty CHANGE-REQUEST in every
    request), gets its mapped address from both probe ports of a running server."""

    @defer.inlineCallbacks
    def test_binding_with_empty_change_request(self):  # type: ignore[no-untyped-def]
        from aioice import stun as aio
        from twisted.internet import protocol, reactor

        from .test_probe import _Collect

        running, ports = yield start_loopback_server(self, web_endpoint=None)
        for name in ("probe0", "probe1"):
            request = aio.Message(aio.Method.BINDING, aio.Class.REQUEST)
            request.attributes["CHANGE-REQUEST"] = 0
            request.attributes["SOFTWARE"] = "stunclient-like"
            request.add_fingerprint()
            collector = _Collect(bytes(request))
            proto = yield protocol.ClientCreator(reactor, lambda c=collector: c).connectTCP(
                "127.0.0.1", ports[name].getHost().port)
            local = proto.transport.getHost()
            response = aio.parse_message((yield collector.done))
            self.assertEqual(response.message_class, aio.Class.RESPONSE, response)
            self.assertEqual(response.attributes["XOR-MAPPED-ADDRESS"], (local.host, local.port))
            self.assertEqual(response.transaction_id, request.transaction_id)


class BaresipTests(unittest.TestCase):
    """baresip 1.0 (Debian's) registers over TLS, verifying the server against the generated CA.

    baresip gives up ("Register: Function not implemented") when any
    challenge is one it cannot compute, so the server offers SHA-256 only to
    clients that ask for it (``X-Kerjo-Digest``); the second test shows the
    failure when SHA-256 is offered to everyone.
    """

    skip = None if BARESIP and BARESIP_MODULES else "baresip not installed (Debian: baresip)"

    @defer.inlineCallbacks
    def _baresip(self, **server):  # type: ignore[no-untyped-def]
        running = yield start_server(self, **server)
        db = running.database()
        try:
            db.upgrade()
            db.add_user("alice", DOMAIN, password="wonderland")
        finally:
            db.close()
        conf = Path(self.mktemp()).resolve()
        conf.mkdir(parents=True)
        (conf / "accounts").write_text(
            f'<sip:alice@{DOMAIN};transport=tls>;auth_pass=wonderland;'
            f'outbound="sip:127.0.0.1:{running.port};transport=tls";regint=600\n')
        (conf / "config").write_text("\n".join([
            f"sip_listen 127.0.0.1:{free_port()}",
            f"sip_cafile {running.ca.resolve()}",
            f"module_path {BARESIP_MODULES}",
            "module account.so",
            "",
        ]))
        proc = spawn(self, "baresip", BARESIP, ["-f", str(conf)], path=str(conf))  # type: ignore[arg-type]
        return running, proc

    @defer.inlineCallbacks
    def test_registers_on_defaults(self):  # type: ignore[no-untyped-def]
        running, proc = yield self._baresip()
        yield proc.wait_for(b"200 OK")
        self.assertEqual(running.server.counters["registrations"], 1)
        self.assertNotIn("Function not implemented", proc.output)

    @defer.inlineCallbacks
    def test_fails_when_sha256_is_offered_to_everyone(self):  # type: ignore[no-untyped-def]
        running, proc = yield self._baresip(digest_algorithms=("SHA-256", "MD5"))
        yield proc.wait_for(b"Function not implemented")
        self.assertEqual(running.server.counters["registrations"], 0)


#: Linphone's configuration: TLS only (UDP and TCP off), the server verified
#: against the generated CA, one account. Linphone rewrites this file (the
#: password becomes ``ha1=``), so each test writes a fresh one.
LINPHONERC = """\
[sip]
sip_port=0
sip_tcp_port=0
sip_tls_port=-1
root_ca={ca}
verify_server_certs=1
verify_server_cn=1

[proxy_0]
reg_proxy=<sip:{host}:{port};transport=tls>
reg_identity=sip:alice@{domain}
reg_expires=600
reg_sendregister=1

[auth_info_0]
username=alice
passwd={password}
realm={domain}
"""


class LinphoneTests(unittest.TestCase):
    """Linphone 5.1 (Debian's ``linphonec``, liblinphone and belle-sip) registers over TLS with Digest.

    Headless as it is: no sound card (it logs errors and carries on), stdin
    a pipe that stays open. Two things it needs that are not obvious: its
    data directory (``$HOME/.local/share/linphone``) must exist, or the core
    never starts and nothing is sent; and it checks the server's name
    against the certificate's DNS names only (mbedTLS), so the proxy is
    ``localhost``, which the generated certificate names, not ``127.0.0.1``.
    The wait is on Linphone's own registration state in its log (``-d 4``)
    and on the server's registrar.
    """

    skip = None if LINPHONEC else "linphonec not installed (Debian: linphone-cli)"
    timeout = 60

    @defer.inlineCallbacks
    def _linphone(self, password: str = "wonderland", host: str = "localhost"):  # type: ignore[no-untyped-def]
        running = yield start_server(self)
        db = running.database()
        try:
            db.upgrade()
            db.add_user("alice", DOMAIN, password="wonderland")
        finally:
            db.close()
        online: defer.Deferred[None] = defer.Deferred()
        running.server.registrar.subscribe(
            lambda user, up: online.callback(None) if (user, up) == ("alice", True) and not online.called else None)
        home = Path(self.mktemp()).resolve()
        (home / ".local" / "share" / "linphone").mkdir(parents=True)
        rc = home / "linphonerc"
        rc.write_text(LINPHONERC.format(ca=running.ca.resolve(), host=host, port=running.port, domain=DOMAIN,
                                        password=password))
        proc = spawn(self, "linphonec", LINPHONEC, ["-c", str(rc), "-d", "4"],  # type: ignore[arg-type]
                     env={**os.environ, "HOME": str(home)}, path=str(home))
        return running, proc, online

    @defer.inlineCallbacks
    def test_registers_on_defaults(self):  # type: ignore[no-untyped-def]
        running, proc, online = yield self._linphone()
        yield proc.wait_for(b"to [LinphoneRegistrationOk]")
        yield online
        self.assertEqual(running.server.counters["registrations"], 1)
        binding = running.server.registrar.lookup("alice")
        self.assertIsNotNone(binding)
        self.assertIn("User-Agent: Linphonec/5", proc.output)  # in the REGISTER it logged
        answers = [line for line in proc.output.splitlines() if line.startswith("Authorization:")]
        self.assertTrue(answers, proc.output[-3000:])
        self.assertIn("Digest ", answers[0])
        self.assertIn("algorithm=MD5", answers[0])  # the challenge every client gets on the defaults

    @defer.inlineCallbacks
    def test_wrong_password_is_refused(self):  # type: ignore[no-untyped-def]
        running, proc, online = yield self._linphone(password="not-hers")
        yield proc.wait_for(b"to [LinphoneRegistrationFailed]")
        self.assertIn("403 Forbidden: wrong credentials", proc.output)
        self.assertEqual(running.server.counters["registrations"], 0)
        self.assertIsNone(running.server.registrar.lookup("alice"))
        self.assertFalse(online.called)

    @defer.inlineCallbacks
    def test_ip_address_fails_its_name_check(self):  # type: ignore[no-untyped-def]
        """The generated certificate names 127.0.0.1 as an IP address; Linphone matches DNS names only."""
        running, proc, _ = yield self._linphone(host="127.0.0.1")
        yield proc.wait_for(b"to [LinphoneRegistrationFailed]")
        self.assertIn("flags=[CN-mismatch ]", proc.output)
        self.assertEqual(running.server.counters["registrations"], 0)
