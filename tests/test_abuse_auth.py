"""Issue 13 on real sockets: guessing throttled, digests not replayable, probes bound to their address.

Clients connect from several loopback addresses (127.0.0.2, 127.0.0.3...:
Linux routes all of 127/8 to lo) so "another address" is a real other
source IP as the server sees it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.nat.probing import ProbeError, probe_from
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.server.auth import NonceManager, make_portal
from kerjostunt.server.probe import ObservationLog, ProbeFactory, ProbeTokens, nat_not_stored
from kerjostunt.server.register import Protection, RegisterHandler
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.throttle import THROTTLED_COUNTER, GuessThrottle, ThrottleConfig
from kerjostunt.store import UnknownUser
from kerjostunt.wire.sip.digest import authorization, ha1
from kerjostunt.wire.sip.headers import parse_auth
from kerjostunt.wire.sip.message import Headers, Request, Response

from .support import DOMAIN, RunningServer, add_users, start_server
from .test_registrar import FakeConnection


@defer.inlineCallbacks
def connect_from(case: unittest.TestCase, running: RunningServer, source: str, user: str, password: str):  # type: ignore[no-untyped-def]
    """A signaling client whose TCP connection comes from ``source``."""
    proto = yield connect_signaling(
        reactor, running.host, running.port, tls.client_options(running.ca, "localhost"),
        lambda: SignalingClientProtocol(reactor, user, password, DOMAIN, None),
        bind_address=(source, 0),
    )

    def close() -> defer.Deferred[Any]:
        if proto.disconnected.called:
            return defer.succeed(None)
        proto.transport.loseConnection()
        return proto.disconnected

    case.addCleanup(close)
    return proto


def _register(client: SignalingClientProtocol, auth: str | None = None, uri: str = f"sips:{DOMAIN}"):  # type: ignore[no-untyped-def]
    headers = [("Contact", f"<sips:{client.user_id}@127.0.0.1:5000;transport=tls>")]
    if auth is not None:
        headers.append(("Authorization", auth))
    return client.request("REGISTER", uri, to=client.uri_of(client.user_id), headers=headers)


def _digest(challenge_response: Any, user: str, password: str, uri: str = f"sips:{DOMAIN}",
            drop_qop: bool = False) -> str:
    params = [p for s, p in map(parse_auth, challenge_response.headers.get_all("WWW-Authenticate"))
              if s.lower() == "digest"][0]
    if drop_qop:
        params.pop("qop", None)
    return authorization(params, user, password, "REGISTER", uri, "0badc0de")


@defer.inlineCallbacks
def attempt(case: unittest.TestCase, running: RunningServer, source: str, user: str, password: str):  # type: ignore[no-untyped-def]
    """One full login (challenge, answer) from ``source``: the final response."""
    client = yield connect_from(case, running, source, user, password)
    challenge = yield _register(client)
    response = yield _register(client, _digest(challenge, user, password))
    return response


class DigestReplayTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland"})

    @defer.inlineCallbacks
    def _captured(self):  # type: ignore[no-untyped-def]
        """alice registers from 127.0.0.1; what an eavesdropper keeps of it."""
        client = yield connect_from(self, self.running, "127.0.0.1", "alice", "wonderland")
        challenge = yield _register(client)
        auth = _digest(challenge, "alice", "wonderland")
        ok = yield _register(client, auth)
        self.assertEqual(ok.code, 200)
        return auth

    @defer.inlineCallbacks
    def test_replayed_authorization_is_challenged_again(self):  # type: ignore[no-untyped-def]
        auth = yield self._captured()
        for source in ("127.0.0.1", "127.0.0.2"):  # the same address, and another one
            thief = yield connect_from(self, self.running, source, "alice", "x")
            response = yield _register(thief, auth)
            self.assertEqual(response.code, 401, source)
        self.assertEqual(self.running.server.counters["registrations"], 1)

    @defer.inlineCallbacks
    def test_digest_uri_must_name_the_request_uri(self):  # type: ignore[no-untyped-def]
        client = yield connect_from(self, self.running, "127.0.0.1", "alice", "wonderland")
        challenge = yield _register(client)
        response = yield _register(client, _digest(challenge, "alice", "wonderland", uri="sips:elsewhere.example"))
        self.assertEqual(response.code, 400)
        # What sipp sends (sip: in the digest, sips: in the request line, a port on one side) is fine.
        challenge = yield _register(client)
        response = yield _register(client, _digest(challenge, "alice", "wonderland", uri=f"sip:{DOMAIN}"),
                                   uri=f"sips:{DOMAIN}:5061")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_answer_without_qop_is_refused(self):  # type: ignore[no-untyped-def]
        client = yield connect_from(self, self.running, "127.0.0.1", "alice", "wonderland")
        challenge = yield _register(client)
        response = yield _register(client, _digest(challenge, "alice", "wonderland", drop_qop=True))
        self.assertEqual(response.code, 400)
        self.assertIsNone(self.running.server.registrar.lookup("alice"))


class GuessingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland"})
        # Long locks, so that no lock runs out while the test runs (real time).
        server = self.running.server
        server.register.guard.throttle = GuessThrottle(reactor, ThrottleConfig(base_lock=600.0), server.count)

    @defer.inlineCallbacks
    def test_a_guessing_source_is_locked_out_and_alice_is_not(self):  # type: ignore[no-untyped-def]
        for _ in range(6):
            response = yield attempt(self, self.running, "127.0.0.2", "alice", "guess")
            self.assertEqual((response.code, response.reason), (403, "Forbidden: wrong credentials"))
        # Locked: even the right password is refused unchecked, with a Retry-After.
        response = yield attempt(self, self.running, "127.0.0.2", "alice", "wonderland")
        self.assertEqual((response.code, response.reason), (403, "Forbidden: too many failed attempts"))
        self.assertEqual(response.headers.get("Retry-After"), "600")
        response = yield attempt(self, self.running, "127.0.0.1", "alice", "wonderland")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.running.server.counters[THROTTLED_COUNTER], 1)
        self.assertEqual(self.running.server.counters["auth_failures"], 6)

    @defer.inlineCallbacks
    def test_guesses_from_many_sources_lock_the_user_but_not_at_her_usual_address(self):  # type: ignore[no-untyped-def]
        response = yield attempt(self, self.running, "127.0.0.1", "alice", "wonderland")
        self.assertEqual(response.code, 200)
        for n in range(2, 13):  # eleven sources, one guess each: no source lock, the user lock
            response = yield attempt(self, self.running, f"127.0.0.{n}", "alice", "guess")
            self.assertEqual(response.code, 403)
        response = yield attempt(self, self.running, "127.0.0.20", "alice", "wonderland")
        self.assertEqual(response.reason, "Forbidden: too many failed attempts")
        response = yield attempt(self, self.running, "127.0.0.1", "alice", "wonderland")
        self.assertEqual(response.code, 200)


class _Users:
    """A store in which only ``present`` exist (``record_nat`` as ``AsyncStore``'s)."""

    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.nats: list[str] = []

    def record_nat(self, user_id: str, nat: Any, when: float) -> defer.Deferred[None]:
        if user_id in self.present:
            self.nats.append(user_id)
            return defer.succeed(None)
        return defer.fail(UnknownUser(f"unknown user {user_id!r}"))


class ProbeBindingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tokens = ProbeTokens(reactor)
        self.observations = ObservationLog()
        self.users = _Users({"alice"})
        # What StuntServer._observed does with each observation (with its errback).
        self.observations.subscribe(lambda obs: self.users.record_nat(obs.user_id, {}, obs.time).addErrback(
            nat_not_stored, obs.user_id, self.tokens, self.observations))
        factory = ProbeFactory(reactor, self.tokens, self.observations)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.servers = [("127.0.0.1", port.getHost().port)]
        self.tokens.registered_from("alice", "127.0.0.1")  # what REGISTER does before the 200
        self.token, self.password = self.tokens.issue("alice")

    def _probe(self, source: str) -> defer.Deferred[Any]:
        return probe_from(reactor, (source, 0), self.servers, username=self.token, password=self.password)

    @defer.inlineCallbacks
    def test_probe_from_the_registered_address_is_recorded(self):  # type: ignore[no-untyped-def]
        results = yield self._probe("127.0.0.1")
        self.assertEqual(results[0].mapped_ip, "127.0.0.1")
        self.assertEqual([o.mapped_ip for o in self.observations.for_user("alice")], ["127.0.0.1"])

    @defer.inlineCallbacks
    def test_captured_probe_replayed_from_another_address_is_refused(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(self._probe("127.0.0.2"), ProbeError)
        self.assertEqual(self.observations.for_user("alice"), [])

    @defer.inlineCallbacks
    def test_deleted_users_probe_is_answered_not_recorded_and_revokes_its_tokens(self):  # type: ignore[no-untyped-def]
        self.users.present.clear()  # kerjostunt user del alice, in another process
        results = yield self._probe("127.0.0.1")
        self.assertEqual(len(results), 1)  # answered (the token was good when sent)
        self.assertEqual((self.observations.for_user("alice"), self.users.nats), ([], []))
        self.assertIsNone(self.tokens.lookup(self.token))
        yield self.assertFailure(self._probe("127.0.0.1"), ProbeError)
        # No traceback was logged (trial fails a test that logs one).


class _Seen:
    deleted = False

    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> defer.Deferred[None]:
        if self.deleted:
            return defer.fail(UnknownUser(f"unknown user {user_id!r}"))
        return defer.succeed(None)

    def record_nat(self, user_id: str, nat: Any, when: float) -> defer.Deferred[None]:
        return defer.succeed(None)

    def record_attempt(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        return defer.succeed(None)


class UnregisterRevokesTokensTests(unittest.TestCase):
    """REGISTER with ``Protection(tokens=...)``: tokens bound to the address, dropped at ``Expires: 0``."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.tokens = ProbeTokens(self.clock)
        stored = ha1("alice", DOMAIN, "pw", "SHA-256")
        portal = make_portal(lambda user, alg: defer.succeed(stored if (user, alg) == ("alice", "SHA-256") else None))
        self.issued: list[str] = []

        def offer(user_id: str) -> list[tuple[str, str]]:
            token, _ = self.tokens.issue(user_id)
            self.issued.append(token)
            return [("X-Test-Token", token)]

        self.seen = _Seen()
        self.registrar = Registrar(self.clock)
        self.handler = RegisterHandler(
            self.clock, DOMAIN, self.registrar, portal, NonceManager(self.clock), self.seen, offer,
            protection=Protection(tokens=self.tokens),
        )
        self.conn = FakeConnection(40000)
        self.cseq = 0

    def _send(self, headers: list[tuple[str, str]]) -> Response:
        self.cseq += 1
        request = Request("REGISTER", f"sips:{DOMAIN}", Headers([
            ("Via", "SIP/2.0/TLS 192.0.2.1:40000;branch=z9hG4bK-1"),
            ("From", f"<sips:alice@{DOMAIN}>;tag=a"), ("To", f"<sips:alice@{DOMAIN}>"),
            ("Call-ID", "c1"), ("CSeq", f"{self.cseq} REGISTER"), *headers,
        ]))
        self.handler.handle(self.conn, request)
        response = self.conn.sent[-1]
        assert isinstance(response, Response)
        return response

    def _authenticated(self, headers: list[tuple[str, str]]) -> Response:
        challenge = self._send([*headers, ("X-Kerjo-Digest", "SHA-256")])  # as our client asks for it
        params = [p for _, p in map(parse_auth, challenge.headers.get_all("WWW-Authenticate"))
                  if p.get("algorithm") == "SHA-256"][0]
        auth = authorization(params, "alice", "pw", "REGISTER", f"sips:{DOMAIN}", "c0ffee")
        return self._send([*headers, ("Authorization", auth)])

    def test_tokens_follow_the_registration(self) -> None:
        ok = self._authenticated([("Contact", "<sips:alice@192.0.2.1:40000;transport=tls>")])
        self.assertEqual(ok.code, 200)
        [token] = self.issued
        self.assertIsNotNone(self.tokens.lookup(token, "192.0.2.1"))
        self.assertIsNone(self.tokens.lookup(token, "198.51.100.66"))
        gone = self._authenticated([("Contact", "*"), ("Expires", "0")])
        self.assertEqual(gone.code, 200)
        self.assertIsNone(self.tokens.lookup(token, "192.0.2.1"))

    def test_a_user_deleted_while_registering_loses_binding_and_tokens(self) -> None:
        self.seen.deleted = True  # kerjostunt user del between the check and the write
        ok = self._authenticated([("Contact", "<sips:alice@192.0.2.1:40000;transport=tls>")])
        self.assertEqual(ok.code, 200)
        self.assertIsNone(self.registrar.lookup("alice"))
        self.assertIsNone(self.tokens.lookup(self.issued[0], "192.0.2.1"))
        # Logged as one info line, no traceback (trial would fail the test).
