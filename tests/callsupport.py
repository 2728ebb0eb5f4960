"""Test peers for call tests: a registered signaling client that records what the server sends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor

from kerjostunt.client.nat.probing import probe_from
from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire.kerjo import OUTCOME_CONTENT_TYPE as OUTCOME_TYPE
from kerjostunt.wire.sdp import Candidate, SessionDescription, candidate_priority, parse_sdp
from kerjostunt.wire.sip.message import Request, Response

from .support import DOMAIN, RunningServer, connect_client


def offer(user: str, punch_port: int, passive: list[int] = (), ip: str = "127.0.0.1") -> bytes:  # type: ignore[assignment]
    cands = [Candidate("1", 1, "TCP", candidate_priority("host", "so"), ip, punch_port, "host", "so")]
    cands += [Candidate(str(i + 2), 1, "TCP", candidate_priority("host", "passive") - i, ip, port, "host", "passive")
              for i, port in enumerate(passive)]
    return SessionDescription(user, ip, cands, punch_port).to_bytes()


class Peer:
    """One registered user; requests from the server queue up per method."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.proto: SignalingClientProtocol = None  # type: ignore[assignment]
        self.received: list[Request] = []
        self._queues: dict[str, list[Request]] = {}
        self._waiters: dict[str, list[defer.Deferred]] = {}
        #: called for each request from the server (after queueing); e.g. auto-answer
        self.auto: Callable[[Peer, Request], None] | None = None

    def on_request(self, proto: SignalingClientProtocol, request: Request) -> None:
        self.received.append(request)
        if self.auto is not None:
            self.auto(self, request)
        elif request.method in ("BYE", "CANCEL"):
            proto.respond(request, 200)
        waiters = self._waiters.get(request.method)
        if waiters:
            waiters.pop(0).callback(request)
        else:
            self._queues.setdefault(request.method, []).append(request)

    def next(self, method: str) -> defer.Deferred:
        queue = self._queues.get(method)
        if queue:
            return defer.succeed(queue.pop(0))
        d: defer.Deferred = defer.Deferred()
        self._waiters.setdefault(method, []).append(d)
        return d

    def pending(self, method: str) -> list[Request]:
        return list(self._queues.get(method, []))

    @defer.inlineCallbacks
    def probe(self):  # type: ignore[no-untyped-def]
        """Probe every probe port from one fresh local port; fires with (local_port, results)."""
        offer_ = self.proto.registration.probe
        servers = [("127.0.0.1", port) for port in offer_.ports]
        results = yield probe_from(reactor, ("127.0.0.1", 0), servers, username=offer_.token, password=offer_.password)
        return results[0].local_port, results

    def invite(self, callee: str, body: bytes | None, *, content_type: str = "application/sdp",
               timeout: float = 32.0) -> tuple[Request, defer.Deferred]:
        headers = [("Contact", f"<sips:{self.user}@{self.proto.local[0]}:{self.proto.local[1]};transport=tls>")]
        if body is not None:
            headers.append(("Content-Type", content_type))
        request = self.proto.build_request("INVITE", self.proto.uri_of(callee), headers=headers, body=body or b"")
        return request, self.proto.send_request(request, timeout)

    def ack(self, invite: Request, response: Response) -> None:
        to_tag = _tag(response.headers.get("To"))
        cseq = invite.cseq[0]  # type: ignore[index]
        self.proto.send_request(self.proto.build_request(
            "ACK", invite.uri, call_id=invite.call_id, cseq=cseq, to_tag=to_tag))

    def cancel(self, invite: Request) -> None:
        """Written raw with its own branch: RFC 3261 wants the INVITE's branch, but the test UA
        matches responses by branch alone (not branch + CSeq method), so the 200 for the CANCEL
        would end the INVITE's transaction. The server matches a CANCEL by Call-ID."""
        request = Request("CANCEL", invite.uri, invite.headers.copy())
        request.headers.set("Via", invite.headers.get("Via").replace(";branch=", ";branch=z9hG4bKc"))  # type: ignore[union-attr]
        request.headers.set("CSeq", f"{invite.cseq[0]} CANCEL")  # type: ignore[index]
        request.headers.remove("Content-Type")
        request.headers.remove("Contact")
        self.proto.transport.write(request.to_bytes())

    def report(self, call_id: str, peer: str, body: str) -> defer.Deferred:
        return self.proto.request(
            "INFO", f"sips:{DOMAIN}", to=self.proto.uri_of(peer), call_id=call_id,
            headers=[("Content-Type", OUTCOME_TYPE)], body=body.encode())

    def bye(self, call_id: str, peer: str, outcome: str | None = None) -> defer.Deferred:
        """A BYE; with ``outcome``, the side's report rides on it (docs/protocol.rst)."""
        if outcome is None:
            return self.proto.request("BYE", self.proto.uri_of(peer), call_id=call_id)
        return self.proto.request("BYE", self.proto.uri_of(peer), call_id=call_id,
                                  headers=[("Content-Type", OUTCOME_TYPE)], body=outcome.encode())

    def answer(self, invite: Request, code: int = 200, body: bytes | None = None, tag: str | None = None) -> None:
        headers = [("Content-Type", "application/sdp")] if body is not None else []
        self.proto.respond(invite, code, headers=headers, body=body or b"", to_tag=tag or f"t{self.user}")


def _tag(value: str | None) -> str | None:
    if not value or ";tag=" not in value:
        return None
    return value.split(";tag=", 1)[1].split(";")[0]


@defer.inlineCallbacks
def online(case: Any, running: RunningServer, users: dict[str, str]):  # type: ignore[no-untyped-def]
    """Connect and register each user; fires with {user: Peer}."""
    peers: dict[str, Peer] = {}
    for user, password in users.items():
        peer = Peer(user)
        peer.proto = yield connect_client(case, running, user, password, peer.on_request)
        yield peer.proto.register()
        peers[user] = peer
    return peers


def candidates(message: Request | Response) -> list[Candidate]:
    return parse_sdp(message.body).candidates
