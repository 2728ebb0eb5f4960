"""Digest pieces: stateless nonces and the store-backed checker."""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.auth import NonceManager, SIPDigestCredentials, make_portal
from kerjostunt.server.register import ISIPUser
from kerjostunt.wire.sip.digest import authorization, ha1
from kerjostunt.wire.sip.headers import parse_auth


class NonceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nonces = NonceManager(self.clock, lifetime=300)

    def test_fresh_nonce_ok(self) -> None:
        self.assertEqual(self.nonces.check(self.nonces.issue()), "ok")

    def test_old_nonce_stale(self) -> None:
        nonce = self.nonces.issue()
        self.clock.advance(301)
        self.assertEqual(self.nonces.check(nonce), "stale")

    def test_forged_or_foreign_nonce_bad(self) -> None:
        nonce = self.nonces.issue()
        stamp, salt, mac = nonce.split(".")
        self.assertEqual(self.nonces.check(f"{stamp}.{salt}.{'0' * len(mac)}"), "bad")
        self.assertEqual(NonceManager(self.clock).check(nonce), "bad")
        for junk in ["", "a.b", "zz.yy.xx", "..", "x" * 500]:
            self.assertEqual(self.nonces.check(junk), "bad")

    def test_nonces_differ(self) -> None:
        self.assertNotEqual(self.nonces.issue(), self.nonces.issue())


def _creds(password: str, algorithm: str, user: str = "alice", nonce: str = "n1") -> SIPDigestCredentials:
    challenge = {"realm": "kerjo.test", "nonce": nonce, "algorithm": algorithm, "qop": "auth"}
    header = authorization(challenge, user, password, "REGISTER", "sips:kerjo.test", "c0ffee")
    _, params = parse_auth(header)
    return SIPDigestCredentials.from_params("REGISTER", params)


class CheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.stored = {
            ("alice", "MD5"): ha1("alice", "kerjo.test", "pw", "MD5"),
            ("alice", "SHA-256"): ha1("alice", "kerjo.test", "pw", "SHA-256"),
        }
        self.portal = make_portal(lambda user, alg: defer.succeed(self.stored.get((user, alg))))

    def test_right_password_both_algorithms(self) -> None:
        for algorithm in ("MD5", "SHA-256"):  # one nonce each: a nonce+nc is used once
            creds = _creds("pw", algorithm, nonce=f"n-{algorithm}")
            result = self.successResultOf(self.portal.login(creds, None, ISIPUser))
            self.assertEqual(result[1], "alice")

    def test_wrong_password_refused(self) -> None:
        self.failureResultOf(self.portal.login(_creds("nope", "SHA-256"), None, ISIPUser), UnauthorizedLogin)

    def test_unknown_user_refused(self) -> None:
        self.failureResultOf(self.portal.login(_creds("pw", "MD5", user="bob"), None, ISIPUser), UnauthorizedLogin)

    def test_response_for_other_method_refused(self) -> None:
        creds = _creds("pw", "MD5")
        creds.method = "INVITE"
        self.failureResultOf(self.portal.login(creds, None, ISIPUser), UnauthorizedLogin)

    def test_unusable_authorization_params(self) -> None:
        with self.assertRaises(ValueError):
            SIPDigestCredentials.from_params("REGISTER", {"username": "alice"})
        with self.assertRaises(ValueError):
            SIPDigestCredentials.from_params(
                "REGISTER",
                {"username": "a", "realm": "r", "uri": "u", "nonce": "n", "response": "x", "algorithm": "SHA-512-256"},
            )
        with self.assertRaises(ValueError):
            SIPDigestCredentials.from_params(
                "REGISTER", {"username": "a", "realm": "r", "uri": "u", "nonce": "n", "response": "x", "qop": "auth"}
            )
