"""Calls over real TLS on loopback, and the call machine driven by a Clock.

Integration tests register real clients (tests.support), probe the server's
probe ports for real from a chosen local port, and check what each side is
told; unit tests drive ``CallManager`` with fake connections, a fake store and
``Clock`` so timers are exact.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.calls import (
    CallManager,
    OutcomeError,
    Phase,
    dial_in_ms,
    parse_outcome,
)
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.signaling import SignalingProtocol
from kerjostunt.store.database import UnknownUser
from kerjostunt.wire.prediction import Sample
from kerjostunt.wire.sdp import parse_sdp
from kerjostunt.wire.sip.message import Headers, Request, Response

from .callsupport import OUTCOME_TYPE, offer, online
from .support import DOMAIN, add_users, start_server

USERS = {"alice": "wonderland", "bob": "builder", "carol": "singer"}


def _headers(message: Request | Response) -> dict[str, str]:
    names = ("X-Kerjo-Call-Secret", "X-Kerjo-Role", "X-Kerjo-NAT", "X-Kerjo-Peer-Public", "X-Kerjo-Dial-In")
    return {name: message.headers.get(name) for name in names if message.headers.get(name) is not None}


class CallFlowTests(unittest.TestCase):
    """The full INVITE/100/200/ACK flow and outcome reports, real TLS and real probes."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        self.peers = yield online(self, self.running, {"alice": "wonderland", "bob": "builder"})
        self.server = self.running.server
        self.transcript: list[tuple[str, str, bytes]] = []

    def capture(self) -> None:
        """Every message the server sends or receives, in order, as (direction, user, bytes)."""
        original_send = SignalingProtocol.send
        router = self.server.router
        transcript = self.transcript

        def who(conn: Any) -> str:
            return ",".join(sorted(conn.user_ids)) or "?"

        def send(conn: Any, message: Any) -> None:
            transcript.append(("server -> " + who(conn), "", message.to_bytes()))
            original_send(conn, message)

        def wrap(handler: Any) -> Any:
            def handle(conn: Any, message: Any) -> None:
                transcript.append((who(conn) + " -> server", "", message.to_bytes()))
                handler(conn, message)
            return handle

        self.patch(SignalingProtocol, "send", send)
        self.patch(router, "handle_request", wrap(router.handle_request))
        self.patch(router, "handle_response", wrap(router.handle_response))

    @defer.inlineCallbacks
    def call(self, outcome_a: str | None = None, outcome_b: str | None = None):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        port_a, probes_a = yield alice.probe()
        invite, final = alice.invite("bob", offer("alice", port_a, [7000]))
        forwarded = yield bob.next("INVITE")
        port_b, probes_b = yield bob.probe()
        bob.answer(forwarded, 200, offer("bob", port_b, [7001]))
        ok = yield final
        ack = yield bob.next("ACK")
        alice.ack(invite, ok)
        return {"invite": invite, "forwarded": forwarded, "ok": ok, "ack": ack,
                    "port_a": port_a, "port_b": port_b, "probes_a": probes_a, "probes_b": probes_b}

    @defer.inlineCallbacks
    def test_full_flow_predictions_secret_roles_dial_in(self):  # type: ignore[no-untyped-def]
        self.capture()
        c = yield self.call()
        forwarded, ok, ack = c["forwarded"], c["ok"], c["ack"]
        self.assertEqual(ok.code, 200)
        # What the probes showed: on loopback the mapped port is the local port.
        for results, port in ((c["probes_a"], c["port_a"]), (c["probes_b"], c["port_b"])):
            self.assertEqual({(r.mapped_ip, r.mapped_port) for r in results}, {("127.0.0.1", port)})
        # Bob gets alice's SDP unchanged plus her prediction; alice gets bob's.
        for message, port, passive, user in ((forwarded, c["port_a"], 7000, "alice"), (ok, c["port_b"], 7001, "bob")):
            sd = parse_sdp(message.body)
            self.assertEqual(sd.user, user)
            self.assertTrue(message.body.startswith(offer(user, port, [passive]).split(b"a=x-kerjo")[0]))
            prflx = sd.of_type("prflx")
            self.assertEqual([(p.ip, p.port, p.tcptype, p.rport) for p in prflx], [("127.0.0.1", port, "so", port)])
            srflx = sd.of_type("srflx")
            self.assertEqual([(s.ip, s.port, s.tcptype) for s in srflx], [("127.0.0.1", passive, "passive")])
            self.assertEqual(sd.punch_port, port)
        hf, ho = _headers(forwarded), _headers(ok)
        self.assertEqual(len(hf["X-Kerjo-Call-Secret"]), 64)
        self.assertEqual(hf["X-Kerjo-Call-Secret"], ho["X-Kerjo-Call-Secret"])
        self.assertEqual((hf["X-Kerjo-Role"], ho["X-Kerjo-Role"]), ("responder", "initiator"))
        self.assertEqual((hf["X-Kerjo-Peer-Public"], ho["X-Kerjo-Peer-Public"]), ("127.0.0.1", "127.0.0.1"))
        self.assertIn("confidence=0.95", hf["X-Kerjo-NAT"])
        self.assertIn("allocation=", ho["X-Kerjo-NAT"])
        self.assertNotIn("X-Kerjo-Dial-In", hf)
        dial_a, dial_b = int(ho["X-Kerjo-Dial-In"]), int(ack.headers.get("X-Kerjo-Dial-In"))
        self.assertTrue(30 <= dial_a <= 80 and 30 <= dial_b <= 80, (dial_a, dial_b))
        self.assertEqual(30, min(dial_a, dial_b))  # the slower side starts at once + margin
        # The callee's leg has its own identifiers.
        self.assertNotEqual(forwarded.call_id, c["invite"].call_id)
        self.assertEqual(ack.call_id, forwarded.call_id)
        # Outcome reports: both report stunt, the flags follow. Alice ends her dialog with
        # her outcome on the BYE (one request, not INFO then BYE); bob reports with an INFO.
        r1 = yield self.peers["alice"].bye(c["invite"].call_id, "bob",
                                          f"outcome=stunt\ntechnique=simultaneous-open\nremote=127.0.0.1:{c['port_b']}\nelapsed_ms=183\n"
                                          "tried=public:refused,punch:connected\n")
        r2 = yield self.peers["bob"].report(forwarded.call_id, "alice",
                                           f"outcome=stunt\ntechnique=simultaneous-open\nremote=127.0.0.1:{c['port_a']}\nelapsed_ms=181\n")
        self.assertEqual((r1.code, r2.code), (200, 200))
        # Order on the wire as the server saw it (alice's ACK precedes her BYE on her connection):
        # ten messages, the whole call (bob answered within 0.2 s: no 100 Trying).
        order = [(d, m.split(b"\r\n", 1)[0].decode()) for d, _, m in self.transcript]
        self.assertEqual([line for _, line in order], [
            f"INVITE sips:bob@{DOMAIN} SIP/2.0", f"INVITE sips:bob@{DOMAIN} SIP/2.0",
            "SIP/2.0 200 OK", "SIP/2.0 200 OK", f"ACK sips:bob@{DOMAIN} SIP/2.0", f"ACK sips:bob@{DOMAIN} SIP/2.0",
            f"BYE sips:bob@{DOMAIN} SIP/2.0", "SIP/2.0 200 OK", f"INFO sips:{DOMAIN} SIP/2.0", "SIP/2.0 200 OK",
        ])
        self.assertIn(b"Content-Type: application/x-kerjo-outcome", self.transcript[6][2])
        yield self.server.store._when_idle()
        alice_rec = yield self.server.store.get_user("alice")
        bob_rec = yield self.server.store.get_user("bob")
        self.assertEqual((alice_rec.stunt_state, bob_rec.stunt_state), ("stunt", "stunt"))
        attempts = yield self.server.store.recent_attempts("bob")
        self.assertEqual(len(attempts), 1)
        self.assertEqual((attempts[0].outcome, attempts[0].technique, attempts[0].predicted, attempts[0].actual),
                         ("stunt", "simultaneous-open", f"127.0.0.1:{c['port_b']}", f"127.0.0.1:{c['port_b']}"))
        # Each side's race and prediction, for `kerjostunt attempts` and /status (issue 14).
        detail = attempts[0].detail
        self.assertEqual(detail["caller"]["tried"], [["public", "refused"], ["punch", "connected"]])
        # A success waits a moment for the other side's report (issue 13: both sides' word): both are kept.
        self.assertEqual((detail["caller"]["elapsed_ms"], detail["callee"]["elapsed_ms"]), (183, 181))
        self.assertEqual(detail["callee"]["tried"], [])
        self.assertEqual(detail["callee"]["predicted"][0], c["port_b"])
        self.assertEqual(self.server.counters["calls_stunt_simultaneous-open"], 1)
        if os.environ.get("KERJOSTUNT_WRITE_EXAMPLE"):
            with open(os.environ["KERJOSTUNT_WRITE_EXAMPLE"], "wb") as f:
                for direction, _, raw in self.transcript:
                    f.write(f"=== {direction}\n".encode() + raw + b"\n")

    @defer.inlineCallbacks
    def test_direct_outcome_marks_callee_direct(self):  # type: ignore[no-untyped-def]
        c = yield self.call()
        r = yield self.peers["bob"].report(c["forwarded"].call_id, "alice",
                                          "outcome=direct\ntechnique=public\nremote=127.0.0.1:7000\nelapsed_ms=3\n")
        self.assertEqual(r.code, 200)
        # A callee's success waits for the caller's report (or the outcome timer).
        yield self.server.store._when_idle()
        bob = yield self.server.store.get_user("bob")
        self.assertEqual(bob.stunt_state, "unknown")
        r = yield self.peers["alice"].report(c["invite"].call_id, "bob", "outcome=failed\ntechnique=none\n")
        self.assertEqual(r.code, 200)
        yield self.server.store._when_idle()
        bob = yield self.server.store.get_user("bob")
        self.assertEqual(bob.stunt_state, "direct")
        attempts = yield self.server.store.recent_attempts("bob")
        self.assertEqual([a.outcome for a in attempts], ["direct"])

    @defer.inlineCallbacks
    def test_failed_outcomes_with_one_peer_leave_the_flag(self):  # type: ignore[no-untyped-def]
        """Issue 13: one peer's failures (true or not) decide that pair only (store.records)."""
        c = yield self.call()
        yield self.peers["alice"].report(c["invite"].call_id, "bob", "outcome=failed\ntechnique=none\nelapsed_ms=10000\n")
        yield self.server.store._when_idle()
        self.assertEqual((yield self.server.store.recent_attempts("bob")), [])  # waits for the other side
        yield self.peers["bob"].report(c["forwarded"].call_id, "alice", "outcome=failed\ntechnique=none\n")
        yield self.server.store._when_idle()
        bob = yield self.server.store.get_user("bob")
        self.assertEqual(bob.stunt_state, "unknown")
        pairs = yield self.server.store.pair_outcomes("alice", 0.0)
        self.assertEqual(pairs["bob"].failures, 1)
        self.assertEqual(self.server.counters["calls_failed_none"], 1)

    @defer.inlineCallbacks
    def test_bad_outcome_bodies(self):  # type: ignore[no-untyped-def]
        c = yield self.call()
        alice = self.peers["alice"]
        for body in ("outcome=maybe\ntechnique=none\n", "outcome=stunt\ntechnique=none\n", "x=1\n",
                     "outcome=failed\ntechnique=none\noutcome=failed\n"):
            r = yield alice.report(c["invite"].call_id, "bob", body)
            self.assertEqual(r.code, 400, body)
        r = yield alice.proto.request("INFO", f"sips:{DOMAIN}", call_id=c["invite"].call_id,
                                      headers=[("Content-Type", "text/plain")], body=b"outcome=failed")
        self.assertEqual(r.code, 415)
        r = yield alice.report("no-such-call", "bob", "outcome=failed\ntechnique=none\n")
        self.assertEqual(r.code, 481)


class CallRefusalTests(unittest.TestCase):
    """403/404/480/408/CANCEL/486/400/503 and peers going away, over real TLS."""

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.running = yield start_server(self, call_answer_timeout=0.5, invite_burst=3.0, invite_rate=0.001)
        add_users(self.running, {"alice": "wonderland", "bob": "builder"})
        add_users(self.running, {"carol": "singer", "dave": "diver"}, group="others")
        self.peers = yield online(self, self.running, {"alice": "wonderland", "bob": "builder", "carol": "singer"})

    def final(self, caller: str, callee: str, body: bytes | None = None) -> defer.Deferred:
        invite, d = self.peers[caller].invite(callee, offer(caller, 40001) if body is None else body)
        return d.addCallback(lambda r: (r.code, r.reason))

    @defer.inlineCallbacks
    def test_404_unknown_user(self):  # type: ignore[no-untyped-def]
        self.assertEqual((yield self.final("alice", "nobody"))[0], 404)

    @defer.inlineCallbacks
    def test_403_no_shared_group(self):  # type: ignore[no-untyped-def]
        self.assertEqual((yield self.final("alice", "carol"))[0], 403)
        self.assertEqual(self.peers["carol"].received, [])

    @defer.inlineCallbacks
    def test_403_unregistered_caller(self):  # type: ignore[no-untyped-def]
        yield self.peers["alice"].proto.unregister()
        self.assertEqual((yield self.final("alice", "bob"))[0], 403)
        self.assertEqual(self.peers["bob"].received, [])

    @defer.inlineCallbacks
    def test_480_offline(self):  # type: ignore[no-untyped-def]
        yield self.peers["bob"].proto.unregister()
        self.assertEqual((yield self.final("alice", "bob"))[0], 480)

    @defer.inlineCallbacks
    def test_400_unusable_sdp(self):  # type: ignore[no-untyped-def]
        self.assertEqual((yield self.final("alice", "bob", b"v=0\r\nnonsense\r\n"))[0], 400)
        self.assertEqual((yield self.final("alice", "bob", offer("alice", 40001).replace(b"tcptype so", b"tcptype passive")))[0], 400)
        self.assertEqual(self.peers["bob"].received, [])

    @defer.inlineCallbacks
    def test_503_invite_flood(self):  # type: ignore[no-untyped-def]
        codes = yield defer.gatherResults([self.final("alice", "nobody") for _ in range(5)])
        self.assertEqual(sorted(c for c, _ in codes), [404, 404, 404, 503, 503])
        self.assertEqual(self.running.server.counters["invites_rate_limited"], 2)

    @defer.inlineCallbacks
    def test_408_when_callee_never_answers(self):  # type: ignore[no-untyped-def]
        code = self.final("alice", "bob")
        forwarded = yield self.peers["bob"].next("INVITE")
        self.assertEqual((yield code)[0], 408)
        cancel = yield self.peers["bob"].next("CANCEL")
        self.assertEqual(cancel.call_id, forwarded.call_id)
        self.assertEqual(cancel.headers.get("Via"), forwarded.headers.get("Via"))

    @defer.inlineCallbacks
    def test_cancel(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        invite, final = alice.invite("bob", offer("alice", 40001))
        yield bob.next("INVITE")
        alice.cancel(invite)  # shares the INVITE's branch: the test UA cannot wait for both answers
        self.assertEqual((yield final).code, 487)
        cancel = yield bob.next("CANCEL")
        self.assertEqual(cancel.headers.get("CSeq"), "1 CANCEL")

    @defer.inlineCallbacks
    def test_callee_busy_passes_through(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        _, final = alice.invite("bob", offer("alice", 40001))
        forwarded = yield bob.next("INVITE")
        bob.answer(forwarded, 486)
        response = yield final
        self.assertEqual((response.code, response.reason), (486, "Busy Here"))

    @defer.inlineCallbacks
    def test_callee_disconnects_while_ringing(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        _, final = alice.invite("bob", offer("alice", 40001))
        yield bob.next("INVITE")
        bob.proto.transport.loseConnection()
        self.assertEqual((yield final).code, 480)

    @defer.inlineCallbacks
    def test_caller_disconnects_while_ringing(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        _, final = alice.invite("bob", offer("alice", 40001))
        final.addErrback(lambda f: None)
        forwarded = yield bob.next("INVITE")
        alice.proto.transport.loseConnection()
        cancel = yield bob.next("CANCEL")
        self.assertEqual(cancel.call_id, forwarded.call_id)

    @defer.inlineCallbacks
    def test_caller_disconnects_after_answer(self):  # type: ignore[no-untyped-def]
        alice, bob = self.peers["alice"], self.peers["bob"]
        invite, final = alice.invite("bob", offer("alice", 40001))
        forwarded = yield bob.next("INVITE")
        bob.answer(forwarded, 200, offer("bob", 40002))
        yield final
        yield bob.next("ACK")
        alice.proto.transport.loseConnection()
        bye = yield bob.next("BYE")
        self.assertEqual(bye.call_id, forwarded.call_id)


# -- unit tests: fake connections and store, Clock ------------------------------------


class FakeConn:
    def __init__(self, user: str, ip: str = "198.51.100.1", port: int = 5000, rtt: float | None = None) -> None:
        self.peer = (ip, port)
        self.user_ids = {user}
        self.rtt = rtt
        self.sent: list[Request | Response] = []

    def send(self, message: Request | Response) -> None:
        message.to_bytes()  # must serialize
        self.sent.append(message)

    def close(self) -> None:
        pass

    def bound(self, user_id: str) -> None:
        self.user_ids.add(user_id)

    def unbound(self, user_id: str) -> None:
        self.user_ids.discard(user_id)

    def last(self) -> Request | Response:
        return self.sent[-1]


class FakeStore:
    def __init__(self) -> None:
        self.users = {"alice", "bob", "carol"}
        self.fail = False
        self.attempts: list[dict[str, Any]] = []

    def get_user(self, user_id: str) -> defer.Deferred:
        if self.fail:
            return defer.fail(RuntimeError("database down"))
        if user_id not in self.users:
            return defer.fail(UnknownUser(user_id))
        return defer.succeed(object())

    def share_group(self, a: str, b: str) -> defer.Deferred:
        return defer.succeed("carol" not in (a, b))

    def call_check(self, caller: str, callee: str) -> defer.Deferred:
        if self.fail:
            return defer.fail(RuntimeError("database down"))
        if callee not in self.users:
            return defer.succeed("unknown")
        return self.share_group(caller, callee).addCallback(lambda ok: "ok" if ok else "no-group")

    def record_attempt(self, **attempt: Any) -> defer.Deferred:
        self.attempts.append(attempt)
        return defer.succeed({})


class FakeObservations:
    def __init__(self) -> None:
        self.by_user: dict[str, list[Sample]] = {}

    def samples(self, user_id: str) -> list[Sample]:
        return self.by_user.get(user_id, [])

    def behind(self, public_ip: str) -> list[Sample]:
        seen = [s for samples in self.by_user.values() for s in samples if s.mapped_ip == public_ip]
        return sorted(seen, key=lambda s: s.time)

    def last_probe_behind(self, public_ip: str, excluding: Collection[str]) -> float | None:
        times = [s.time for user, samples in self.by_user.items() if user not in excluding
                 for s in samples if s.mapped_ip == public_ip]
        return max(times) if times else None


def invite_request(caller: str, callee: str, call_id: str = "c1", punch: int = 40001, body: bytes | None = None) -> Request:
    h = Headers()
    h.add("Via", "SIP/2.0/TLS 10.0.0.5:1;branch=z9hG4bKx" + call_id)
    h.add("From", f"<sips:{caller}@{DOMAIN}>;tag=ft")
    h.add("To", f"<sips:{callee}@{DOMAIN}>")
    h.add("Call-ID", call_id)
    h.add("CSeq", "1 INVITE")
    h.add("Content-Type", "application/sdp")
    return Request("INVITE", f"sips:{callee}@{DOMAIN}", h, offer(caller, punch, [7000], ip="10.0.0.5") if body is None else body)


def request_in(call_id: str, method: str, caller: str, callee: str, body: bytes = b"", content_type: str | None = None) -> Request:
    h = Headers()
    h.add("Via", "SIP/2.0/TLS 10.0.0.5:1;branch=z9hG4bKq" + method)
    h.add("From", f"<sips:{caller}@{DOMAIN}>;tag=ft")
    h.add("To", f"<sips:{callee}@{DOMAIN}>;tag=tt")
    h.add("Call-ID", call_id)
    h.add("CSeq", f"2 {method}")
    if content_type:
        h.add("Content-Type", content_type)
    return Request(method, f"sips:{DOMAIN}", h, body)


def answer(forwarded: Request, code: int = 200, punch: int = 50001, body: bytes | None = None) -> Response:
    from kerjostunt.wire.sip.message import make_response
    r = make_response(forwarded, code, to_tag="bt")
    if code == 200:
        r.headers.add("Content-Type", "application/sdp")
        r.body = offer("bob", punch, [7001], ip="192.168.1.9") if body is None else body
    return r


class CallManagerUnitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registrar = Registrar(self.clock)
        self.store = FakeStore()
        self.observations = FakeObservations()
        self.counts: dict[str, int] = {}
        self.manager = CallManager(self.clock, DOMAIN, self.registrar, self.store, self.observations,
                                   lambda w: self.counts.__setitem__(w, self.counts.get(w, 0) + 1))
        self.alice = FakeConn("alice", "203.0.113.7", 4000, rtt=0.020)
        self.bob = FakeConn("bob", "198.51.100.9", 5000, rtt=0.200)
        self.registrar.bind("alice", self.alice, "<sips:alice@x>", 3600)
        self.registrar.bind("bob", self.bob, "<sips:bob@x>", 3600)

    def ring(self, call_id: str = "c1") -> Request:
        before = len(self.alice.sent)
        self.manager.handle_request(self.alice, invite_request("alice", "bob", call_id))
        self.assertEqual(len(self.alice.sent), before)  # the 100 Trying waits 0.2 s for an answer
        forwarded = self.bob.last()
        self.assertEqual(forwarded.method, "INVITE")  # type: ignore[union-attr]
        return forwarded  # type: ignore[return-value]

    def connect(self, call_id: str = "c1") -> tuple[Request, Response, Request]:
        forwarded = self.ring(call_id)
        self.manager.handle_response(self.bob, answer(forwarded))
        ok, ack = self.alice.last(), self.bob.last()
        return forwarded, ok, ack  # type: ignore[return-value]

    def test_trying_only_when_the_answer_is_slow(self) -> None:
        self.ring("slow")
        self.clock.advance(0.19)
        self.assertEqual(self.alice.sent, [])
        self.clock.advance(0.01)
        self.assertEqual([m.code for m in self.alice.sent], [100])  # type: ignore[union-attr]
        forwarded = self.bob.last()
        self.manager.handle_response(self.bob, answer(forwarded))
        self.assertEqual([m.code for m in self.alice.sent], [100, 200])  # type: ignore[union-attr]

    def test_no_trying_after_a_quick_answer_or_refusal(self) -> None:
        self.connect("quick")
        self.manager.handle_request(self.alice, invite_request("alice", "nobody", "refused"))
        self.clock.advance(5)
        self.assertEqual([m.code for m in self.alice.sent], [200, 404])  # type: ignore[union-attr]
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func.__name__ == "_send_trying"], [])

    def test_answer_timer(self) -> None:
        forwarded = self.ring()
        self.clock.advance(14.9)
        self.assertEqual(self.bob.last(), forwarded)
        self.clock.advance(0.2)
        self.assertEqual(self.alice.last().code, 408)  # type: ignore[union-attr]
        cancel = self.bob.last()
        self.assertEqual((cancel.method, cancel.call_id), ("CANCEL", forwarded.call_id))  # type: ignore[union-attr]
        # A 200 that crossed the CANCEL gets ACK and BYE.
        self.manager.handle_response(self.bob, answer(forwarded))
        self.assertEqual([m.method for m in self.bob.sent[-2:]], ["ACK", "BYE"])  # type: ignore[union-attr]
        self.clock.advance(32)
        self.assertEqual(self.manager.calls(), [])
        self.assertEqual(self.clock.getDelayedCalls(), self.registrar_timers())

    def registrar_timers(self) -> list[Any]:
        return [b.timer for b in self.registrar]

    def test_dial_in_from_rtts(self) -> None:
        _, ok, ack = self.connect()
        self.assertEqual((ok.headers.get("X-Kerjo-Dial-In"), ack.headers.get("X-Kerjo-Dial-In")), ("120", "30"))
        self.assertEqual(dial_in_ms(None, None), (30, 30))
        self.assertEqual(dial_in_ms(0.3, None), (30, 130))

    def test_prediction_fallback_and_from_samples(self) -> None:
        # No samples for the punch port: the signaling address, low confidence.
        forwarded = self.ring()
        prflx = parse_sdp(forwarded.body).of_type("prflx")
        self.assertEqual([(p.ip, p.port) for p in prflx], [("203.0.113.7", 40001)])
        self.assertIn("confidence=0.10", forwarded.headers.get("X-Kerjo-NAT"))
        # A sequential NAT seen by the probes of bob's punch port: a window.
        self.observations.by_user["bob"] = [
            Sample(50001 - 10 + i, "198.51.100.9", 61000 + 2 * i, "192.0.2.1", 3478 + (i % 2), 10.0 + i)
            for i in range(10)
        ] + [Sample(50001, "198.51.100.9", 61020, "192.0.2.1", 3478, 21.0),
             Sample(50001, "198.51.100.9", 61022, "192.0.2.1", 3479, 22.0)]
        self.manager.handle_response(self.bob, answer(forwarded))
        ok = self.alice.last()
        ports = [p.port for p in parse_sdp(ok.body).of_type("prflx")]
        # An address-dependent sequential NAT: a lane's window of 8 (issue 12, calls/lanes.py).
        self.assertEqual(ports, [61024 + 2 * k for k in range(8)])
        self.assertEqual([c.foundation for c in parse_sdp(ok.body).of_type("prflx")], [f"p{i}" for i in range(1, 9)])
        srflx = parse_sdp(ok.body).of_type("srflx")
        # bob's LAN address is not alice's: its host candidates and their raddr are not passed on.
        self.assertEqual([(s.ip, s.port, s.raddr) for s in srflx], [("198.51.100.9", 7001, None)])
        self.assertEqual(parse_sdp(ok.body).of_type("host"), [])

    def test_outcome_timeout_records_failed_30s_after_dial(self) -> None:
        forwarded, ok, _ = self.connect()
        dial = int(ok.headers.get("X-Kerjo-Dial-In")) / 1000  # type: ignore[arg-type]
        self.clock.advance(30 + dial - 0.01)
        self.assertEqual(self.store.attempts, [])
        self.clock.advance(0.02)
        self.assertEqual(len(self.store.attempts), 1)
        a = self.store.attempts[0]
        self.assertEqual((a["outcome"], a["technique"], a["predicted"], a["actual"], a["call_id"]),
                         ("failed", "none", "198.51.100.9:50001", None, forwarded.call_id))
        self.assertEqual(self.counts["calls_failed_none"], 1)

    def test_one_success_records_once(self) -> None:
        forwarded, _, _ = self.connect()
        self.manager.handle_request(self.bob, request_in(forwarded.call_id, "INFO", "bob", "alice",  # type: ignore[arg-type]
                                                         b"outcome=direct\ntechnique=accepted\nremote=203.0.113.7:40001\n", OUTCOME_TYPE))
        self.assertEqual(self.bob.last().code, 200)  # type: ignore[union-attr]
        self.manager.handle_request(self.alice, request_in("c1", "INFO", "alice", "bob",
                                                           b"outcome=stunt\ntechnique=low-ttl\nremote=198.51.100.9:50001\n", OUTCOME_TYPE))
        self.assertEqual(self.alice.last().code, 200)  # type: ignore[union-attr]
        self.clock.advance(100)
        self.assertEqual(len(self.store.attempts), 1)
        a = self.store.attempts[0]
        # Both succeeded: the caller's report counts (its elapsed time is the
        # call's); it names bob's endpoint, compared with bob's prediction.
        self.assertEqual((a["outcome"], a["technique"], a["predicted"], a["actual"]),
                         ("stunt", "low-ttl", "198.51.100.9:50001", "198.51.100.9:50001"))

    def test_lone_callee_success_recorded_by_the_outcome_timer(self) -> None:
        forwarded, _, _ = self.connect()
        self.manager.handle_request(self.bob, request_in(forwarded.call_id, "INFO", "bob", "alice",  # type: ignore[arg-type]
                                                         b"outcome=direct\ntechnique=lan\nremote=203.0.113.7:40001\nelapsed_ms=0\n", OUTCOME_TYPE))
        self.assertEqual(self.store.attempts, [])
        self.clock.advance(100)
        self.assertEqual([(a["outcome"], a["technique"]) for a in self.store.attempts], [("direct", "lan")])

    def test_bye_forwarded_while_dialing(self) -> None:
        forwarded, _, _ = self.connect()
        self.manager.handle_request(self.alice, request_in("c1", "BYE", "alice", "bob"))
        self.assertEqual(self.alice.last().code, 200)  # type: ignore[union-attr]
        bye = self.bob.last()
        self.assertEqual((bye.method, bye.call_id, bye.headers.get("To")), ("BYE", forwarded.call_id, f"<sips:bob@{DOMAIN}>;tag=bt"))  # type: ignore[union-attr]
        n = len(self.bob.sent)
        self.manager.handle_request(self.bob, request_in(forwarded.call_id, "BYE", "bob", "alice"))  # type: ignore[arg-type]
        self.assertEqual(self.bob.last().code, 200)  # type: ignore[union-attr]
        self.assertEqual(len(self.bob.sent), n + 1)
        self.assertEqual(self.alice.last().code, 200)  # no BYE back to alice: she said goodbye

    def test_store_failure_is_503_with_retry_after(self) -> None:
        self.store.fail = True
        self.manager.handle_request(self.alice, invite_request("alice", "bob"))
        last = self.alice.last()
        self.assertEqual((last.code, last.headers.get("Retry-After")), (503, "5"))  # type: ignore[union-attr]
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_same_call_id_from_two_callers_never_mix(self) -> None:
        carol = FakeConn("carol", "192.0.2.50", 6000)
        self.registrar.bind("carol", carol, "<sips:carol@x>", 3600)
        self.store.share_group = lambda a, b: defer.succeed(True)  # type: ignore[method-assign]
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "same"))
        self.manager.handle_request(carol, invite_request("carol", "bob", "same", punch=41000))
        f1, f2 = [m for m in self.bob.sent if getattr(m, "method", None) == "INVITE"]
        self.assertNotEqual(f1.call_id, f2.call_id)
        self.assertNotEqual(f1.headers.get("X-Kerjo-Call-Secret"), f2.headers.get("X-Kerjo-Call-Secret"))
        self.manager.handle_response(self.bob, answer(f2, 486))
        self.assertEqual(carol.last().code, 486)  # type: ignore[union-attr]
        self.assertEqual(self.alice.sent, [])
        self.manager.handle_response(self.bob, answer(f1))
        self.assertEqual(self.alice.last().code, 200)  # type: ignore[union-attr]
        self.assertEqual(self.alice.last().headers.get("X-Kerjo-Call-Secret"), f1.headers.get("X-Kerjo-Call-Secret"))  # type: ignore[union-attr]

    def test_unknown_and_odd_requests(self) -> None:
        self.manager.handle_request(self.alice, request_in("nope", "BYE", "alice", "bob"))
        self.assertEqual(self.alice.last().code, 481)  # type: ignore[union-attr]
        n = len(self.alice.sent)
        self.manager.handle_request(self.alice, request_in("nope", "ACK", "alice", "bob"))
        self.assertEqual(len(self.alice.sent), n)
        self.manager.handle_request(self.alice, invite_request("alice", "alice"))
        self.assertEqual(self.alice.last().code, 482)  # type: ignore[union-attr]
        self.manager.handle_request(self.alice, invite_request("alice", "bob", body=b"\xff" * 10))
        self.assertEqual(self.alice.last().code, 400)  # type: ignore[union-attr]
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "c9"))
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "c9"))
        self.assertEqual(self.alice.last().code, 482)  # type: ignore[union-attr]
        # A response the server never asked for is absorbed.
        self.manager.handle_response(self.bob, Response(200, "OK", Headers([("Call-ID", "x"), ("CSeq", "1 BYE")])))

    def test_callee_lost_after_answer_sends_bye_to_caller(self) -> None:
        self.connect()
        self.registrar.connection_lost(self.bob)  # type: ignore[arg-type]
        self.manager.connection_lost(self.bob)  # type: ignore[arg-type]
        bye = self.alice.last()
        self.assertEqual((bye.method, bye.call_id, bye.headers.get("From")), ("BYE", "c1", f"<sips:bob@{DOMAIN}>;tag={bye.headers.get('From').split('tag=')[1]}"))  # type: ignore[union-attr]
        self.clock.advance(60)
        self.assertEqual(len(self.store.attempts), 1)

    def test_stop_records_calls_in_progress(self) -> None:
        self.connect()
        self.ring("c2")
        self.manager.stop()
        self.assertEqual(len(self.store.attempts), 1)
        self.assertEqual(self.manager.calls(), [])
        self.assertEqual(self.bob.last().method, "CANCEL")  # type: ignore[union-attr]
        self.assertEqual(self.clock.getDelayedCalls(), self.registrar_timers())

    def succeed(self, call_id: str, callee_reports: bool = True) -> Request:
        """Connect ``call_id`` and have both sides report success: recorded, now lingering."""
        forwarded, _, _ = self.connect(call_id)
        self.manager.handle_request(self.alice, request_in(call_id, "INFO", "alice", "bob",
                                                           b"outcome=stunt\ntechnique=low-ttl\nremote=198.51.100.9:50001\n",
                                                           OUTCOME_TYPE))
        if callee_reports:
            self.manager.handle_request(self.bob, request_in(
                forwarded.call_id or "", "INFO", "bob", "alice",
                b"outcome=stunt\ntechnique=low-ttl\nremote=203.0.113.7:40001\n", OUTCOME_TYPE))
        return forwarded

    def test_a_callers_success_waits_briefly_for_the_callees_word(self) -> None:
        """Issue 13: only bob's own report may move bob's flag, so it is worth a moment's wait."""
        self.succeed("c1", callee_reports=False)
        self.assertEqual(self.store.attempts, [])
        self.clock.advance(2.0)
        self.assertEqual([(a["outcome"], a["witnesses"]) for a in self.store.attempts], [("stunt", ("alice",))])
        self.succeed("c2")
        self.assertEqual(self.store.attempts[-1]["witnesses"], ("alice", "bob"))

    def test_a_lone_failure_report_is_only_its_senders(self) -> None:
        forwarded, ok, _ = self.connect("c1")
        self.manager.handle_request(self.alice, request_in("c1", "INFO", "alice", "bob",
                                                           b"outcome=failed\ntechnique=none\n", OUTCOME_TYPE))
        self.clock.advance(40)
        self.assertEqual([(a["outcome"], a["witnesses"]) for a in self.store.attempts], [("failed", ("alice",))])

    def test_lingering_calls_share_one_timer_and_are_forgotten_in_order(self) -> None:
        self.succeed("c1")
        self.clock.advance(10)
        forwarded2 = self.succeed("c2")
        self.assertEqual(len(self.store.attempts), 2)
        # One timer for both lingering calls, not one each.
        self.assertEqual(len(self.clock.getDelayedCalls()), len(self.registrar_timers()) + 1)
        self.clock.advance(32 - 10 - 0.01)
        self.assertEqual(len(self.manager.calls()), 2)
        self.clock.advance(0.02)
        self.assertEqual([c.caller_call_id for c in self.manager.calls()], ["c2"])
        # Still there: a late INFO or BYE on the second call is answered 200, not 481.
        self.manager.handle_request(self.bob, request_in(forwarded2.call_id, "BYE", "bob", "alice"))  # type: ignore[arg-type]
        self.assertEqual(self.bob.last().code, 200)  # type: ignore[union-attr]
        self.clock.advance(10)
        self.assertEqual(self.manager.calls(), [])
        self.assertEqual(self.clock.getDelayedCalls(), self.registrar_timers())
        self.manager.handle_request(self.bob, request_in(forwarded2.call_id, "BYE", "bob", "alice"))  # type: ignore[arg-type]
        self.assertEqual(self.bob.last().code, 481)  # type: ignore[union-attr]

    def test_lingering_call_keeps_no_messages(self) -> None:
        """What lingers is walked by every full garbage collection: identifiers only."""
        self.succeed("c1")
        [call] = self.manager.calls()
        self.assertIs(call.machine.phase(), Phase.RECORDED)
        self.assertEqual((call.invite, call.forwarded, call.caller_sdp, call.callee_sdp), (None, None, None, None))
        self.assertEqual((call.caller_prediction, call.callee_prediction, call.reports), (None, None, {}))

    def test_phase_is_the_machines(self) -> None:
        """The call table routes by the machine's state; there is no other record of it."""
        self.store.call_check = lambda a, b: defer.Deferred()  # type: ignore[method-assign]
        self.manager.handle_request(self.alice, invite_request("alice", "bob", "c1"))
        [call] = self.manager.calls()
        self.assertIs(call.machine.phase(), Phase.CHECKING)
        self.store.call_check = FakeStore().call_check  # type: ignore[method-assign]
        forwarded = self.ring("c2")
        [ringing] = [c for c in self.manager.calls() if c.caller_call_id == "c2"]
        self.assertIs(ringing.machine.phase(), Phase.RINGING)
        self.manager.handle_response(self.bob, answer(forwarded))
        self.assertIs(ringing.machine.phase(), Phase.REPORTING)
        self.manager.handle_request(self.alice, request_in("c1", "CANCEL", "alice", "bob"))
        self.assertIs(call.machine.phase(), Phase.ENDED)
        self.clock.advance(31)  # no outcome reported: recorded as failed
        self.assertEqual((call.machine.phase(), ringing.machine.phase()), (Phase.ENDED, Phase.RECORDED))
        self.clock.advance(33)
        self.assertEqual((call.machine.phase(), ringing.machine.phase()), (Phase.CLOSED, Phase.CLOSED))
        self.assertEqual(self.manager.calls(), [])

    def test_late_answer_after_cancel_still_gets_ack_and_bye(self) -> None:
        """The ended call sheds its INVITE; a 200 that crossed the CANCEL is still ACKed and BYEd in its dialog."""
        forwarded = self.ring()
        self.manager.handle_request(self.alice, request_in("c1", "CANCEL", "alice", "bob"))
        self.assertEqual(self.alice.last().code, 487)  # type: ignore[union-attr]
        self.manager.handle_response(self.bob, answer(forwarded))
        ack, bye = self.bob.sent[-2:]
        self.assertEqual([(m.method, m.call_id, m.headers.get("To")) for m in (ack, bye)],  # type: ignore[union-attr]
                         [(k, forwarded.call_id, f"<sips:bob@{DOMAIN}>;tag=bt") for k in ("ACK", "BYE")])

    def test_stop_cancels_the_linger_timer(self) -> None:
        self.succeed("c1")
        self.manager.stop()
        self.assertEqual(self.manager.calls(), [])
        self.assertEqual(self.clock.getDelayedCalls(), self.registrar_timers())


class OutcomeParserTests(unittest.SynchronousTestCase):
    def test_good(self) -> None:
        o = parse_outcome(b"outcome=stunt\r\ntechnique=simultaneous-open\r\nremote=[2001:db8::1]:40007\r\nelapsed_ms=183\r\n")
        self.assertEqual((o.outcome, o.remote, o.elapsed_ms), ("stunt", ("2001:db8::1", 40007), 183))

    def test_bad(self) -> None:
        for body in (b"", b"outcome=failed", b"outcome=failed\ntechnique=none\nremote=1.2.3.4:5\n",
                     b"outcome=direct\ntechnique=lan\nremote=1.2.3.4:0\n", b"outcome=direct\ntechnique=lan\nremote=host:5\n",
                     b"outcome=failed\ntechnique=none\nelapsed_ms=-1\n", b"outcome = failed\n", b"\xff",
                     b"outcome=failed\ntechnique=none\n" + b"\n" * 2000):
            with self.subTest(body=body[:40]):
                self.assertRaises(OutcomeError, parse_outcome, body)
