"""Issue 13, database faults: a locked SQLite file, a store that never answers, a clean stop meanwhile.

The lock is real: a second sqlite3 connection (as another process, a backup
or an import, would) holds ``BEGIN IMMEDIATE`` on the server's file. The
store's retry timers run on a ``Clock``; its thread pool and SQLite are
real, so each try that meets the lock costs one real busy timeout
(``BUSY_TIMEOUT``, a quarter second).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from kerjostunt.server import metrics, web
from kerjostunt.server.auth import NonceManager, make_portal
from kerjostunt.server.deadline import STORE_DEADLINE
from kerjostunt.server.register import STORE_RETRY_AFTER, RegisterHandler
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.router import SignalingRouter
from kerjostunt.server.signaling import ConnectionLimits, SignalingFactory
from kerjostunt.store import Database, StoreBusy
from kerjostunt.store import api as store_api
from kerjostunt.store.api import BUSY_TIMEOUT, HA1_WINDOW, SEEN_DELAY, AsyncStore
from kerjostunt.store.behind import ATTEMPT_DELAY
from kerjostunt.store.lanes import RETRY_FIRST, StoreHealth
from kerjostunt.store.service import StoreService
from kerjostunt.wire.sip.digest import authorization
from kerjostunt.wire.sip.headers import parse_auth
from kerjostunt.wire.sip.message import Headers, Request, Response
from kerjostunt.wire.sip.parser import StreamParser

from .callsupport import offer, online
from .support import DOMAIN, add_users, connect_client, start_server
from .test_store import REALM, md5_ha1


class Events:
    """A ``counter`` for the store: each name's next occurrence as a Deferred."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._waiting: dict[str, list[defer.Deferred[None]]] = {}

    def __call__(self, what: str) -> None:
        self.seen.append(what)
        for d in self._waiting.pop(what, []):
            d.callback(None)

    def next(self, what: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.setdefault(what, []).append(d)
        return d


class Lock:
    """Another connection holding SQLite's write lock on ``path`` (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: str) -> None:
        self._conn: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._conn is not None:
            self._conn.execute("COMMIT")
            self._conn.close()
            self._conn = None


class LockedDatabaseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite")
        self.url = f"sqlite:///{self.path}"
        setup = Database(self.url)
        setup.upgrade()
        for user in ("a", "b"):
            setup.add_user(user, REALM, password="pw")
        setup.close()
        self.pending = Path(self.path + ".pending.jsonl")

    def store(self, clock: Clock | None = None) -> tuple[AsyncStore, Clock, Events]:
        clock = clock or Clock()
        events = Events()
        store = AsyncStore(Database(self.url, busy_timeout=BUSY_TIMEOUT), reactor, clock=clock, counter=events)
        store.start()
        self.addCleanup(store.stop)
        return store, clock, events

    def lock(self) -> Lock:
        lock = Lock(self.path)
        self.addCleanup(lock.release)
        return lock

    def attempts(self) -> list[str]:
        check = Database(self.url)
        try:
            return [a.call_id for a in check.recent_attempts("b", limit=100)]
        finally:
            check.close()

    def report(
        self, store: AsyncStore, call_id: str = "c1", clock: Clock | None = None
    ) -> defer.Deferred[dict[str, str]]:
        """An outcome; with ``clock``, its write-behind wait over (store/behind.py)."""
        d = store.record_attempt(call_id, "a", "b", "direct", "direct", None, None, 12.0, 100.0)
        if clock is not None:
            clock.advance(ATTEMPT_DELAY)
        return d

    @defer.inlineCallbacks
    def test_an_outcome_reported_during_the_lock_is_written_after_it(self):  # type: ignore[no-untyped-def]
        store, clock, events = self.store()
        lock = self.lock()
        reported = self.report(store, clock=clock)
        yield events.next("store_write_retries")  # it met the lock, and waits
        self.assertFalse(reported.called)
        health = store.health()
        self.assertEqual((health.writing, health.waiting), (False, 1))
        self.assertIn("database is locked", health.reason or "")
        # What a REGISTER needs still answers, on the read lane's own connection.
        ha1 = store.get_ha1("a", "MD5")
        clock.advance(HA1_WINDOW)
        self.assertEqual((yield ha1), md5_ha1("a", REALM, "pw"))
        # So do the other reads (the web's peers list): what is stored, not held behind the write.
        user = yield store.get_user("b")
        self.assertEqual(user.stunt_state, "unknown")
        self.assertFalse(reported.called)
        self.assertEqual(self.attempts(), [])
        lock.release()
        clock.advance(RETRY_FIRST)
        states = yield reported
        self.assertEqual(states, {"a": "unknown", "b": "direct"})
        self.assertEqual(self.attempts(), ["c1"])
        self.assertEqual(store.health(), StoreHealth(True, None, 0.0, 0))
        self.assertFalse(self.pending.exists())

    @defer.inlineCallbacks
    def test_writes_stay_in_order_across_the_retries(self):  # type: ignore[no-untyped-def]
        store, clock, events = self.store()
        lock = self.lock()
        first = self.report(store, "c1", clock)
        yield events.next("store_write_retries")
        later = [self.report(store, f"c{i}") for i in range(2, 5)]  # one batch of three, sent at the retry
        clock.advance(RETRY_FIRST)  # a second try, still locked: one busy timeout for the batch
        yield events.next("store_write_retries")
        self.assertEqual(store.health().waiting, 4)
        lock.release()
        clock.advance(2 * RETRY_FIRST)
        yield defer.gatherResults([first, *later])
        self.assertEqual(self.attempts(), ["c4", "c3", "c2", "c1"])  # newest first, all there

    @defer.inlineCallbacks
    def test_an_ordinary_write_gives_up_after_its_total(self):  # type: ignore[no-untyped-def]
        self.patch(store_api, "RETRY_TOTAL", 0.5)
        store, clock, events = self.store()
        self.lock()
        added = store.add_group("g")
        yield events.next("store_write_retries")
        clock.advance(1.0)  # the next try comes past the total
        yield self.assertFailure(added, StoreBusy)

    @defer.inlineCallbacks
    def test_a_clean_stop_keeps_the_outcome_and_the_next_start_writes_it(self):  # type: ignore[no-untyped-def]
        store, clock, events = self.store()
        lock = self.lock()
        reported = self.report(store)
        seen = store.record_seen("a", "192.0.2.7", 4444, 99.0)
        clock.advance(SEEN_DELAY)
        yield events.next("store_write_retries")
        yield store.stop()
        self.assertEqual((yield reported), {})  # kept, states not known
        self.assertIsNone((yield seen))
        self.assertEqual(events.seen.count("store_records_saved"), 2)
        lines = [json.loads(line) for line in self.pending.read_text().splitlines()]
        self.assertEqual([line["op"] for line in lines], ["record_attempts_many", "record_seen_many"])
        self.assertEqual(stat.S_IMODE(self.pending.stat().st_mode), 0o600)
        self.assertEqual(self.attempts(), [])
        lock.release()

        # The next start (what twistd does): the file is read back, written, removed.
        restarted = AsyncStore(Database(self.url, busy_timeout=BUSY_TIMEOUT), reactor)
        service = StoreService(restarted)
        service.startService()
        self.assertFalse(self.pending.exists())
        user = yield restarted.get_user("a")  # behind the replayed writes, in order (nothing failing)
        self.assertEqual((user.public_ip, user.public_port, user.last_seen), ("192.0.2.7", 4444, 99.0))
        yield service.stopService()
        self.assertEqual(self.attempts(), ["c1"])

    @defer.inlineCallbacks
    def test_past_the_memory_bound_records_go_to_the_pending_file(self):  # type: ignore[no-untyped-def]
        self.patch(store_api, "MAX_KEPT", 1)
        store, clock, events = self.store()
        self.lock()
        kept = self.report(store, "c1", clock)
        yield events.next("store_write_retries")
        spilled = self.report(store, "c2", clock)
        self.assertTrue(spilled.called)  # written to the file as soon as its batch is sent
        self.assertEqual((yield spilled), {})
        batches = [json.loads(line)["args"][0] for line in self.pending.read_text().splitlines()]
        self.assertEqual([[row[0] for row in batch] for batch in batches], [["c2"]])
        self.assertEqual(store.health().waiting, 1)
        self.assertFalse(kept.called)

    @defer.inlineCallbacks
    def test_a_pending_file_beyond_the_bound_is_replayed_whole(self):  # type: ignore[no-untyped-def]
        self.patch(store_api, "MAX_KEPT", 1)
        lines = [{"op": "record_attempt", "args": [f"c{i}", "a", "b", None, "failed", None, None, 1.0, 100.0 + i],
                  "kwargs": {}} for i in range(3)]
        self.pending.write_text("".join(json.dumps(line) + "\n" for line in lines))
        store, _clock, _events = self.store()
        self.assertEqual(store.replay_pending(), 3)
        self.assertFalse(self.pending.exists())  # none went back to the file
        yield store.stop()
        self.assertEqual(self.attempts(), ["c2", "c1", "c0"])

    def test_unreadable_pending_lines_are_set_aside_not_replayed(self) -> None:
        good = {"op": "record_nat", "args": ["a", {"mapping": "endpoint-independent"}, 5.0], "kwargs": {}}
        self.pending.write_text(json.dumps(good) + "\nnot json\n" + json.dumps({"op": "delete_user", "args": ["a"]}) + "\n")
        store, _clock, events = self.store()
        self.assertEqual(store.replay_pending(), 1)
        self.assertFalse(self.pending.exists())
        rejected = Path(str(self.pending) + ".rejected").read_text().splitlines()
        self.assertEqual(len(rejected), 2)
        self.assertIn("delete_user", rejected[1])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_database_files_are_made_private_at_start(self):  # type: ignore[no-untyped-def]
        os.chmod(self.path, 0o644)
        self.pending.write_text("")
        os.chmod(self.pending, 0o644)
        service = StoreService(AsyncStore(Database(self.url), reactor))
        service.startService()
        yield service.stopService()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        fresh = os.path.abspath(self.mktemp() + ".sqlite")
        old = os.umask(0o022)
        try:
            service = StoreService(AsyncStore(Database(f"sqlite:///{fresh}"), reactor))
            service.startService()  # the server still creates its database on first start
        finally:
            os.umask(old)
        yield service.stopService()
        self.assertEqual(stat.S_IMODE(os.stat(fresh).st_mode), 0o600)


class RegisterWhileLockedTests(unittest.TestCase):
    """The whole server on loopback while another connection holds the write lock."""

    @defer.inlineCallbacks
    def test_register_answers_and_its_last_seen_is_written_after(self):  # type: ignore[no-untyped-def]
        running = yield start_server(self)
        add_users(running, {"alice": "wonderland"})
        lock = Lock(running.db_url[len("sqlite:///"):])
        self.addCleanup(lock.release)
        client = yield connect_client(self, running, "alice", "wonderland")
        registration = yield client.register()  # 200 OK: the read lane is not behind the lock
        self.assertEqual(registration.public_ip, "127.0.0.1")
        lock.release()
        yield running.server.store._when_idle()  # the retried last-seen write done
        user = yield running.server.store.get_user("alice")
        self.assertEqual((user.public_ip, user.public_port), ("127.0.0.1", client.local[1]))


class NeverAnswers:
    """A store whose credentials look-up never answers (a hung database)."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[str | None]] = []

    def get_ha1(self, user_id: str, algorithm: str) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.Deferred()
        self.calls.append(d)
        return d


class RegisterDeadlineTests(unittest.TestCase):
    """A REGISTER on a signaling connection (StringTransport, Clock) whose store never answers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = NeverAnswers()
        self.counts: list[str] = []
        registrar = Registrar(self.clock)
        handler = RegisterHandler(
            self.clock, DOMAIN, registrar, make_portal(self.store.get_ha1), NonceManager(self.clock),
            _NoUsage(), counter=self.counts.append,
        )
        factory = SignalingFactory(SignalingRouter(registrar, handler), self.clock, ConnectionLimits(), tls=False)
        self.proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, cseq: int, auth: str | None = None) -> list[Response]:
        headers = [
            ("Via", "SIP/2.0/TLS 192.0.2.1:40000;branch=z9hG4bK-1"),
            ("From", f"<sips:alice@{DOMAIN}>;tag=a"), ("To", f"<sips:alice@{DOMAIN}>"),
            ("Call-ID", "c1"), ("CSeq", f"{cseq} REGISTER"),
            ("Contact", "<sips:alice@192.0.2.1:40000;transport=tls>"), ("Content-Length", "0"),
        ]
        if auth is not None:
            headers.append(("Authorization", auth))
        self.proto.dataReceived(Request("REGISTER", f"sips:{DOMAIN}", Headers(headers)).to_bytes())
        return self.responses()

    def responses(self) -> list[Response]:
        return [m for m in StreamParser().feed(self.transport.value()) if isinstance(m, Response)]

    def test_a_register_the_store_cannot_answer_gets_503_with_retry_after(self) -> None:
        [challenge] = self.send(1)
        self.assertEqual(challenge.code, 401)
        params = [p for _, p in map(parse_auth, challenge.headers.get_all("WWW-Authenticate"))][0]
        self.send(2, authorization(params, "alice", "pw", "REGISTER", f"sips:{DOMAIN}", "c0ffee"))
        self.assertEqual(len(self.responses()), 1)  # waiting for the store
        self.clock.advance(STORE_DEADLINE - 0.01)
        self.assertEqual(len(self.responses()), 1)
        self.clock.advance(0.01)
        answer = self.responses()[-1]
        self.assertEqual((answer.code, answer.headers.get("Retry-After")), (503, str(STORE_RETRY_AFTER)))
        self.assertIn("register_store_unavailable", self.counts)
        self.assertFalse(self.transport.disconnecting)  # the peer may try again on this connection
        # The store's late answer changes nothing: no second response, no traceback.
        self.store.calls[0].callback(None)
        self.assertEqual(len(self.responses()), 2)


class _NoUsage:
    def record_seen(self, *args: Any) -> defer.Deferred[None]:
        raise AssertionError("not registered")

    def record_nat(self, *args: Any) -> defer.Deferred[None]:
        raise AssertionError("not registered")

    def record_attempt(self, *args: Any, **kwargs: Any) -> defer.Deferred[None]:
        raise AssertionError("not registered")


class HealthStore:
    """A store whose writes fail or not, as ``health`` says; reads answer (or never)."""

    def __init__(self) -> None:
        self.state = StoreHealth(True, None, 0.0, 0)
        self.answer: Callable[[], defer.Deferred[str | None]] = lambda: defer.succeed(None)

    def health(self) -> StoreHealth:
        return self.state

    def get_ha1(self, user_id: str, algorithm: str) -> defer.Deferred[str | None]:
        return self.answer()

    def claim_realm(self, wanted: str | None, default: str) -> defer.Deferred[str]:
        """/health's no-op write (issue 14): it goes through while ``health`` says writes do."""
        return defer.succeed(wanted or default)


class HealthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = HealthStore()
        self.resource = web.WebResource(
            store=self.store,  # type: ignore[arg-type]
            registrar=Registrar(self.clock), metrics=metrics.make_registry({}, process=False),
            domain=DOMAIN, clock=self.clock,
        )

    def health(self) -> tuple[int, dict[str, Any]]:
        request = DummyRequest([b"health"])
        request.uri = b"/health"
        self.resource.render(request)
        if not request.finished:
            self.clock.advance(web.HEALTH_TIMEOUT)
        self.assertEqual(request.finished, 1)
        return request.responseCode, json.loads(b"".join(request.written))

    def test_degraded_while_writes_fail_then_ok(self) -> None:
        self.store.state = StoreHealth(False, "database error: database is locked", 12.3, 7)
        code, document = self.health()
        self.assertEqual((code, document["status"], document["waiting_records"]), (200, "degraded", 7))
        self.assertEqual(document["reason"], "writes failing for 12 s: database error: database is locked")
        self.store.state = StoreHealth(True, None, 0.0, 0)
        code, document = self.health()
        self.assertEqual((code, document["status"]), (200, "ok"))
        self.assertNotIn("reason", document)

    def test_degraded_within_a_second_when_reads_do_not_answer(self) -> None:
        self.store.answer = defer.Deferred
        self.assertLess(web.HEALTH_TIMEOUT, 1.0)
        code, document = self.health()
        self.assertEqual((code, document["status"]), (503, "degraded"))
        self.assertIn("no answer from the database", document["reason"])


class OutcomeWhileLockedTests(unittest.TestCase):
    """A real call's outcomes, acknowledged with 200 while another connection holds the write lock."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        self.peers = yield online(self, self.running, {"alice": "wonderland", "bob": "builder"})
        self.store = self.running.server.store
        self.events = Events()
        counter = self.store._count

        def count(what: str) -> None:
            counter(what)
            self.events(what)

        self.patch(self.store, "_count", count)
        self.path = self.running.db_url[len("sqlite:///"):]

    @defer.inlineCallbacks
    def call_reported_while_locked(self):  # type: ignore[no-untyped-def]
        """A call, the lock taken, both outcomes reported (200 each); fires once the write met the lock."""
        alice, bob = self.peers["alice"], self.peers["bob"]
        port_a, _ = yield alice.probe()
        invite, final = alice.invite("bob", offer("alice", port_a, [7000]))
        forwarded = yield bob.next("INVITE")
        port_b, _ = yield bob.probe()
        bob.answer(forwarded, 200, offer("bob", port_b, [7001]))
        ok = yield final
        yield bob.next("ACK")
        alice.ack(invite, ok)
        yield self.store._when_idle()  # the call's own writes (last seen, NAT) are in
        lock = Lock(self.path)
        self.addCleanup(lock.release)
        retried = self.events.next("store_write_retries")
        body = "outcome=stunt\ntechnique=simultaneous-open\nremote=127.0.0.1:{}\nelapsed_ms=183\n"
        r1 = yield alice.report(invite.call_id, "bob", body.format(port_b))
        r2 = yield bob.report(forwarded.call_id, "alice", body.format(port_a))
        self.assertEqual((r1.code, r2.code), (200, 200))  # acknowledged
        yield retried
        self.assertFalse(self.store.health().writing)
        return lock, invite.call_id

    def attempts(self) -> list[tuple[str, str]]:
        check = Database(self.running.db_url)
        try:
            return [(a.outcome, a.technique or "") for a in check.recent_attempts("bob")]
        finally:
            check.close()

    @defer.inlineCallbacks
    def test_the_outcome_is_in_the_database_once_the_lock_is_released(self):  # type: ignore[no-untyped-def]
        lock, _ = yield self.call_reported_while_locked()
        self.assertEqual(self.attempts(), [])
        lock.release()
        yield self.store._when_idle()  # every queued call done: the retried outcome written
        bob = yield self.store.get_user("bob")
        self.assertEqual(bob.stunt_state, "stunt")
        self.assertEqual(self.attempts(), [("stunt", "simultaneous-open")])
        self.assertTrue(self.store.health().writing)

    @defer.inlineCallbacks
    def test_a_clean_stop_during_the_lock_keeps_the_outcome_for_the_next_start(self):  # type: ignore[no-untyped-def]
        lock, _ = yield self.call_reported_while_locked()
        yield self.running.server.stopService()
        pending = Path(self.path + ".pending.jsonl")
        ops = [json.loads(line)["op"] for line in pending.read_text().splitlines()]
        self.assertEqual(ops, ["record_attempts_many"])
        lock.release()
        self.assertEqual(self.attempts(), [])
        service = StoreService(AsyncStore(Database(self.running.db_url, busy_timeout=BUSY_TIMEOUT), reactor))
        service.startService()  # what the next twistd start does
        yield service.stopService()
        self.assertEqual(self.attempts(), [("stunt", "simultaneous-open")])
        self.assertFalse(pending.exists())


POSTGRES_URL = os.environ.get("KERJOSTUNT_TEST_POSTGRES_URL", "")


class PostgresLockTests(unittest.TestCase):
    """The same retry on PostgreSQL: another transaction holds the users' rows (``lock_timeout``)."""

    if not POSTGRES_URL:
        skip = "KERJOSTUNT_TEST_POSTGRES_URL is not set (run .ci/start-postgres and export the URL it prints)"

    def setUp(self) -> None:
        setup = Database(POSTGRES_URL)
        with setup.engine.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        setup.upgrade()
        for user in ("a", "b"):
            setup.add_user(user, REALM, password="pw")
        self.setup = setup
        self.addCleanup(setup.close)

    @defer.inlineCallbacks
    def test_an_outcome_waits_for_the_rows_and_is_written_after(self):  # type: ignore[no-untyped-def]
        clock, events = Clock(), Events()
        store = AsyncStore(Database(POSTGRES_URL, busy_timeout=BUSY_TIMEOUT), reactor, clock=clock, counter=events)
        store.start()
        self.addCleanup(store.stop)
        holder = self.setup.engine.connect()
        self.addCleanup(holder.close)
        transaction = holder.begin()
        holder.exec_driver_sql("SELECT user_id FROM users WHERE user_id IN ('a', 'b') FOR UPDATE")
        reported = store.record_attempt("c1", "a", "b", "direct", "direct", None, None, 12.0, 100.0)
        clock.advance(ATTEMPT_DELAY)  # its write-behind wait (store/behind.py)
        yield events.next("store_write_retries")
        self.assertIn("lock timeout", store.health().reason or "")
        ha1 = store.get_ha1("a", "MD5")
        clock.advance(HA1_WINDOW)
        self.assertEqual((yield ha1), md5_ha1("a", REALM, "pw"))
        transaction.commit()
        clock.advance(RETRY_FIRST)
        self.assertEqual((yield reported), {"a": "unknown", "b": "direct"})
        self.assertEqual([a.call_id for a in self.setup.recent_attempts("b")], ["c1"])
