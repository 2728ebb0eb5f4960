"""200 calls at once between 50 registered clients over real TLS: nothing mixes.

Every call k carries markers in both SDPs: the caller offers punch port
10000+k and a passive port 30000+caller; the callee, auto-answering, echoes
the call as punch port 20000+k and offers passive port 50000+callee. Each side
then checks it got exactly its peer's data for exactly that call, and both
report an outcome so the stored attempts can be checked too.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial import unittest

from kerjostunt.wire.sdp import parse_sdp
from kerjostunt.wire.sip.message import Request

from .callsupport import Peer, offer, online
from .support import add_users, start_server

log = Logger()

CLIENTS = 50
CALLS = 200


def pair(k: int) -> tuple[int, int]:
    """Caller and callee of call k: several calls from and to each user, never to oneself."""
    caller = k % CLIENTS
    callee = (caller + 1 + (k * 7 + k // CLIENTS) % (CLIENTS - 1)) % CLIENTS
    return caller, callee


class ConcurrentCallsTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_200_concurrent_calls_between_50_clients(self):  # type: ignore[no-untyped-def]
        running = yield start_server(self)
        users = {f"u{i:02d}": f"pw{i}" for i in range(CLIENTS)}
        add_users(running, users)
        peers: dict[str, Peer] = yield online(self, running, users)
        names = list(users)
        index = {name: i for i, name in enumerate(names)}
        invites_seen: dict[int, Request] = {}   # call k -> the INVITE its callee got
        acks_seen: dict[str, Request] = {}      # server Call-ID -> the ACK the callee got
        problems: list[str] = []

        def auto(peer: Peer, request: Request) -> None:
            if request.method == "INVITE":
                sd = parse_sdp(request.body)
                k = sd.punch_port - 10000  # type: ignore[operator]
                invites_seen[k] = request
                me = index[peer.user]
                peer.answer(request, 200, offer(peer.user, 20000 + k, [50000 + me]), tag=f"{peer.user}k{k}")
            elif request.method == "ACK":
                acks_seen[request.call_id or ""] = request
            elif request.method in ("BYE", "CANCEL"):
                peer.proto.respond(request, 200)
                problems.append(f"{peer.user} got {request.method}")

        for peer in peers.values():
            peer.auto = auto

        started = time.monotonic()
        invites = {}
        finals = []
        for k in range(CALLS):
            caller, callee = pair(k)
            invite, d = peers[names[caller]].invite(names[callee], offer(names[caller], 10000 + k, [30000 + caller]))
            invites[k] = invite
            finals.append(d)
        responses = yield defer.gatherResults(finals)
        answered = time.monotonic()

        self.assertEqual(problems, [])
        self.assertEqual(len(invites_seen), CALLS)
        for k, ok in enumerate(responses):
            caller, callee = pair(k)
            self.assertEqual(ok.code, 200, k)
            # The caller got exactly its callee's answer for exactly this call.
            sd = parse_sdp(ok.body)
            self.assertEqual(sd.user, names[callee])
            self.assertEqual(sd.punch_port, 20000 + k)
            self.assertEqual([c.port for c in sd.of_type("host", "passive")], [50000 + callee])
            self.assertEqual([(c.ip, c.port) for c in sd.of_type("prflx")], [("127.0.0.1", 20000 + k)])
            self.assertEqual(ok.headers.get("X-Kerjo-Role"), "initiator")
            # The callee got exactly this caller's offer, with the same secret.
            forwarded = invites_seen[k]
            fsd = parse_sdp(forwarded.body)
            self.assertEqual(fsd.user, names[caller])
            self.assertEqual([c.port for c in fsd.of_type("host", "passive")], [30000 + caller])
            self.assertEqual(forwarded.headers.get("From").split(">")[0], f"<sips:{names[caller]}@kerjo.test")  # type: ignore[union-attr]
            self.assertEqual(forwarded.headers.get("X-Kerjo-Call-Secret"), ok.headers.get("X-Kerjo-Call-Secret"))
            self.assertEqual(forwarded.headers.get("X-Kerjo-Role"), "responder")
        self.assertEqual(len({ok.headers.get("X-Kerjo-Call-Secret") for ok in responses}), CALLS)
        self.assertEqual(len({f.call_id for f in invites_seen.values()}), CALLS)

        # ACKs (the callees' ACKs come right after the 200s; all have arrived once the INFOs are answered).
        for k, ok in enumerate(responses):
            caller, _ = pair(k)
            peers[names[caller]].ack(invites[k], ok)
        reports = []
        for k in range(CALLS):
            caller, callee = pair(k)
            body = f"outcome=stunt\ntechnique=simultaneous-open\nremote=127.0.0.1:{20000 + k}\nelapsed_ms={k}\n"
            reports.append(peers[names[caller]].report(invites[k].call_id, names[callee], body))
            reports.append(peers[names[callee]].report(invites_seen[k].call_id, names[caller], "outcome=failed\ntechnique=none\n"))
        answers = yield defer.gatherResults(reports)
        finished = time.monotonic()
        self.assertEqual({r.code for r in answers}, {200})
        for k in range(CALLS):
            ack = acks_seen[invites_seen[k].call_id]  # type: ignore[index]
            self.assertEqual(ack.headers.get("To"), f"<sips:{names[pair(k)[1]]}@kerjo.test>;tag={names[pair(k)[1]]}k{k}")
            self.assertIsNotNone(ack.headers.get("X-Kerjo-Dial-In"))

        yield running.server.store._when_idle()
        db = running.database()
        self.addCleanup(db.close)
        attempts = {}
        for name in names:
            for a in db.recent_attempts(name, limit=100):
                attempts[a.call_id] = a
        self.assertEqual(len(attempts), CALLS)
        for k in range(CALLS):
            caller, callee = pair(k)
            a = attempts[invites_seen[k].call_id]  # type: ignore[index]
            self.assertEqual((a.caller, a.callee, a.outcome, a.actual, a.predicted),
                             (names[caller], names[callee], "stunt", f"127.0.0.1:{20000 + k}", f"127.0.0.1:{20000 + k}"))
        # Counted per outcome and technique (kerjostunt_calls_total labels).
        self.assertEqual(running.server.counters["calls_stunt_simultaneous-open"], CALLS)
        self.assertEqual(running.server.counters["internal_errors"], 0)
        log.info("200 calls: {answered:.3f} s to all 200 OK, {finished:.3f} s including ACKs and outcomes",
                 answered=answered - started, finished=finished - started)
