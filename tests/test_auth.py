"""Digest pieces: stateless nonces and the store-backed checker."""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.auth import (
    NONCE_LIFETIME,
    AuthGuard,
    NonceCounts,
    NonceManager,
    Replayed,
    SIPDigestCredentials,
    Throttled,
    make_portal,
    sip_uri_matches,
)
from kerjostunt.server.register import ISIPUser
from kerjostunt.server.throttle import GuessThrottle
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


class BoundNonceTests(unittest.TestCase):
    """A nonce is good only for the address it was issued to."""

    def test_bound_to_the_address(self) -> None:
        nonces = NonceManager(Clock())
        nonce = nonces.issue("203.0.113.7")
        self.assertEqual(nonces.check(nonce, "203.0.113.7"), "ok")
        self.assertEqual(nonces.check(nonce, "198.51.100.66"), "bad")
        self.assertEqual(nonces.check(nonce), "bad")

    def test_short_lived_by_default(self) -> None:
        clock = Clock()
        nonces = NonceManager(clock)
        nonce = nonces.issue("203.0.113.7")
        clock.advance(NONCE_LIFETIME + 1)
        self.assertEqual(nonces.check(nonce, "203.0.113.7"), "stale")


class NonceCountTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nonces = NonceManager(self.clock)
        self.counts = NonceCounts(lifetime=60.0, max_nonces=10)

    def test_a_count_is_used_once_and_must_grow(self) -> None:
        nonce = self.nonces.issue()
        self.assertTrue(self.counts.use(nonce, "00000001"))
        self.assertFalse(self.counts.use(nonce, "00000001"))
        self.assertTrue(self.counts.use(nonce, "00000003"))
        self.assertFalse(self.counts.use(nonce, "00000002"))
        self.assertFalse(self.counts.use(nonce, None))
        self.assertFalse(self.counts.use(nonce, "zz"))

    def test_a_burnt_nonce_is_refused(self) -> None:
        nonce = self.nonces.issue()
        self.counts.burn(nonce)
        self.assertFalse(self.counts.use(nonce, "00000009"))

    def test_old_nonces_are_forgotten(self) -> None:
        old = self.nonces.issue()
        self.counts.use(old, "00000001")
        self.clock.advance(61)
        self.counts.use(self.nonces.issue(), "00000001")
        self.assertEqual(len(self.counts), 1)

    def test_a_full_table_forgets_safely(self) -> None:
        issued = []
        for _ in range(25):
            self.clock.advance(0.01)
            nonce = self.nonces.issue()
            issued.append(nonce)
            self.assertTrue(self.counts.use(nonce, "00000001"))
        self.assertLessEqual(len(self.counts), 10)
        # Forgotten nonces are not replayable: everything up to them is refused.
        self.assertFalse(self.counts.use(issued[0], "00000001"))
        self.assertFalse(self.counts.use(issued[0], "00000002"))


class ReplayThroughThePortalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.lookups: list[str] = []
        stored = ha1("alice", "kerjo.test", "pw", "SHA-256")

        def get_ha1(user: str, algorithm: str) -> defer.Deferred[str | None]:
            self.lookups.append(user)
            return defer.succeed(stored if user == "alice" else None)

        self.clock = Clock()
        self.guard = AuthGuard(make_portal(get_ha1), GuessThrottle(self.clock), "sip")

    def test_the_same_answer_twice_is_a_replay(self) -> None:
        creds = _creds("pw", "SHA-256", nonce="n-1")
        self.successResultOf(self.guard.login(creds, "203.0.113.7", ISIPUser))
        self.failureResultOf(self.guard.login(creds, "203.0.113.7", ISIPUser), Replayed)
        self.assertEqual(self.lookups, ["alice"])

    def test_one_guess_per_nonce(self) -> None:
        self.failureResultOf(self.guard.login(_creds("guess", "SHA-256", nonce="n-2"), "198.51.100.6", ISIPUser))
        again = _creds("pw", "SHA-256", nonce="n-2")
        again.nc = "00000002"
        self.failureResultOf(self.guard.login(again, "198.51.100.6", ISIPUser), Replayed)

    def test_a_locked_source_is_refused_before_any_lookup(self) -> None:
        for n in range(6):
            self.failureResultOf(
                self.guard.login(_creds("guess", "SHA-256", nonce=f"g-{n}"), "198.51.100.6", ISIPUser)
            )
        self.lookups.clear()
        failure = self.failureResultOf(
            self.guard.login(_creds("pw", "SHA-256", nonce="right"), "198.51.100.6", ISIPUser), Throttled
        )
        self.assertEqual(self.lookups, [])
        self.assertEqual(failure.value.retry_after, 1.0)
        self.successResultOf(self.guard.login(_creds("pw", "SHA-256", nonce="home"), "203.0.113.7", ISIPUser))

    def test_replays_are_not_counted_as_guesses(self) -> None:
        creds = _creds("guess", "SHA-256", nonce="n-3")
        self.failureResultOf(self.guard.login(creds, "198.51.100.6", ISIPUser))
        for _ in range(20):
            self.failureResultOf(self.guard.login(creds, "198.51.100.6", ISIPUser), Replayed)
        self.assertEqual(self.guard.throttle.locked("alice", "198.51.100.6"), 0.0)


class DigestURITests(unittest.TestCase):
    def test_forms_sip_tools_send(self) -> None:
        for digest_uri, request_uri in [
            ("sips:kerjo.test", "sips:kerjo.test"),
            ("sip:kerjo.test", "sips:kerjo.test"),  # sipp
            ("sip:kerjo.test:5061", "sips:kerjo.test"),
            ("sips:kerjo.test", "sips:kerjo.test:5061"),
            ("sip:KERJO.test;transport=tls", "sip:kerjo.test"),
            ("sip:127.0.0.1:5061", "sip:127.0.0.1:5061"),
        ]:
            self.assertTrue(sip_uri_matches(digest_uri, request_uri), (digest_uri, request_uri))

    def test_another_request(self) -> None:
        for digest_uri, request_uri in [
            ("sips:other.test", "sips:kerjo.test"),
            ("sips:kerjo.test:5062", "sips:kerjo.test:5061"),
            ("sips:alice@kerjo.test", "sips:kerjo.test"),
            ("/v1/groups/g/peers", "sips:kerjo.test"),
            ("", "sips:kerjo.test"),
        ]:
            self.assertFalse(sip_uri_matches(digest_uri, request_uri), (digest_uri, request_uri))

    def test_qop_is_required(self) -> None:
        params = {"username": "a", "realm": "r", "uri": "u", "nonce": "n", "response": "x"}
        with self.assertRaises(ValueError):
            SIPDigestCredentials.from_params("REGISTER", params)
