"""Standard clients this project did not write, against a server on its defaults.

baresip (a SIP user agent) registers over TLS; Python's urllib, requests and
``curl --digest`` read the trusted peers list. Each runs as its own process
(nothing blocking in the reactor), and each is what a new user would try
first. sipp is in tests/test_sipp.py and aioice's STUN codec in
tests/test_probe.py. The defaults they need: docs/protocol.rst ("Digest
answers and password guessing") and docs/web.rst.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from .processes import free_port, spawn
from .support import DOMAIN, start_loopback_server, start_server
from .test_web import USERS, start_web_server

BARESIP = shutil.which("baresip")
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
