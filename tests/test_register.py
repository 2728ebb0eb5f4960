"""REGISTER over real TLS on loopback: digest auth, received/rport, bindings."""

from __future__ import annotations

import socket

from twisted.internet import defer
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.signaling import RegistrationFailed, SignalingError

from .support import DOMAIN, add_users, connect_client, start_server


class RegisterTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})

    @defer.inlineCallbacks
    def test_wrong_password_gets_403_after_401(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "not-her-password")
        failure = yield self.assertFailure(client.register(), RegistrationFailed)
        self.assertEqual(failure.response.code, 403)
        self.assertIsNone(self.running.server.registrar.lookup("alice"))
        self.assertEqual(self.running.server.counters["challenges"], 1)

    @defer.inlineCallbacks
    def test_unknown_user_gets_403(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "mallory", "x")
        failure = yield self.assertFailure(client.register(), RegistrationFailed)
        self.assertEqual(failure.response.code, 403)

    @defer.inlineCallbacks
    def test_right_password_gets_200_with_received_rport_and_probe_offer(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        registration = yield client.register()
        self.assertEqual(registration.public_ip, "127.0.0.1")
        self.assertEqual(registration.public_port, client.local[1])
        self.assertIsNotNone(registration.probe)
        self.assertEqual(list(registration.probe.ports), self.running.server.settings.probe_ports)
        binding = self.running.server.registrar.lookup("alice")
        self.assertIsNotNone(binding)
        self.assertEqual(binding.public_address, ("127.0.0.1", client.local[1]))

    @defer.inlineCallbacks
    def test_a_port_mapping_at_the_public_address_is_kept_with_the_binding(self):  # type: ignore[no-untyped-def]
        """X-Kerjo-Port-Mapping (issue 17): kept at the address the server sees; anyone else's is not."""
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register(mapping=("127.0.0.1", 40123))
        self.assertEqual(self.running.server.registrar.lookup("alice").port_mapping, ("127.0.0.1", 40123))
        yield client.register(mapping=("203.0.113.9", 40123))
        self.assertIsNone(self.running.server.registrar.lookup("alice").port_mapping, "not its public address")
        yield client.register()
        self.assertIsNone(self.running.server.registrar.lookup("alice").port_mapping)

    @defer.inlineCallbacks
    def test_registration_is_recorded_in_the_database(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "bob", "builder")
        yield client.register()
        record = yield self.running.server.store.get_user("bob")
        self.assertEqual((record.public_ip, record.public_port), ("127.0.0.1", client.local[1]))
        self.assertIsNotNone(record.last_seen)

    @defer.inlineCallbacks
    def test_expires_zero_unregisters(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        response = yield client.unregister()
        self.assertEqual(response.code, 200)
        self.assertIsNone(self.running.server.registrar.lookup("alice"))

    @defer.inlineCallbacks
    def test_new_connection_replaces_old_binding(self):  # type: ignore[no-untyped-def]
        first = yield connect_client(self, self.running, "alice", "wonderland")
        yield first.register()
        second = yield connect_client(self, self.running, "alice", "wonderland")
        yield second.register()
        binding = self.running.server.registrar.lookup("alice")
        self.assertEqual(binding.public_address[1], second.local[1])
        self.assertEqual(len(self.running.server.registrar), 1)

    @defer.inlineCallbacks
    def test_users_on_one_connection_stay_distinct(self):  # type: ignore[no-untyped-def]
        alice = yield connect_client(self, self.running, "alice", "wonderland")
        yield alice.register()
        bob = yield connect_client(self, self.running, "bob", "builder")
        yield bob.register()
        self.assertNotEqual(
            self.running.server.registrar.lookup("alice").connection,
            self.running.server.registrar.lookup("bob").connection,
        )
        yield alice.unregister()
        self.assertIsNotNone(self.running.server.registrar.lookup("bob"))

    @defer.inlineCallbacks
    def test_disconnect_removes_binding(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        client.transport.loseConnection()
        yield client.disconnected
        # The server sees the close one reactor turn later at most.
        for _ in range(50):
            if self.running.server.registrar.lookup("alice") is None:
                break
            yield _turn()
        self.assertIsNone(self.running.server.registrar.lookup("alice"))

    @defer.inlineCallbacks
    def test_keepalive_ping_gets_pong(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        rtt = yield client.ping()
        self.assertGreaterEqual(rtt, 0.0)

    @defer.inlineCallbacks
    def test_rtt_known_at_registration_without_pings(self):  # type: ignore[no-untyped-def]
        """Over real TCP the server takes the kernel's RTT (TCP_INFO): it is there
        as soon as the peer registers, before any keepalive round trip."""
        if not hasattr(socket, "TCP_INFO"):
            raise unittest.SkipTest("no TCP_INFO here")
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        conn = self.running.server.registrar.lookup("alice").connection
        self.assertEqual(conn._rtt_samples, ())
        self.assertIsNone(conn._ping_sent_at)
        self.assertTrue(0 < conn.rtt < 1.0, conn.rtt)

    @defer.inlineCallbacks
    def test_options_answered(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        response = yield client.request("OPTIONS", f"sips:{DOMAIN}")
        self.assertEqual(response.code, 200)
        self.assertIn("REGISTER", response.headers.get("Allow"))

    @defer.inlineCallbacks
    def test_unsupported_methods(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        response = yield client.request("SUBSCRIBE", f"sips:{DOMAIN}")
        self.assertEqual(response.code, 405)
        response = yield client.request("FROBNICATE", f"sips:{DOMAIN}")
        self.assertEqual(response.code, 501)

    @defer.inlineCallbacks
    def test_every_answer_says_the_source_port(self):  # type: ignore[no-untyped-def]
        """RFC 3581 4: a bare rport is filled in every response, not only REGISTER's 200."""
        client = yield connect_client(self, self.running, "alice", "wonderland")
        request = client.build_request("OPTIONS", f"sips:{DOMAIN}")
        self.assertIn(";rport", request.headers.get("Via"))
        response = yield client.send_request(request)
        self.assertEqual(response.code, 200)
        self.assertIn(f";rport={client.local[1]}", response.headers.get("Via"))
        challenge = yield client.request("REGISTER", f"sips:{DOMAIN}", to=f"sips:alice@{DOMAIN}")
        self.assertEqual(challenge.code, 401)
        self.assertIn(f";rport={client.local[1]}", challenge.headers.get("Via"))

    @defer.inlineCallbacks
    def test_an_unknown_required_extension_gets_420(self):  # type: ignore[no-untyped-def]
        """RFC 3261 8.2.2.3: 420 with Unsupported naming it, before the challenge."""
        client = yield connect_client(self, self.running, "alice", "wonderland")
        for method in ("OPTIONS", "REGISTER"):
            response = yield client.request(method, f"sips:{DOMAIN}", to=f"sips:alice@{DOMAIN}",
                                            headers=[("Require", "outbound, 100rel, foo")])
            self.assertEqual((response.code, response.headers.get("Unsupported")), (420, "100rel, foo"), method)
        response = yield client.request("OPTIONS", f"sips:{DOMAIN}", headers=[("Require", "outbound")])
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_a_request_uri_other_than_sip_gets_416(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        for method in ("OPTIONS", "REGISTER", "INVITE"):
            response = yield client.request(method, "tel:+15551234")
            self.assertEqual(response.code, 416, method)

    @defer.inlineCallbacks
    def test_max_forwards(self):  # type: ignore[no-untyped-def]
        """0 stops what would be forwarded (483); the server's own requests take 0; junk is 400."""
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()

        def hops(method, uri, value):  # type: ignore[no-untyped-def]
            request = client.build_request(method, uri)
            request.headers.set("Max-Forwards", value)
            return client.send_request(request)

        response = yield hops("INVITE", f"sips:bob@{DOMAIN}", "0")
        self.assertEqual(response.code, 483)
        response = yield hops("OPTIONS", f"sips:{DOMAIN}", "0")
        self.assertEqual(response.code, 200)
        for junk in ("abc", "-1", "256"):
            response = yield hops("OPTIONS", f"sips:{DOMAIN}", junk)
            self.assertEqual(response.code, 400, junk)

    @defer.inlineCallbacks
    def test_an_invite_body_other_than_sdp_gets_415(self):  # type: ignore[no-untyped-def]
        """RFC 3261 8.2.3: 415 with Accept; no body at all stays a 400."""
        client = yield connect_client(self, self.running, "alice", "wonderland")
        yield client.register()
        response = yield client.request(
            "INVITE", f"sips:bob@{DOMAIN}", headers=[("Content-Type", "text/plain")], body=b"hello")
        self.assertEqual((response.code, response.headers.get("Accept")), (415, "application/sdp"))
        response = yield client.request("INVITE", f"sips:bob@{DOMAIN}")
        self.assertEqual(response.code, 400)

    @defer.inlineCallbacks
    def test_third_party_registration_forbidden(self):  # type: ignore[no-untyped-def]
        client = yield connect_client(self, self.running, "alice", "wonderland")
        request = client.build_request("REGISTER", f"sips:{DOMAIN}", to=f"sips:bob@{DOMAIN}")
        response = yield client.send_request(request)
        self.assertEqual(response.code, 403)

    @defer.inlineCallbacks
    def test_untrusted_certificate_is_refused_by_client(self):  # type: ignore[no-untyped-def]
        other = tls.ensure_certificates(self.mktemp_dir(), "elsewhere.test")
        yield self.assertFailure(
            connect_client(self, self.running, "alice", "wonderland", ca=other.ca), SignalingError, Exception
        )

    @defer.inlineCallbacks
    def test_wrong_hostname_is_refused_by_client(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(
            connect_client(self, self.running, "alice", "wonderland", hostname="not-the-server.test"),
            SignalingError, Exception,
        )

    def mktemp_dir(self):  # type: ignore[no-untyped-def]
        from pathlib import Path

        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path


def _turn() -> defer.Deferred:
    from twisted.internet import reactor

    d: defer.Deferred = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


class ChallengeOrderTests(unittest.TestCase):
    """Whatever the server offers, our client answers (SHA-256 when it can)."""

    @defer.inlineCallbacks
    def _register_with(self, algorithms):  # type: ignore[no-untyped-def]
        running = yield start_server(self, digest_algorithms=algorithms)
        add_users(running, {"alice": "wonderland"})
        client = yield connect_client(self, running, "alice", "wonderland")
        seen = []
        original = client.send_request

        def spy(request, timeout=32.0):  # type: ignore[no-untyped-def]
            seen.extend(request.headers.get_all("Authorization"))
            return original(request, timeout)

        client.send_request = spy
        registration = yield client.register()
        return registration, seen

    @defer.inlineCallbacks
    def test_default_order_client_uses_sha256(self):  # type: ignore[no-untyped-def]
        _, seen = yield self._register_with(("MD5", "SHA-256"))
        self.assertEqual(len(seen), 1)
        self.assertIn("algorithm=SHA-256", seen[0])

    @defer.inlineCallbacks
    def test_md5_only(self):  # type: ignore[no-untyped-def]
        _, seen = yield self._register_with(("MD5",))
        self.assertIn("algorithm=MD5", seen[0])

    @defer.inlineCallbacks
    def test_sha256_only(self):  # type: ignore[no-untyped-def]
        registration, seen = yield self._register_with(("SHA-256",))
        self.assertIn("algorithm=SHA-256", seen[0])
        self.assertEqual(registration.public_ip, "127.0.0.1")


class OfferedAlgorithmsTests(unittest.TestCase):
    """The first configured algorithm goes to everyone, the others to clients that ask."""

    def request(self, *headers: tuple[str, str]):  # type: ignore[no-untyped-def]
        from kerjostunt.wire.sip.message import Headers, Request

        return Request("REGISTER", "sips:kerjo.test", Headers([
            ("Via", "SIP/2.0/TLS 192.0.2.1:40000;branch=z9hG4bK-1"), ("From", "<sips:a@kerjo.test>;tag=a"),
            ("To", "<sips:a@kerjo.test>"), ("Call-ID", "c1"), ("CSeq", "1 REGISTER"), *headers]))

    def test_rule(self) -> None:
        from kerjostunt.server.register import offered_algorithms

        default = ("MD5", "SHA-256")
        self.assertEqual(offered_algorithms(default, self.request()), ["MD5"])
        self.assertEqual(offered_algorithms(default, self.request(("X-Kerjo-Digest", "SHA-256"))), ["MD5", "SHA-256"])
        stale = ("Authorization", 'Digest username="a", realm="kerjo.test", nonce="n", uri="sips:kerjo.test", '
                                  'response="00", algorithm=SHA-256, qop=auth, nc=00000001, cnonce="c"')
        self.assertEqual(offered_algorithms(default, self.request(stale)), ["MD5", "SHA-256"])
        self.assertEqual(offered_algorithms(("SHA-256", "MD5"), self.request()), ["SHA-256", "MD5"])
        self.assertEqual(offered_algorithms(("SHA-256",), self.request()), ["SHA-256"])
        self.assertEqual(offered_algorithms(default, self.request(("X-Kerjo-Digest", "garbage"))), ["MD5"])
