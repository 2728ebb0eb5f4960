"""
"Connect me to user X": bind a punch port, probe from it, INVITE with our
SDP, wait for the 200 OK, ACK, then dial at ``X-Kerjo-Dial-In``.

The call's life is a state machine: ``preparing`` (registration, punch
port, probes) -> ``inviting`` (INVITE sent) -> ``dialing`` -> ``done``.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.base import CallAgent, CallBase, PreparingInputs
from kerjostunt.client.calls.explain import refusal_text
from kerjostunt.client.calls.race import DialResult
from kerjostunt.client.calls.setup import (
    CallSetup,
    ConnectFailed,
    PeerConnection,
    dial_in_seconds,
    outcome_body,
    read_setup,
    reason_of,
    tag_of,
)
from kerjostunt.client.nat.birthday import describe_own
from kerjostunt.client.nat.readyport import PreparedPort
from kerjostunt.client.signaling import QUEUED, Registration, SignalingClientProtocol
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import format_endpoint
from kerjostunt.wire.prediction import AD, APD, SEQUENTIAL
from kerjostunt.wire.sip.message import Request, Response

__all__ = ["OutgoingCall"]

log = Logger()

LOST_SIGNALING = "lost the signaling connection"
#: at most this many seconds of timeout a call gains by ``182 Queued`` (the turns of a crowded NAT)
MAX_QUEUED = 120.0


class _OutgoingInputs(PreparingInputs, Protocol):
    def answered(self, response: Response) -> None:
        "The final response to our INVITE."

    def dial(self, setup: CallSetup, delay: float) -> None:
        "A usable 200 OK: race at the dial moment."

    def connected(self, result: DialResult) -> None:
        "The race won."

    def stop(self, why: str, code: int | None, notify_result: bool) -> None:
        "Abandon the call (timeout, BYE, the agent stopping, the caller cancelling)."

    def signaling_lost(self) -> None:
        "The signaling connection went away."


class OutgoingCall(CallBase):
    """
    "Connect me to user X".

    ``result`` fires with a PeerConnection or fails with ConnectFailed;
    cancelling it abandons the call.
    """

    def __init__(
        self, agent: CallAgent, peer_id: str, app_factory: IProtocolFactory, timeout: float,
        prefer_stunt: bool = False,
    ) -> None:
        super().__init__(agent, peer_id)
        self.app_factory = app_factory
        self.timeout = timeout
        self.prefer_stunt = prefer_stunt
        self.invite: Request | None = None
        #: seconds of timeout added by ``182 Queued`` so far
        self.queued_for = 0.0
        self.sig: SignalingClientProtocol | None = None
        self.to_tag: str | None = None
        self.result: defer.Deferred[PeerConnection] = defer.Deferred(
            lambda d: self.stop("cancelled", notify_result=False))
        self._life: _OutgoingInputs = _OutgoingMachine(self)

    # the outside world -----------------------------------------------------------

    def run(self) -> defer.Deferred[PeerConnection]:
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        self._prepare()
        return self.result

    def stop(self, why: str, code: int | None = None, notify_result: bool = True) -> None:
        """Abandon the call: CANCEL a pending INVITE, stop dialing."""
        self._life.stop(why, code, notify_result)

    def peer_ended(self, request: Request) -> None:
        """The server forwarded a BYE (the callee went away)."""
        self.stop(f"{self.peer_id} ended the call ({request.method})")

    def signaling_lost(self) -> None:
        """The signaling connection is gone: a call not yet dialing cannot go on."""
        self._life.signaling_lost()

    def _timed_out(self) -> None:
        self._timer = None
        self.stop(f"no connection to {self.peer_id} within {self.timeout + self.queued_for:g} s", code=408)

    # outputs -------------------------------------------------------------------------

    def _start(self, sig: SignalingClientProtocol, registration: Registration) -> None:
        self.sig = sig
        self.call_id = secrets.token_hex(12) + "@" + sig.user_id
        self.agent.call_started(self)
        self._take_port(sig, registration)

    def _invite(self) -> None:
        sig = self.sig
        assert sig is not None
        uri = sig.uri_of(self.peer_id)
        self.invite = sig.build_request(
            "INVITE", uri, call_id=self.call_id,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{format_endpoint(sig.local)};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=self.offer(sig).to_bytes(),
        )
        d = sig.send_request(self.invite, timeout=self.timeout + 1.0, on_provisional=self._provisional)
        d.addCallback(self._life.answered).addErrback(self._life.failed)

    def probes_at_turn(self) -> bool:
        """Behind a sequential, address-dependent NAT (as our last probes showed): the server asks
        for the probe at the call's turn there (server/calls/turnprobes.py), so that our probes
        take no port it predicted for another call's punch, and are fresh when it predicts ours."""
        own = describe_own(self.agent.ready_port.latest, self.local_ip)
        return own is not None and own.allocation == SEQUENTIAL and own.mapping in (AD, APD)

    def _provisional(self, response: Response) -> None:
        """``183`` with ``X-Kerjo-Probes``: our turn, probe now; ``182 Queued``: the server holds
        the call for its turn at a NAT, and the timeout counts from now."""
        limit = kerjo.parse_probes(response.headers.get(kerjo.PROBES))
        if response.code == 183 and limit is not None and self.sig is not None:
            log.debug("call {call}: probing at our turn", call=self.call_id)
            self.probe(self.sig, self.registration, limit).addErrback(
                lambda f: log.failure("probing at our turn failed", f))
            return
        if response.code != QUEUED or self._timer is None or not self._timer.active():
            return
        if self.queued_for >= MAX_QUEUED:
            return
        self.queued_for += self.timeout
        self._timer.reset(self.timeout)
        log.debug("call {call}: queued at the server ({why})", call=self.call_id, why=response.reason)

    def _answered(self, response: Response) -> None:
        if response.code != 200:
            self._life.failed(Failure(ConnectFailed(refusal_text(response.code, response.reason), response.code)))
            return
        assert self.sig is not None
        self.to_tag = tag_of(response.headers.get("To"))
        log.debug("call {call}: answered, dialing in {ms:.0f} ms", call=self.call_id,
                  ms=dial_in_seconds(response) * 1000.0)
        self._ack(self.sig)
        try:
            setup = read_setup(response)
        except ValueError as e:
            self._life.failed(Failure(ConnectFailed(f"unusable answer from the server: {e}")))
            return
        self._life.dial(setup, dial_in_seconds(response))

    def _ack(self, sig: SignalingClientProtocol) -> None:
        assert self.invite is not None
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        sig.send_request(sig.build_request(
            "ACK", self.invite.uri, call_id=self.call_id, cseq=cseq, to_tag=self.to_tag,
        ))

    def _dial(self, setup: CallSetup, delay: float) -> None:
        dialer = self.make_dialer(setup, self.app_factory, stunt_only=self.prefer_stunt)
        dialer.start(delay).addCallback(self._life.connected).addErrback(self._life.failed)

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self._report(outcome_body(result.outcome, result.technique, result.remote, elapsed_ms, self._tried()))
        self._end()
        if not self.result.called:
            self.result.callback(PeerConnection(
                self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
            ))

    def _failed(self, failure: Failure, dialing: bool) -> None:
        exc = failure.value
        if not isinstance(exc, ConnectFailed):
            exc = ConnectFailed(reason_of(failure))
        if dialing:
            technique = self.dialer.failed_technique if self.dialer is not None else "none"
            self._report(outcome_body("failed", technique, None, self._elapsed_ms(), self._tried()))
        self._end()
        if not self.result.called:
            self.result.errback(exc)

    def _stopped(self, why: str, code: int | None, notify_result: bool, dialing: bool) -> None:
        if notify_result and not self.result.called:
            self.result.errback(ConnectFailed(why, code))
        if dialing:
            assert self.dialer is not None
            self.dialer.stop(why)  # its failure arrives when the call is over: nothing more to do
            self._failed(Failure(ConnectFailed(why)), dialing=True)
        else:
            self._end()

    def _report(self, body: bytes) -> None:
        self.report(self.sig, body, None, self.sig.uri_of(self.peer_id) if self.sig else "", self.to_tag)

    def _cancel_invite(self) -> None:
        sig = self.sig
        if sig is None or sig.disconnected.called:
            return
        assert self.invite is not None
        cancel = Request("CANCEL", self.invite.uri)
        for name in ("Via", "Max-Forwards", "From", "To", "Call-ID"):
            for value in self.invite.headers.get_all(name) if name == "Via" else [self.invite.headers.get(name)]:
                if value is not None:
                    cancel.headers.add(name, value)
        cseq = self.invite.cseq[0] if self.invite.cseq else 1
        cancel.headers.add("CSeq", f"{cseq} CANCEL")
        assert sig.transport is not None
        sig.transport.write(cancel.to_bytes())


# -- the machine ---------------------------------------------------------------------

_call = TypeMachineBuilder(_OutgoingInputs, OutgoingCall)
_preparing = _call.state("preparing")
_inviting = _call.state("inviting")
_dialing = _call.state("dialing")
_done = _call.state("done")
_I = _OutgoingInputs


@_preparing.upon(_I.registered).loop()
def _registered(inputs: _I, call: OutgoingCall, sig: SignalingClientProtocol, registration: Registration) -> None:
    call._start(sig, registration)


@_preparing.upon(_I.port_taken).loop()
def _port_taken(inputs: _I, call: OutgoingCall, prepared: PreparedPort | None) -> None:
    call._use_port(prepared)


@_done.upon(_I.port_taken).loop()
def _port_too_late(inputs: _I, call: OutgoingCall, prepared: PreparedPort | None) -> None:
    call._drop_port(prepared)


@_preparing.upon(_I.ready).to(_inviting)
def _ready(inputs: _I, call: OutgoingCall) -> None:
    call._invite()


@_inviting.upon(_I.answered).loop()
def _answer(inputs: _I, call: OutgoingCall, response: Response) -> None:
    call._answered(response)


@_inviting.upon(_I.dial).to(_dialing)
def _dial(inputs: _I, call: OutgoingCall, setup: CallSetup, delay: float) -> None:
    call._dial(setup, delay)


@_dialing.upon(_I.connected).to(_done)
def _connected(inputs: _I, call: OutgoingCall, result: DialResult) -> None:
    call._succeeded(result)


@_preparing.upon(_I.failed).to(_done)
@_inviting.upon(_I.failed).to(_done)
def _failed_early(inputs: _I, call: OutgoingCall, failure: Failure) -> None:
    call._failed(failure, dialing=False)


@_dialing.upon(_I.failed).to(_done)
def _failed_dialing(inputs: _I, call: OutgoingCall, failure: Failure) -> None:
    call._failed(failure, dialing=True)


@_preparing.upon(_I.stop).to(_done)
def _stop_preparing(inputs: _I, call: OutgoingCall, why: str, code: int | None, notify_result: bool) -> None:
    call._stopped(why, code, notify_result, dialing=False)


@_inviting.upon(_I.stop).to(_done)
def _stop_inviting(inputs: _I, call: OutgoingCall, why: str, code: int | None, notify_result: bool) -> None:
    call._cancel_invite()
    call._stopped(why, code, notify_result, dialing=False)


@_dialing.upon(_I.stop).to(_done)
def _stop_dialing(inputs: _I, call: OutgoingCall, why: str, code: int | None, notify_result: bool) -> None:
    call._stopped(why, code, notify_result, dialing=True)


@_preparing.upon(_I.signaling_lost).to(_done)
def _lost_preparing(inputs: _I, call: OutgoingCall) -> None:
    call._stopped(LOST_SIGNALING, None, True, dialing=False)


@_inviting.upon(_I.signaling_lost).to(_done)
def _lost_inviting(inputs: _I, call: OutgoingCall) -> None:
    call._cancel_invite()
    call._stopped(LOST_SIGNALING, None, True, dialing=False)


# A step that finishes after the call ended finds nothing to do; a dialing
# call outlives its signaling connection (the outcome report is lost).
_done.upon(_I.registered).loop().returns(None)
_done.upon(_I.ready).loop().returns(None)
_done.upon(_I.answered).loop().returns(None)
_done.upon(_I.dial).loop().returns(None)
_done.upon(_I.connected).loop().returns(None)
_done.upon(_I.failed).loop().returns(None)
_done.upon(_I.stop).loop().returns(None)
_dialing.upon(_I.signaling_lost).loop().returns(None)
_done.upon(_I.signaling_lost).loop().returns(None)
for _state in (_preparing, _inviting, _dialing, _done):
    _state.upon(_I.phase).loop().returns(_state.name)

_OutgoingMachine = _call.build()
