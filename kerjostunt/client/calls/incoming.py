"""
"User Y wants us": on the server's INVITE bind a punch port, probe, answer
200 OK with our SDP, and dial when the server's ACK says so.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.base import _CallBase
from kerjostunt.client.calls.race import DialResult
from kerjostunt.client.calls.setup import (
    CallSetup,
    PeerConnection,
    _reason,
    dial_in_seconds,
    outcome_body,
    read_setup,
    tag_of,
    user_of,
)
from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire.kerjo import new_tag
from kerjostunt.wire.sip.message import Request

log = Logger()

ACK_TIMEOUT = 32.0  # RFC 3261 Timer H: how long a callee waits for the server's ACK


class IncomingCall(_CallBase):
    """
    "User Y wants us": answer the server's INVITE and dial when it ACKs.

    States: ``preparing`` (probing) -> ``answered`` (200 sent, waiting for
    the ACK) -> ``dialing`` -> ``done``.
    """

    def __init__(self, agent: Any, sig: SignalingClientProtocol, invite: Request) -> None:
        super().__init__(agent, user_of(invite.headers.get("From")) or "unknown")
        self.sig = sig
        self.invite = invite
        self.call_id = invite.call_id or ""
        self.to_tag = new_tag()
        self.setup: CallSetup | None = None
        self.registration: Any = None

    def handle(self) -> None:
        if self.agent.accept_factory is None:
            self.sig.respond(self.invite, 603, to_tag=self.to_tag)
            self.state = "done"
            return
        try:
            self.setup = read_setup(self.invite)
        except ValueError as e:
            log.warn("call {call}: refusing an INVITE: {why}", call=self.call_id, why=str(e))
            self.sig.respond(self.invite, 400, to_tag=self.to_tag)
            self.state = "done"
            return
        self.agent.call_started(self)
        log.debug("call {call}: INVITE from {peer}", call=self.call_id, peer=self.peer_id)
        self._timer = self.reactor.callLater(ACK_TIMEOUT, self.stop, "no ACK from the server")
        self._prepare().addErrback(self._prepare_failed)

    @defer.inlineCallbacks
    def _prepare(self):  # type: ignore[no-untyped-def]
        sig, self.registration = yield self.agent.fresh_registration()
        if self.state == "done":
            return
        yield self.take_punch_port(sig, self.registration)
        if self.state == "done":
            return
        # The tag lets the peer reach our app port before our dial moment.
        self.make_dialer(self.setup, self.agent.accept_factory, self.registration)  # type: ignore[arg-type]
        self.sig.respond(
            self.invite, 200, to_tag=self.to_tag,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{sig.local[0]}:{sig.local[1]};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=self.offer(sig).to_bytes(),
        )
        self.state = "answered"

    def _prepare_failed(self, failure: Failure) -> None:
        log.warn("call {call}: could not answer: {why}", call=self.call_id, why=_reason(failure))
        if self.state == "preparing" and not self.sig.disconnected.called:
            self.sig.respond(self.invite, 500, to_tag=self.to_tag)
        self._end()

    def ack(self, request: Request) -> None:
        if self.state != "answered" or self.dialer is None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = "dialing"
        log.debug("call {call}: ACK, dialing in {ms:.0f} ms", call=self.call_id, ms=dial_in_seconds(request) * 1000.0)
        self.dialer.start(dial_in_seconds(request)).addCallbacks(self._succeeded, self._dial_failed)

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self.report(self.sig, outcome_body(result.outcome, result.technique, result.remote, elapsed_ms),
                    self.to_tag, self.sig.uri_of(self.peer_id), tag_of(self.invite.headers.get("From")))
        self._end()
        self.agent.peer_accepted(PeerConnection(
            self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
        ))

    def _dial_failed(self, failure: Failure) -> None:
        log.info("call {call} from {peer} failed: {why}", call=self.call_id, peer=self.peer_id, why=_reason(failure))
        elapsed_ms = (self.dialer._elapsed() * 1000.0) if self.dialer else 0.0
        self.report(self.sig, outcome_body("failed", "none", None, elapsed_ms),
                    self.to_tag, self.sig.uri_of(self.peer_id), tag_of(self.invite.headers.get("From")))
        self._end()

    def cancelled(self, request: Request) -> None:
        """CANCEL from the server: 487 to the INVITE if it was not answered yet."""
        if self.state == "preparing" and not self.sig.disconnected.called:
            self.sig.respond(self.invite, 487, to_tag=self.to_tag)
        self.stop(f"{request.method} from the server")

    def peer_ended(self, request: Request) -> None:
        self.stop(f"{request.method} from the server")

    def stop(self, why: str) -> None:
        if self.state == "done":
            return
        dialer, started = self.dialer, self.state == "dialing"
        self._end()
        if dialer is not None and dialer.state != "done":
            if not started:
                dialer.result.addErrback(lambda _: None)  # nobody waits on it yet
            dialer.stop(why)

