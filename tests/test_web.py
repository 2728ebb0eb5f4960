"""The HTTPS web service over real TLS on 127.0.0.1: access rules, formats, flags, metrics, health."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from kerjostunt.client.directory import CAFilePolicy
from kerjostunt.server import metrics, web
from kerjostunt.server.auth import NonceManager
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.service import StuntServer
from kerjostunt.store.lanes import StoreHealth
from kerjostunt.wire.sip.digest import authorization, choose_challenge
from kerjostunt.wire.sip.headers import parse_auth

from .support import DOMAIN, RunningServer, add_users, connect_client, start_loopback_server

USERS = {"alice": "wonderland", "bob": "builder", "carol": "christmas"}


@dataclass
class WebServer:
    running: RunningServer
    web_port: int

    @property
    def server(self) -> StuntServer:
        return self.running.server

    @property
    def url(self) -> str:
        return f"https://localhost:{self.web_port}"

    def site(self) -> web.WebSite:
        return self.server.getServiceNamed("web").factory.wrappedFactory  # type: ignore[no-any-return]


@defer.inlineCallbacks
def start_web_server(case: unittest.TestCase):  # type: ignore[no-untyped-def]
    """A full server, web service included, every port 0 on loopback.

    Users: alice and bob in group "friends", carol in group "others".
    """
    running, ports = yield start_loopback_server(case, web_endpoint="tcp:0:interface=127.0.0.1")
    port = ports["web"]
    add_users(running, {"alice": USERS["alice"], "bob": USERS["bob"]}, group="friends")
    add_users(running, {"carol": USERS["carol"]}, group="others")
    started = WebServer(running, port.getHost().port)
    # Registered last, so it runs first: every server-side connection is gone
    # before the listener stops and trial looks for leftovers.
    case.addCleanup(wait_for_no_connections, started.site())
    return started


def wait_for_no_connections(site: web.WebSite) -> defer.Deferred[None]:
    return site.when_idle()


@dataclass
class Answer:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@defer.inlineCallbacks
def get(case: unittest.TestCase, url: str, authorization_value: str | None = None, ca: Path | None = None, method: bytes = b"GET"):  # type: ignore[no-untyped-def]
    """One request over a verified TLS connection that is closed before returning."""
    pool = web_client.HTTPConnectionPool(reactor, persistent=True)
    agent = web_client.Agent(reactor, CAFilePolicy(ca or case.web.running.ca), pool=pool)
    headers = Headers()
    if authorization_value is not None:
        headers.addRawHeader(b"authorization", authorization_value.encode())
    try:
        response = yield agent.request(method, url.encode(), headers)
        body = yield web_client.readBody(response)
    finally:
        yield pool.closeCachedConnections()
    return Answer(response.code, response.headers, body)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def challenges_of(answer: Answer) -> list[str]:
    return [v.decode() for v in answer.headers.getRawHeaders(b"www-authenticate", [])]


class WebTestCase(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.web = yield start_web_server(self)

    def peers_url(self, group: str = "friends", query: str = "") -> str:
        return f"{self.web.url}/v1/groups/{group}/peers{query}"

    @defer.inlineCallbacks
    def digest_get(self, url: str, user: str, password: str, algorithm: str = "SHA-256"):  # type: ignore[no-untyped-def]
        first = yield get(self, url)
        self.assertEqual(first.code, 401)
        offered = [c for c in challenges_of(first) if f"algorithm={algorithm}" in c]
        challenge = choose_challenge(offered)
        target = url[len(self.web.url):]
        value = authorization(challenge, user, password, "GET", target, "0a4f113b")
        answer = yield get(self, url, value)
        return answer


class AccessRuleTests(WebTestCase):
    @defer.inlineCallbacks
    def test_member_gets_the_list_with_basic(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url(), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"])
        document = answer.json()
        self.assertEqual(document["group"], "friends")
        self.assertEqual([p["user_id"] for p in document["peers"]], ["alice", "bob"])
        self.assertEqual(
            set(document["peers"][0]), {"user_id", "use_stunt", "pair", "ip", "port", "addresses", "nat", "online", "last_seen"}
        )

    @defer.inlineCallbacks
    def test_member_gets_the_list_with_digest_sha256_and_md5(self):  # type: ignore[no-untyped-def]
        for algorithm in ("SHA-256", "MD5"):
            answer = yield self.digest_get(self.peers_url(), "bob", USERS["bob"], algorithm)
            self.assertEqual(answer.code, 200, algorithm)
            self.assertEqual(answer.json()["group"], "friends")

    @defer.inlineCallbacks
    def test_no_credentials_gets_401_with_digest_and_basic_challenges(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url())
        self.assertEqual(answer.code, 401)
        schemes = [(parse_auth(c)[0], parse_auth(c)[1].get("algorithm")) for c in challenges_of(answer)]
        self.assertEqual(schemes, [("Digest", "MD5"), ("Digest", "SHA-256"), ("Basic", None)])
        for challenge in challenges_of(answer):
            self.assertEqual(parse_auth(challenge)[1]["realm"], DOMAIN)
        self.assertEqual(answer.json(), {"error": "authentication required"})

    @defer.inlineCallbacks
    def test_wrong_password_gets_401(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url(), basic("alice", "not-hers"))
        self.assertEqual(answer.code, 401)
        self.assertTrue(challenges_of(answer))
        answer = yield self.digest_get(self.peers_url(), "alice", "not-hers")
        self.assertEqual(answer.code, 401)
        answer = yield get(self, self.peers_url(), basic("mallory", "x"))
        self.assertEqual(answer.code, 401)

    @defer.inlineCallbacks
    def test_non_member_gets_403(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url(), basic("carol", USERS["carol"]))
        self.assertEqual(answer.code, 403)
        self.assertNotIn(b"alice", answer.body.replace(b"carol", b""))  # nothing of the group leaks
        answer = yield self.digest_get(self.peers_url(), "carol", USERS["carol"])
        self.assertEqual(answer.code, 403)

    @defer.inlineCallbacks
    def test_unknown_group_gets_404_but_only_after_authentication(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url("nosuchgroup"))
        self.assertEqual(answer.code, 401)
        answer = yield get(self, self.peers_url("nosuchgroup"), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 404)
        answer = yield get(self, self.peers_url("bad%20name"), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 404)

    @defer.inlineCallbacks
    def test_digest_for_another_uri_is_refused(self):  # type: ignore[no-untyped-def]
        first = yield get(self, self.peers_url())
        challenge = choose_challenge(challenges_of(first))
        value = authorization(challenge, "alice", USERS["alice"], "GET", "/v1/groups/others/peers", "c")
        answer = yield get(self, self.peers_url(), value)
        self.assertEqual(answer.code, 400)

    @defer.inlineCallbacks
    def test_forged_nonce_is_refused(self):  # type: ignore[no-untyped-def]
        challenge = {"realm": DOMAIN, "nonce": "1.2.3", "algorithm": "SHA-256", "qop": "auth"}
        value = authorization(challenge, "alice", USERS["alice"], "GET", "/v1/groups/friends/peers", "c")
        answer = yield get(self, self.peers_url(), value)
        self.assertEqual(answer.code, 401)

    @defer.inlineCallbacks
    def test_unknown_paths_and_methods(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, f"{self.web.url}/v1/groups/friends")
        self.assertEqual(answer.code, 404)
        self.assertEqual(answer.json(), {"error": "no such resource"})
        answer = yield get(self, f"{self.web.url}/health", method=b"DELETE")
        self.assertEqual(answer.code, 405)
        self.assertEqual(answer.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

    @defer.inlineCallbacks
    def test_bad_format_gets_400(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, self.peers_url(query="?format=xml"), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 400)


class FormatAndFlagTests(WebTestCase):
    @defer.inlineCallbacks
    def fetch(self, fmt: str = "json"):  # type: ignore[no-untyped-def]
        query = "?format=text" if fmt == "text" else ""
        answer = yield get(self, self.peers_url(query=query), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 200)
        if fmt == "text":
            return answer.body.decode()
        return {p["user_id"]: p for p in answer.json()["peers"]}

    @defer.inlineCallbacks
    def test_text_format(self):  # type: ignore[no-untyped-def]
        store = self.web.server.store
        yield store.record_seen("bob", "203.0.113.7", 40001, 1000.0)
        answer = yield get(self, self.peers_url(query="?format=text"), basic("alice", USERS["alice"]))
        self.assertEqual(answer.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        lines = answer.body.decode().splitlines()
        self.assertTrue(lines[0].startswith("# "))
        self.assertEqual(lines[1:], ["alice - unknown", "bob 203.0.113.7:40001 unknown"])

    @defer.inlineCallbacks
    def test_flags_follow_recorded_outcomes(self):  # type: ignore[no-untyped-def]
        store = self.web.server.store
        peers = yield self.fetch()
        self.assertEqual((peers["alice"]["use_stunt"], peers["bob"]["use_stunt"]), ("unknown", "unknown"))

        yield store.record_attempt("c1", "alice", "bob", "simultaneous-open", "stunt", None, None, 120.0, 1000.0)
        peers = yield self.fetch()
        self.assertEqual((peers["alice"]["use_stunt"], peers["bob"]["use_stunt"]), ("stunt", "stunt"))

        yield store.record_attempt("c2", "bob", "alice", None, "direct", None, None, 5.0, 1001.0)
        peers = yield self.fetch()
        self.assertEqual(peers["alice"]["use_stunt"], "direct")
        text = yield self.fetch("text")
        self.assertIn("alice - direct\n", text)
        self.assertIn("bob - stunt\n", text)

        for n in range(3):
            yield store.record_attempt(f"f{n}", "alice", "bob", "low-ttl", "failed", None, None, None, 2000.0 + n)
        peers = yield self.fetch()
        self.assertEqual(peers["bob"]["use_stunt"], "unreachable")
        self.assertEqual(peers["bob"]["pair"], {"latest": "failed", "failures": 3})
        text = yield self.fetch("text")
        self.assertIn("bob - unreachable\n", text)

    @defer.inlineCallbacks
    def test_a_flag_from_other_pairs_is_not_this_pairs(self):  # type: ignore[no-untyped-def]
        # Issue 12: bob's calls with carol failed (say her NAT is random, his
        # sequential), so bob's own flag says unreachable; to alice, who
        # never called him, he is worth a call, and once they connected he
        # is STUNT-reachable for her.
        store = self.web.server.store
        for n in range(3):  # with two peers: one alone decides only its own pair (issue 13)
            yield store.record_attempt(f"f{n}", ("carol", "dave")[n % 2], "bob", None, "failed", None, None, None,
                                       2000.0 + n)
        self.assertEqual((yield store.get_user("bob")).stunt_state, "unreachable")
        peers = yield self.fetch()
        self.assertEqual((peers["bob"]["use_stunt"], peers["bob"]["pair"]), ("unknown", None))
        yield store.record_attempt("ok", "alice", "bob", "simultaneous-open", "stunt", None, None, 100.0, 3000.0)
        yield store.record_attempt("f3", "carol", "bob", None, "failed", None, None, None, 3001.0)
        peers = yield self.fetch()
        self.assertEqual(peers["bob"]["use_stunt"], "stunt")
        self.assertEqual(peers["bob"]["pair"], {"latest": "stunt", "failures": 0})

    @defer.inlineCallbacks
    def test_one_attackers_failures_stay_in_its_pair(self):  # type: ignore[no-untyped-def]
        """Issue 13: three ``failed`` outcomes from one peer (carol, in another group), reported
        by both sides of each call even, do not make bob unreachable in alice's list."""
        store = self.web.server.store
        for n in range(3):
            yield store.record_attempt(f"f{n}", "carol", "bob", None, "failed", None, None, None, 2000.0 + n,
                                       ("bob", "carol"))
        self.assertEqual((yield store.get_user("bob")).stunt_state, "unknown")
        peers = yield self.fetch()
        self.assertEqual(peers["bob"]["use_stunt"], "unknown")
        # Nor do a caller's failures that bob never reported, from two peers.
        for n, caller in enumerate(("carol", "dave", "carol")):
            yield store.record_attempt(f"g{n}", caller, "bob", None, "failed", None, None, None, 3000.0 + n,
                                       (caller,))
        self.assertEqual((yield self.fetch())["bob"]["use_stunt"], "unknown")

    @defer.inlineCallbacks
    def test_nat_and_address_come_from_the_store(self):  # type: ignore[no-untyped-def]
        store = self.web.server.store
        yield store.record_seen("bob", "2001:db8::7", 5000, 1234.5)
        yield store.record_nat("bob", {"mapping": "endpoint-independent"}, 1235.0)
        peers = yield self.fetch()
        bob = peers["bob"]
        self.assertEqual((bob["ip"], bob["port"]), ("2001:db8::7", 5000))
        self.assertEqual(bob["nat"], {"mapping": "endpoint-independent"})
        self.assertIsNotNone(bob["last_seen"])
        text = yield self.fetch("text")
        self.assertIn("bob [2001:db8::7]:5000 unknown\n", text)

    @defer.inlineCallbacks
    def test_online_follows_the_registrar(self):  # type: ignore[no-untyped-def]
        peers = yield self.fetch()
        self.assertFalse(peers["bob"]["online"])
        client = yield connect_client(self, self.web.running, "bob", USERS["bob"])
        yield client.register()
        peers = yield self.fetch()
        self.assertTrue(peers["bob"]["online"])
        self.assertEqual((peers["bob"]["ip"], peers["bob"]["port"]), ("127.0.0.1", client.local[1]))
        self.assertFalse(peers["alice"]["online"])
        yield client.unregister()
        peers = yield self.fetch()
        self.assertFalse(peers["bob"]["online"])


class MetricsAndHealthTests(WebTestCase):
    @defer.inlineCallbacks
    def scrape(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, f"{self.web.url}/metrics")
        self.assertEqual(answer.code, 200)
        self.assertTrue(answer.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version="))
        values = {}
        for line in answer.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    @defer.inlineCallbacks
    def test_counters_show_up(self):  # type: ignore[no-untyped-def]
        before = yield self.scrape()
        self.assertEqual(before["kerjostunt_registrations_total"], 0.0)
        self.assertEqual(before["kerjostunt_registered_peers"], 0.0)
        client = yield connect_client(self, self.web.running, "alice", USERS["alice"])
        yield client.register()
        self.web.server.count("calls_stunt_low-ttl")
        self.web.server.count("calls_stunt_low-ttl")
        self.web.server.count("calls_failed")
        yield get(self, self.peers_url(), basic("alice", "wrong"))
        after = yield self.scrape()
        self.assertEqual(after["kerjostunt_registrations_total"], 1.0)
        self.assertEqual(after["kerjostunt_challenges_total"], 1.0)
        self.assertEqual(after["kerjostunt_registered_peers"], 1.0)
        self.assertEqual(after["kerjostunt_signaling_connections"], 1.0)
        self.assertEqual(after['kerjostunt_calls_total{code="200",outcome="stunt",technique="low-ttl"}'], 2.0)
        self.assertEqual(after['kerjostunt_calls_total{code="200",outcome="failed",technique="none"}'], 1.0)
        self.assertEqual(after["kerjostunt_web_auth_failures_total"], 1.0)
        self.assertGreater(after["kerjostunt_web_requests_total"], before["kerjostunt_web_requests_total"])

    @defer.inlineCallbacks
    def test_health(self):  # type: ignore[no-untyped-def]
        answer = yield get(self, f"{self.web.url}/health")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json(), {"status": "ok", "registered": 0, "store": "ok", "waiting_records": 0})

    @defer.inlineCallbacks
    def test_stopped_store_gives_503_not_a_traceback(self):  # type: ignore[no-untyped-def]
        yield self.web.server.store.stop()
        answer = yield get(self, f"{self.web.url}/health")
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["status"], "degraded")
        self.assertEqual(answer.json()["reason"], "the database does not answer: the store is stopping")
        answer = yield get(self, self.peers_url(), basic("alice", USERS["alice"]))
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.headers.getRawHeaders(b"retry-after"), [b"10"])
        self.assertIn("unavailable", answer.json()["error"])
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_wrong_ca_is_refused_by_the_client(self):  # type: ignore[no-untyped-def]
        from kerjostunt import tls

        other = Path(self.mktemp())
        paths = tls.ensure_certificates(other, DOMAIN)
        d = get(self, f"{self.web.url}/health", ca=paths.ca)
        yield self.assertFailure(d, web_client.ResponseNeverReceived)


class NoStore:
    def get_ha1(self, user_id: str, algorithm: str) -> defer.Deferred[None]:
        raise AssertionError("the limits apply before any store call")


class LimitTests(unittest.TestCase):
    """The channel's bounds, on a StringTransport (no store call is reached)."""

    def setUp(self) -> None:
        self.clock = Clock()
        registry = metrics.make_registry({}, process=False)
        self.site = web.make_site(store=NoStore(), registrar=None, metrics=registry, domain=DOMAIN, clock=self.clock)  # type: ignore[arg-type]

    def connect(self, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def test_request_body_is_refused(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_is_refused(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))

    def test_long_url_is_refused(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET /" + b"a" * (web.MAX_REQUEST_LINE + 10) + b" HTTP/1.1\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 414 "))
        self.assertTrue(transport.disconnecting)

    def test_long_header_is_refused(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (web.MAX_REQUEST_LINE + 10) + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))

    def test_idle_connection_times_out(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET /hea")
        self.clock.advance(web.IDLE_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)

    def test_connections_per_ip_are_bounded(self) -> None:
        protos = [self.connect()[0] for _ in range(web.MAX_CONNECTIONS_PER_IP)]
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertIsNotNone(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)))
        protos[0].connectionLost(None)
        self.assertIsNotNone(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))


class HangingStore:
    """A database that never answers (a stuck connection, a saturated pool)."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Any]] = []

    def get_ha1(self, user_id: str, algorithm: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append(d)
        return d

    def health(self) -> StoreHealth:
        return StoreHealth(True, None, 0.0, 0)

    claim_realm = get_ha1  # /health's write probe hangs the same way


class StoreTimeoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = HangingStore()
        self.resource = web.WebResource(
            store=self.store,  # type: ignore[arg-type]
            registrar=Registrar(self.clock),
            metrics=metrics.make_registry({}, process=False),
            domain=DOMAIN,
            clock=self.clock,
        )

    def render(self, path: bytes, authorization_value: str | None = None) -> DummyRequest:
        request = DummyRequest(path.split(b"/")[1:])
        request.uri = path
        if authorization_value is not None:
            request.requestHeaders.addRawHeader(b"authorization", authorization_value.encode())
        self.resource.render(request)
        return request

    def test_health_and_peers_answer_503_when_the_store_hangs(self) -> None:
        health = self.render(b"/health")
        peers = self.render(b"/v1/groups/friends/peers", basic("alice", "pw"))
        self.assertEqual((health.finished, peers.finished), (0, 0))
        self.clock.advance(web.HEALTH_TIMEOUT)  # /health answers within a second
        self.assertEqual((health.responseCode, health.finished, peers.finished), (503, 1, 0))
        self.assertEqual(json.loads(b"".join(health.written))["status"], "degraded")
        self.clock.advance(web.STORE_TIMEOUT - web.HEALTH_TIMEOUT)
        for request in (health, peers):
            self.assertEqual(request.responseCode, 503)
            self.assertEqual(request.finished, 1)
        # The late answers are dropped quietly: nothing is written twice.
        for call in self.store.calls:
            call.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_timely_answer_cancels_the_timer(self) -> None:
        request = self.render(b"/health")
        self.store.calls[0].callback(None)  # the read
        self.store.calls[1].callback(None)  # the write probe
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReadOnlyHealthTests(unittest.TestCase):
    """A database that turned read-only: reads work, /health says the writes fail."""

    @defer.inlineCallbacks
    def test_read_only_database_is_unhealthy(self):  # type: ignore[no-untyped-def]
        from kerjostunt.store import Database
        from kerjostunt.store.api import AsyncStore

        path = Path(self.mktemp()).resolve()
        db = Database(f"sqlite:///{path}")
        db.upgrade()
        db.claim_realm(DOMAIN, DOMAIN)
        db.close()
        store = AsyncStore(Database(f"sqlite:///file:{path}?mode=ro&uri=true"), reactor)
        store.start()
        self.addCleanup(store.stop)
        resource = web.WebResource(store=store, registrar=Registrar(reactor), metrics=metrics.make_registry({}, process=False),
                                   domain=DOMAIN, clock=reactor)
        request = DummyRequest([b"health"])
        request.uri = b"/health"
        resource.render(request)
        for _ in range(200):
            if request.finished:
                break
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d
        self.assertEqual(request.responseCode, 503)
        document = json.loads(b"".join(request.written))
        self.assertEqual(document["status"], "degraded")
        self.assertTrue(document["store"].startswith("writes fail: database error: "), document)
        self.assertIn("readonly", document["store"])


class CredentialParsingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.nonces = NonceManager(self.clock, lifetime=300.0)

    def request(self, value: str | None, uri: bytes = b"/v1/groups/g/peers") -> DummyRequest:
        request = DummyRequest(uri.split(b"/")[1:])
        request.uri = uri
        request.method = b"GET"
        if value is not None:
            request.requestHeaders.addRawHeader(b"authorization", value.encode())
        return request

    def test_stale_nonce_asks_again_with_stale_true(self) -> None:
        challenge = choose_challenge(web.challenges(DOMAIN, self.nonces))
        value = authorization(challenge, "alice", "pw", "GET", "/v1/groups/g/peers", "c")
        self.clock.advance(301)
        error = self.assertRaises(web.Unauthorized, web.parse_credentials, self.request(value), DOMAIN, self.nonces)
        self.assertTrue(error.stale)
        self.assertIn("stale=true", web.challenges(DOMAIN, self.nonces, stale=True)[0])

    def test_wrong_realm_and_garbage(self) -> None:
        challenge = {"realm": "elsewhere", "nonce": self.nonces.issue(), "algorithm": "MD5", "qop": "auth"}
        value = authorization(challenge, "alice", "pw", "GET", "/v1/groups/g/peers", "c")
        for bad in (value, "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer x", "Digest"):
            self.assertRaises(web.Unauthorized, web.parse_credentials, self.request(bad), DOMAIN, self.nonces)

    def test_basic_is_parsed(self) -> None:
        creds = web.parse_credentials(self.request(basic("alice", "p:w")), DOMAIN, self.nonces)
        self.assertEqual((creds.username, creds.password), (b"alice", b"p:w"))  # twisted.cred wants bytes
