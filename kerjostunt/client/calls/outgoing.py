"""
"Connect me to user X": bind a punch port, probe from it, INVITE with our
SDP, wait for the 200 OK, ACK, then dial at ``X-Kerjo-Dial-In``.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.base import _CallBase
from kerjostunt.client.calls.race import DialResult
from kerjostunt.client.calls.setup import (
    ConnectFailed,
    PeerConnection,
    _reason,
    dial_in_seconds,
    outcome_body,
    read_setup,
    tag_of,
)
from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire.sip.message import Request, Response

log = Logger()


class OutgoingCall(_CallBase):
    """
    "Connect me to user X".

    States: ``preparing`` (registration, punch port, probes) -> ``inviting``
    (INVITE sent) -> ``dialing`` -> ``done``.  ``result`` fires with a
    PeerConnection or fails with ConnectFailed.
    """

    def __init__(
        self, agent: Any, peer_id: str, app_factory: IProtocolFactory, timeout: float, prefer_stunt: bool = False
    ) -> None:
        super().__init__(agent, peer_id)
        self.app_factory = app_factory
        self.timeout = timeout
        self.prefer_stunt = prefer_stunt
        self.invite: Request | None = None
        self.sig: SignalingClientProtocol | None = None
        self.to_tag: str | None = None
        self.result: defer.Deferred = defer.Deferred(lambda d: self.stop("cancelled", notify_result=False))

    def run(self) -> defer.Deferred:
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        d = self._go()
        d.addErrback(self._failed)
        return self.result

    @defer.inlineCallbacks
    def _go(self):  # type: ignore[no-untyped-def]
        sig, registration = yield self.agent.fresh_registration()
        if self.state == "done":
            return
        self.sig = sig
        self.call_id = secrets.token_hex(12) + "@" + sig.user_id
        self.agent.call_started(self)
        yield self.take_punch_port(sig, registration)
        if self.state == "done":
            return
        uri = sig.uri_of(self.peer_id)
        self.invite = sig.build_request(
            "INVITE", uri, call_id=self.call_id,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{sig.local[0]}:{sig.local[1]};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=self.offer(sig).to_bytes(),
        )
        self.state = "inviting"
        response = yield sig.send_request(self.invite, timeout=self.timeout + 1.0)
        if self.state == "done":
            return
        if response.code != 200:
            raise ConnectFailed(f"{response.code} {response.reason}", response.code)
        self.to_tag = tag_of(response.headers.get("To"))
        log.debug("call {call}: answered, dialing in {ms:.0f} ms", call=self.call_id,
                  ms=dial_in_seconds(response) * 1000.0)
        self._ack(sig, response)
        try:
            setup = read_setup(response)
        except ValueError as e:
            raise ConnectFailed(f"unusable answer from the server: {e}") from None
        self.state = "dialing"
        dialer = self.make_dialer(setup, self.app_factory, registration)
        result = yield dialer.start(dial_in_seconds(response))
        self._succeeded(result)

    def _ack(self, sig: SignalingClientProtocol, response: Response) -> None:
        assert self.invite is not None
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        sig.send_request(sig.build_request(
            "ACK", self.invite.uri, call_id=self.call_id, cseq=cseq, to_tag=self.to_tag,
        ))

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self.report(self.sig, outcome_body(result.outcome, result.technique, result.remote, elapsed_ms),
                    None, self.sig.uri_of(self.peer_id) if self.sig else "", self.to_tag)
        self._end()
        if not self.result.called:
            self.result.callback(PeerConnection(
                self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
            ))

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) and self.state == "done":
            return
        exc = failure.value
        if not isinstance(exc, ConnectFailed):
            exc = ConnectFailed(_reason(failure))
        if self.state == "dialing" and self.sig is not None:
            elapsed_ms = (self.dialer._elapsed() * 1000.0) if self.dialer else 0.0
            self.report(self.sig, outcome_body("failed", "none", None, elapsed_ms), None,
                        self.sig.uri_of(self.peer_id), self.to_tag)
        self._end()
        if not self.result.called:
            self.result.errback(exc)

    def _timed_out(self) -> None:
        self._timer = None
        self.stop(f"no connection to {self.peer_id} within {self.timeout:g} s", code=408)

    def stop(self, why: str, code: int | None = None, notify_result: bool = True) -> None:
        """Abandon the call: CANCEL a pending INVITE, stop dialing."""
        if self.state == "done":
            return
        if self.state == "inviting" and self.sig is not None and not self.sig.disconnected.called:
            self._cancel_invite(self.sig)
        if notify_result and not self.result.called:
            self.result.errback(ConnectFailed(why, code))
        if self.dialer is not None and self.dialer.state != "done":
            self.dialer.stop(why)  # fails _go, which reports the failure
        self._end()

    def peer_ended(self, request: Request) -> None:
        """The server forwarded a BYE (the callee went away)."""
        self.stop(f"{self.peer_id} ended the call ({request.method})")

    def _cancel_invite(self, sig: SignalingClientProtocol) -> None:
        assert self.invite is not None
        cancel = Request("CANCEL", self.invite.uri)
        for name in ("Via", "Max-Forwards", "From", "To", "Call-ID"):
            for value in self.invite.headers.get_all(name) if name == "Via" else [self.invite.headers.get(name)]:
                if value is not None:
                    cancel.headers.add(name, value)
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        cancel.headers.add("CSeq", f"{cseq} CANCEL")
        sig.transport.write(cancel.to_bytes())

