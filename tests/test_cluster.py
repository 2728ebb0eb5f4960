"""Two server instances on one real PostgreSQL: presence, calls across them, one binding per user.

Set KERJOSTUNT_TEST_POSTGRES_URL (``.ci/start-postgres`` prints one); each
test starts from an empty ``public`` schema. The instances are two
``StuntServer``s in this process on 127.0.0.1 port 0, sharing one
certificate directory (one CA); the kill -9 test runs one as a twistd
subprocess.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from kerjostunt.client.agent import PeerAgent
from kerjostunt.client.agentconfig import Account, AgentConfig, ServerConfig
from kerjostunt.client.backoff import Backoff
from kerjostunt.server.cluster import ClusterNode
from kerjostunt.server.service import ServerSettings, StuntServer
from kerjostunt.store import Database
from kerjostunt.wire.sdp import parse_sdp

from .callsupport import Peer, offer
from .processes import free_port, spawn
from .support import DOMAIN, REPO_ROOT, RunningServer, connect_client, subprocess_env
from .test_agent import Recorder

URL = os.environ.get("KERJOSTUNT_TEST_POSTGRES_URL", "")
SKIP = "KERJOSTUNT_TEST_POSTGRES_URL is not set (run .ci/start-postgres and export the URL it prints)"
USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer"}


def empty_database() -> None:
    db = Database(URL)
    try:
        with db.engine.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        db.upgrade()
        for user, password in USERS.items():
            db.add_user(user, DOMAIN, password=password)
        db.add_group("friends")
        db.join_group("friends", list(USERS))
    finally:
        db.close()


def until(node: ClusterNode, condition: Callable[[], bool], timeout: float = 10.0) -> defer.Deferred[float]:
    """Fires with the seconds it took once ``condition()`` holds, checked on every notification
    and heartbeat the node handles; fails after ``timeout``."""
    started = time.monotonic()
    d: defer.Deferred[float] = defer.Deferred()

    def check() -> None:
        if not d.called and condition():
            node.observers.remove(check)
            d.callback(time.monotonic() - started)

    node.observers.append(check)
    check()
    return d.addTimeout(timeout, reactor)


@defer.inlineCallbacks
def start_instance(case: unittest.TestCase, certs: Path, sip_port: int = 0, reuse_port: bool = False):  # type: ignore[no-untyped-def]
    settings = ServerSettings(
        domain=DOMAIN, db_url=URL, certs_dir=certs, sip_endpoint=f"tcp:{sip_port}:interface=127.0.0.1",
        probe_endpoints=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"], probe_ports=[0, 0],
        web_endpoint=None, advertise="127.0.0.1", reuse_port=reuse_port,
    )
    server = StuntServer(settings, reactor)
    server.startService()
    case.addCleanup(server.stopService)
    ports = {}
    for name in list(server.ports):
        ports[name] = yield server.ports[name]
    assert server.cluster is not None
    yield server.cluster.ready
    return RunningServer(server, "127.0.0.1", ports["sip"].getHost().port, server.certificates.ca, URL)


@defer.inlineCallbacks
def register(case: unittest.TestCase, running: RunningServer, user: str):  # type: ignore[no-untyped-def]
    peer = Peer(user)
    peer.proto = yield connect_client(case, running, user, USERS[user], peer.on_request)
    yield peer.proto.register()
    return peer


class TwoInstanceTests(unittest.TestCase):
    timeout = 60
    if not URL:
        skip = SKIP

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        empty_database()
        certs = Path(self.mktemp()) / "certs"
        self.a = yield start_instance(self, certs)
        self.b = yield start_instance(self, certs)
        self.node_a: ClusterNode = self.a.server.cluster
        self.node_b: ClusterNode = self.b.server.cluster

    @defer.inlineCallbacks
    def test_presence_rows_and_the_view(self):  # type: ignore[no-untyped-def]
        yield register(self, self.b, "bob")
        yield until(self.node_a, lambda: self.node_a.view.where("bob") is not None)
        binding = self.node_a.view.where("bob")
        self.assertEqual(binding.instance_id, self.node_b.instance_id)
        self.assertEqual(binding.public_ip, "127.0.0.1")
        self.assertIsNone(self.node_b.view.where("bob"))  # bound there: not "elsewhere"
        # The row is written behind (queued when B broadcast); a third instance would load it at start-up.
        yield self.b.server.store._when_idle()
        db = Database(URL)
        self.addCleanup(db.close)
        from kerjostunt.store import presence

        rows = presence.load_bindings(db, "nobody")
        self.assertEqual([(r.user_id, r.instance_id) for r in rows], [("bob", self.node_b.instance_id)])

    @defer.inlineCallbacks
    def test_a_call_crosses_instances_with_the_callees_own_prediction(self):  # type: ignore[no-untyped-def]
        alice = yield register(self, self.a, "alice")
        bob = yield register(self, self.b, "bob")
        punch, _results = yield bob.probe()  # on instance B: only B has bob's probes
        yield until(self.node_a, lambda: self.node_a.view.where("bob") is not None)
        invite, final = alice.invite("bob", offer("alice", 40001, [40002]))
        forwarded = yield bob.next("INVITE")
        self.assertEqual(parse_sdp(forwarded.body).user, "alice")
        self.assertEqual(forwarded.headers.get("X-Kerjo-Role"), "responder")
        bob.answer(forwarded, 200, offer("bob", punch, [40004]))
        ok = yield final
        self.assertEqual(ok.code, 200)
        self.assertEqual(ok.headers.get("X-Kerjo-Role"), "initiator")
        self.assertEqual(ok.headers.get("X-Kerjo-Call-Secret"), forwarded.headers.get("X-Kerjo-Call-Secret"))
        # B predicted from bob's probe of exactly that punch port: high confidence, the probed mapping.
        prflx = [(c.ip, c.port) for c in parse_sdp(ok.body).of_type("prflx")]
        self.assertEqual(prflx[0], ("127.0.0.1", punch))
        ack = yield bob.next("ACK")
        self.assertIsNotNone(ack.headers.get("X-Kerjo-Dial-In"))
        alice.ack(invite, ok)
        body = "outcome=stunt\ntechnique=simultaneous-open\nremote=127.0.0.1:1\nelapsed_ms=3\n"
        answers = yield defer.gatherResults([
            alice.report(invite.call_id, "bob", body),
            bob.report(forwarded.call_id, "alice", "outcome=failed\ntechnique=none\n"),
        ])
        self.assertEqual([r.code for r in answers], [200, 200])
        yield self.a.server.store._when_idle()
        attempts = yield self.a.server.store.recent_attempts("alice")
        self.assertEqual([(x.caller, x.callee, x.outcome) for x in attempts], [("alice", "bob", "stunt")])
        self.assertGreater(self.a.server.counters["cluster_sent"], 0)
        self.assertGreater(self.b.server.counters["cluster_relayed"], 0)

    @defer.inlineCallbacks
    def test_agents_on_two_instances_connect_and_echo(self):  # type: ignore[no-untyped-def]
        bob_side: defer.Deferred = defer.Deferred()
        bob = self.agent(self.b, "bob", accept_factory=Factory.forProtocol(Recorder), on_peer=bob_side.callback)
        yield bob.start()
        alice = self.agent(self.a, "alice")
        yield alice.start()
        yield until(self.node_a, lambda: self.node_a.view.where("bob") is not None)
        connection = yield alice.connect("bob", Factory.forProtocol(Recorder), timeout=20)
        self.addCleanup(connection.protocol.transport.abortConnection)
        connection.protocol.transport.write(b"hello bob\n")
        theirs = yield bob_side.addTimeout(10, reactor)
        self.addCleanup(theirs.protocol.transport.abortConnection)
        yield theirs.protocol.wait_for(b"hello bob\n")
        theirs.protocol.transport.write(b"hello bob\n")  # the echo
        yield connection.protocol.wait_for(b"hello bob\n")
        self.assertEqual(theirs.peer_id, "alice")

    def agent(self, running: RunningServer, user: str, **kw: Any) -> PeerAgent:
        agent = PeerAgent(reactor, server=(running.host, running.port), user_id=user, password=USERS[user],
                          domain=DOMAIN, ca_path=str(running.ca), tls_hostname="localhost", **kw)
        self.addCleanup(agent.stop)
        return agent

    @defer.inlineCallbacks
    def test_registering_on_another_instance_replaces_the_binding(self):  # type: ignore[no-untyped-def]
        first = yield register(self, self.a, "carol")
        yield until(self.node_b, lambda: self.node_b.view.where("carol") is not None)
        yield register(self, self.b, "carol")
        yield first.proto.disconnected.addTimeout(10, reactor)  # A closed the old connection
        self.assertIsNone(self.a.server.registrar.lookup("carol"))
        yield until(self.node_a, lambda: self.node_a.view.where("carol") is not None)
        self.assertEqual(self.node_a.view.where("carol").instance_id, self.node_b.instance_id)
        self.assertIsNotNone(self.b.server.registrar.lookup("carol"))
        self.assertEqual(self.a.server.counters["cluster_takeovers"], 1)

    @defer.inlineCallbacks
    def test_a_message_that_cannot_cross_ends_the_call_at_once(self):  # type: ignore[no-untyped-def]
        alice = yield register(self, self.a, "alice")
        yield register(self, self.b, "bob")
        yield until(self.node_a, lambda: self.node_a.view.where("bob") is not None)
        self.patch(self.node_a._channels, "notify", lambda channel, payload: False)  # as if too large
        asked = time.monotonic()
        _invite, final = alice.invite("bob", offer("alice", 40001))
        response = yield final
        self.assertEqual(response.code, 480)  # the callee's leg went as a lost connection does
        self.assertLess(time.monotonic() - asked, 2.0)  # not the 15 s answer timeout
        self.assertNotIn((self.node_b.instance_id, "bob"), self.node_a.legs)

    @defer.inlineCallbacks
    def test_a_user_bound_nowhere_is_480(self):  # type: ignore[no-untyped-def]
        alice = yield register(self, self.a, "alice")
        _invite, final = alice.invite("carol", offer("alice", 40001))
        response = yield final
        self.assertEqual(response.code, 480)

    @defer.inlineCallbacks
    def test_a_clean_stop_takes_its_users_out_at_once(self):  # type: ignore[no-untyped-def]
        yield register(self, self.b, "bob")
        yield until(self.node_a, lambda: self.node_a.view.where("bob") is not None)
        yield self.b.server.stopService()
        took = yield until(self.node_a, lambda: self.node_a.view.where("bob") is None)
        self.assertLess(took, 1.0)  # the goodbye broadcast, not the lease


class PresenceTests(unittest.TestCase):
    """The presence rows themselves (store/presence.py), blocking, on the real PostgreSQL."""

    if not URL:
        skip = SKIP

    def setUp(self) -> None:
        empty_database()
        self.db = Database(URL)
        self.addCleanup(self.db.close)

    def test_leases_bindings_takeover_and_leave(self) -> None:
        from kerjostunt.store import presence

        one = presence.InstanceInfo("one", "h1", 5061, (3478, 3479))
        two = presence.InstanceInfo("two", "h2", 5062, (3480, 3481))
        presence.heartbeat(self.db, one, 6.0)
        leases = {lease.info.instance_id: lease for lease in presence.heartbeat(self.db, two, 6.0)}
        self.assertEqual(leases["one"].info, one)
        self.assertTrue(5.0 < leases["two"].remaining <= 6.0)
        presence.write_bindings(self.db, "one", [presence.BindingRow("bob", "one", "10.0.0.1", 4000, 1.0)], [])
        presence.write_bindings(self.db, "two", [presence.BindingRow("bob", "two", "10.0.0.2", 4001, 2.0)], [])
        presence.write_bindings(self.db, "one", [], ["bob"])  # late: bob is two's now, the row stays
        self.assertEqual([(r.user_id, r.instance_id, r.public_port) for r in presence.load_bindings(self.db, "x")],
                         [("bob", "two", 4001)])
        self.assertEqual(presence.load_bindings(self.db, "two"), [])  # one's own are not "elsewhere"
        presence.leave(self.db, "two")
        self.assertEqual(presence.load_bindings(self.db, "x"), [])
        remaining = {lease.info.instance_id: lease.remaining for lease in presence.heartbeat(self.db, one, 6.0)}
        self.assertNotIn("two", remaining)  # gone for good: its lease ended FORGET_AFTER ago


class SharedPortTests(unittest.TestCase):
    """Two instances on one SIP port (--reuse-port): peers land on either, and calls reach across."""

    timeout = 60
    if not URL:
        skip = SKIP

    @defer.inlineCallbacks
    def test_two_instances_share_the_signaling_port(self):  # type: ignore[no-untyped-def]
        empty_database()
        certs = Path(self.mktemp()) / "certs"
        a = yield start_instance(self, certs, reuse_port=True)
        b = yield start_instance(self, certs, sip_port=a.port, reuse_port=True)
        self.assertEqual(b.port, a.port)
        peers = {}
        for user in USERS:
            peers[user] = yield register(self, a, user)  # a.port is b's too
        holders = {user: [s.server.cluster.instance_id for s in (a, b) if s.server.registrar.lookup(user)]
                   for user in USERS}
        self.assertEqual({user: len(where) for user, where in holders.items()}, dict.fromkeys(USERS, 1))
        caller, callee = "alice", "carol"
        callee_node = (a if holders[callee][0] == a.server.cluster.instance_id else b).server.cluster
        caller_node = (a if holders[caller][0] == a.server.cluster.instance_id else b).server.cluster
        if caller_node is not callee_node:
            yield until(caller_node, lambda: caller_node.view.where(callee) is not None)
        _invite, final = peers[caller].invite(callee, offer(caller, 40001))
        forwarded = yield peers[callee].next("INVITE")
        peers[callee].answer(forwarded, 200, offer(callee, 40003))
        ok = yield final
        self.assertEqual(ok.code, 200)


class KillTests(unittest.TestCase):
    """kill -9 of an instance: its users leave the other's view within 10 s, and calls get 480 at once."""

    timeout = 60
    if not URL:
        skip = SKIP

    @defer.inlineCallbacks
    def test_kill_9(self):  # type: ignore[no-untyped-def]
        empty_database()
        base = Path(self.mktemp()).resolve()
        certs = base / "certs"
        a = yield start_instance(self, certs)
        node: ClusterNode = a.server.cluster
        port = free_port()
        args = ["-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=", "kerjostunt", "--db", URL, "--certs", str(certs),
                "--domain", DOMAIN, "--interface", "127.0.0.1", "--port", str(port), "--web-port", "0",
                "--probe-ports", f"{free_port()},{free_port()}", "--advertise", "127.0.0.1"]
        child = spawn(self, "twistd", sys.executable, args, env=subprocess_env(), path=str(base))
        yield until(node, lambda: len(node.view.instances()) == 1, timeout=20)
        other = RunningServer(a.server, "127.0.0.1", port, a.ca, URL)
        yield register(self, other, "carol")  # a bare SIP client: it will not reconnect
        bob_side: defer.Deferred = defer.Deferred()
        bob = PeerAgent(reactor, AgentConfig(
            ServerConfig("127.0.0.1", port, domain=DOMAIN, ca_path=str(a.ca), tls_hostname="localhost",
                         alternates=(("127.0.0.1", a.port),)),
            Account("bob", USERS["bob"]), reconnect=Backoff(0.5, 2.0)),
            accept_factory=Factory.forProtocol(Recorder), on_peer=bob_side.callback)
        self.addCleanup(bob.stop)
        yield bob.start()
        yield until(node, lambda: node.view.where("bob") is not None and node.view.where("carol") is not None)
        killed = time.monotonic()
        child.transport.signalProcess("KILL")
        yield until(node, lambda: node.view.where("carol") is None, timeout=12)
        self.assertLess(time.monotonic() - killed, 10.0)
        alice = yield register(self, a, "alice")
        asked = time.monotonic()
        _invite, final = alice.invite("carol", offer("alice", 40001))
        response = yield final
        self.assertEqual(response.code, 480)
        self.assertLess(time.monotonic() - asked, 1.0)
        # bob's agent moved to the instance left, and calls reach it there.
        yield until(node, lambda: a.server.registrar.lookup("bob") is not None, timeout=15)
        self.assertLess(time.monotonic() - killed, 15.0)
        caller = PeerAgent(reactor, server=(a.host, a.port), user_id="alice", password=USERS["alice"],
                           domain=DOMAIN, ca_path=str(a.ca), tls_hostname="localhost")
        self.addCleanup(caller.stop)
        yield caller.start()
        connection = yield caller.connect("bob", Factory.forProtocol(Recorder), timeout=20)
        self.addCleanup(connection.protocol.transport.abortConnection)
        connection.protocol.transport.write(b"after the kill\n")
        theirs = yield bob_side.addTimeout(10, reactor)
        self.addCleanup(theirs.protocol.transport.abortConnection)
        yield theirs.protocol.wait_for(b"after the kill\n")


class ConcurrentStartTests(unittest.TestCase):
    """Two processes migrate one empty database at once: the advisory lock makes the second wait."""

    timeout = 60
    if not URL:
        skip = SKIP

    @defer.inlineCallbacks
    def test_two_upgrades_at_once(self):  # type: ignore[no-untyped-def]
        db = Database(URL)
        try:
            with db.engine.begin() as c:
                c.exec_driver_sql("DROP SCHEMA public CASCADE")
                c.exec_driver_sql("CREATE SCHEMA public")
        finally:
            db.close()
        code = ("import sys; from kerjostunt.store import Database; d = Database(sys.argv[1]); "
                "d.upgrade(); print('upgraded'); d.close()")
        children = [spawn(self, f"upgrade{i}", sys.executable, ["-c", code, URL], env=subprocess_env(),
                          path=str(REPO_ROOT)) for i in range(2)]
        yield defer.gatherResults([c.wait_for(b"upgraded") for c in children])
        db = Database(URL)
        self.addCleanup(db.close)
        with db.engine.connect() as c:
            version = c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
        from alembic.script import ScriptDirectory

        from kerjostunt.store.database import MIGRATIONS_DIR
        self.assertEqual(version, [ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()])
