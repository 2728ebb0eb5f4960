"""Digest math against RFC known answers and a hand computation."""

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from kerjostunt.wire.sip.digest import (
    ALGORITHMS,
    authorization,
    choose_challenge,
    digest_response,
    ha1,
    normalize_algorithm,
)
from kerjostunt.wire.sip.headers import parse_auth


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# RFC 7616 3.9.1 example
RFC7616 = {
    "username": "Mufasa",
    "realm": "http-auth@example.org",
    "password": "Circle of Life",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    "uri": "/dir/index.html",
}


class DigestTests(SynchronousTestCase):
    def test_algorithms(self):
        self.assertEqual(ALGORITHMS, ("SHA-256", "MD5"))
        self.assertEqual(normalize_algorithm(None), "MD5")
        self.assertEqual(normalize_algorithm("sha-256"), "SHA-256")
        self.assertRaises(ValueError, normalize_algorithm, "SHA-1")
        self.assertRaises(ValueError, ha1, "a", "b", "c", "MD5-sess")

    def test_md5_by_hand_no_qop(self):
        """RFC 2069-style response, computed here step by step."""
        h1 = md5("alice:kerjo.local:secret")
        h2 = md5("REGISTER:sips:kerjo.local")
        expected = md5(f"{h1}:abc123:{h2}")
        self.assertEqual(ha1("alice", "kerjo.local", "secret"), h1)
        self.assertEqual(
            digest_response(h1, "REGISTER", "sips:kerjo.local", "abc123"), expected
        )

    def test_md5_rfc2617_vector(self):
        h1 = ha1("Mufasa", "testrealm@host.com", "Circle Of Life")
        self.assertEqual(h1, md5("Mufasa:testrealm@host.com:Circle Of Life"))
        self.assertEqual(
            digest_response(
                h1, "GET", "/dir/index.html", "dcd98b7102dd2f0e8b11d0f600bfb0c093",
                "MD5", "auth", "00000001", "0a4f113b",
            ),
            "6629fae49393a05397450978507c4ef1",
        )

    def test_rfc7616_vectors(self):
        v = RFC7616
        for algorithm, expected in [
            ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
            ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
        ]:
            h1 = ha1(v["username"], v["realm"], v["password"], algorithm)
            got = digest_response(
                h1, "GET", v["uri"], v["nonce"], algorithm, "auth", "00000001", v["cnonce"]
            )
            self.assertEqual(got, expected, algorithm)

    def test_sha256_ha1_length(self):
        self.assertEqual(len(ha1("a", "b", "c", "SHA-256")), 64)
        self.assertEqual(
            ha1("a", "b", "c", "SHA-256"), hashlib.sha256(b"a:b:c").hexdigest()
        )

    def test_bad_qop(self):
        self.assertRaises(ValueError, digest_response, "x", "GET", "/", "n", "MD5", "auth-int", "1", "c")
        self.assertRaises(ValueError, digest_response, "x", "GET", "/", "n", "MD5", "auth")

    def test_authorization_with_qop(self):
        v = RFC7616
        challenge = {"realm": v["realm"], "nonce": v["nonce"], "qop": "auth, auth-int",
                     "algorithm": "SHA-256", "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"}
        value = authorization(challenge, v["username"], v["password"], "GET", v["uri"], v["cnonce"])
        scheme, params = parse_auth(value)
        self.assertEqual(scheme, "Digest")
        self.assertEqual(params["response"],
                         "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1")
        self.assertEqual(params["nc"], "00000001")
        self.assertEqual(params["qop"], "auth")
        self.assertEqual(params["opaque"], challenge["opaque"])
        self.assertEqual(params["algorithm"], "SHA-256")
        self.assertIn("qop=auth,", value + ",")  # unquoted in credentials
        self.assertIn("nc=00000001", value)
        self.assertIn('username="Mufasa"', value)

    def test_authorization_without_qop(self):
        challenge = {"realm": "kerjo.local", "nonce": "abc123"}
        value = authorization(challenge, "alice", "secret", "REGISTER", "sips:kerjo.local", "cn", nc=7)
        _, params = parse_auth(value)
        h1 = md5("alice:kerjo.local:secret")
        self.assertEqual(params["response"], md5(f"{h1}:abc123:{md5('REGISTER:sips:kerjo.local')}"))
        self.assertNotIn("qop", params)
        self.assertNotIn("nc", params)
        self.assertNotIn("cnonce", params)
        self.assertEqual(params["algorithm"], "MD5")

    def test_authorization_nc_hex(self):
        challenge = {"realm": "r", "nonce": "n", "qop": "auth"}
        _, params = parse_auth(authorization(challenge, "u", "p", "REGISTER", "sips:r", "c", nc=255))
        self.assertEqual(params["nc"], "000000ff")

    def test_authorization_bad_challenge(self):
        self.assertRaises(ValueError, authorization, {"nonce": "n"}, "u", "p", "M", "sips:x", "c")
        self.assertRaises(ValueError, authorization,
                          {"realm": "r", "nonce": "n", "algorithm": "SHA-1"}, "u", "p", "M", "sips:x", "c")

    def test_choose_challenge_prefers_sha256(self):
        values = [
            'Digest realm="r", nonce="n1", algorithm=MD5, qop="auth"',
            'Basic realm="r"',
            'Digest realm="r", nonce="n2", algorithm=SHA-256, qop="auth"',
            'Digest realm="r", nonce="n3", algorithm=SHA-1',
        ]
        self.assertEqual(choose_challenge(values)["nonce"], "n2")
        self.assertEqual(choose_challenge(values[:2])["nonce"], "n1")
        self.assertRaises(ValueError, choose_challenge, values[1:2])
