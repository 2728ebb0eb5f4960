"""Issue 13 through the whole server (needs the service.py and web.py hooks of the abuse-auth branch)."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from kerjostunt.client.nat.probing import ProbeError, probe_from
from kerjostunt.server.throttle import GuessThrottle, ThrottleConfig
from kerjostunt.wire.sip.digest import authorization, choose_challenge

from .support import add_users, start_server
from .test_abuse_auth import attempt, connect_from
from .test_web import USERS, WebTestCase, basic, challenges_of, get


class ServerProbeTokenTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "pw"})
        self.client = yield connect_from(self, self.running, "127.0.0.1", "alice", "pw")
        self.registration = yield self.client.register()
        self.servers = [("127.0.0.1", p) for p in self.registration.probe.ports]
        self.offer = self.registration.probe

    def _probe(self, source: str) -> defer.Deferred[object]:
        return probe_from(reactor, (source, 0), self.servers, username=self.offer.token, password=self.offer.password)

    @defer.inlineCallbacks
    def test_replayed_from_another_address_is_not_recorded(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(self._probe("127.0.0.2"), ProbeError)
        self.assertEqual(self.running.server.observations.for_user("alice"), [])
        yield self._probe("127.0.0.1")
        self.assertEqual(len(self.running.server.observations.for_user("alice")), 2)

    @defer.inlineCallbacks
    def test_unregister_revokes(self):  # type: ignore[no-untyped-def]
        yield self.client.unregister()
        yield self.assertFailure(self._probe("127.0.0.1"), ProbeError)

    @defer.inlineCallbacks
    def test_deleted_user_answered_without_traceback_then_refused(self):  # type: ignore[no-untyped-def]
        db = self.running.database()
        db.delete_user("alice")
        db.close()
        yield self._probe("127.0.0.1")
        yield self.running.server.store.run(lambda database: None)  # the NAT writes have been tried
        for _ in range(5):
            yield defer.succeed(None)
        yield self.assertFailure(self._probe("127.0.0.1"), ProbeError)


class WebThrottleTests(WebTestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        server = self.web.running.server
        server.register.guard.throttle = GuessThrottle(reactor, ThrottleConfig(base_lock=600.0), server.count)
        self.web.site().resource.guard.throttle = server.register.guard.throttle

    @defer.inlineCallbacks
    def test_basic_guessing_is_throttled_and_shared_with_sip(self):  # type: ignore[no-untyped-def]
        for _ in range(6):
            answer = yield get(self, self.peers_url(), basic("alice", "guess"))
            self.assertEqual(answer.code, 401)
        answer = yield get(self, self.peers_url(), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 401)  # locked: not checked
        response = yield attempt(self, self.web.running, "127.0.0.1", "alice", USERS["alice"])
        self.assertEqual(response.reason, "Forbidden: too many failed attempts")
        self.assertGreaterEqual(self.web.running.server.counters["auth_throttled"], 2)

    @defer.inlineCallbacks
    def test_replayed_digest_refused(self):  # type: ignore[no-untyped-def]
        url = self.peers_url()
        first = yield get(self, url)
        challenge = choose_challenge([c for c in challenges_of(first) if "SHA-256" in c])
        value = authorization(challenge, "alice", USERS["alice"], "GET", url[len(self.web.url):], "0a4f113b")
        answer = yield get(self, url, value)
        self.assertEqual(answer.code, 200)
        again = yield get(self, url, value)
        self.assertEqual(again.code, 401)
