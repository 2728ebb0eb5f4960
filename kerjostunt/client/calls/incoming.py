"""
"User Y wants us": on the server's INVITE bind a punch port, probe, answer
200 OK with our SDP, and dial when the server's ACK says so.

The call's life is a state machine: ``preparing`` (probing) -> ``answered``
(200 sent, waiting for the ACK) -> ``dialing`` -> ``done``.  An INVITE
refused at once (no accept factory, an unusable SDP) goes straight to
``done`` without ever being a running call.
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.base import CallAgent, CallBase, PreparingInputs, local_ip_of
from kerjostunt.client.calls.race import DialResult
from kerjostunt.client.calls.setup import (
    CallSetup,
    PeerConnection,
    dial_in_seconds,
    outcome_body,
    read_setup,
    reason_of,
    relay_candidate,
    relay_plan,
    tag_of,
    user_of,
)
from kerjostunt.client.nat import relay
from kerjostunt.client.nat.readyport import PreparedPort
from kerjostunt.client.nat.turn import Allocation, TurnError
from kerjostunt.client.signaling import Registration, SignalingClientProtocol
from kerjostunt.wire.kerjo import format_endpoint, new_tag
from kerjostunt.wire.sip.message import Request

__all__ = ["ACK_TIMEOUT", "IncomingCall"]

log = Logger()

ACK_TIMEOUT = 32.0  # RFC 3261 Timer H: how long a callee waits for the server's ACK
#: seconds the 200 OK may wait for our relay allocation (the server gives the callee 15 s in all)
RELAY_ANSWER_WAIT = 4.0


class _IncomingInputs(PreparingInputs, Protocol):
    def refuse(self) -> None:
        "The INVITE was answered with an error at once."

    def ack(self, request: Request) -> None:
        "The server's ACK, with the dial moment."

    def connected(self, result: DialResult) -> None:
        "The race won."

    def dial_failed(self, failure: Failure) -> None:
        "The race lost (or was stopped)."

    def cancelled(self, request: Request) -> None:
        "CANCEL from the server."

    def stop(self, why: str) -> None:
        "Abandon the call (BYE, no ACK in time, the agent stopping)."

    def signaling_lost(self) -> None:
        "The signaling connection went away."


class IncomingCall(CallBase):
    """"User Y wants us": answer the server's INVITE and dial when it ACKs."""

    def __init__(self, agent: CallAgent, sig: SignalingClientProtocol, invite: Request) -> None:
        super().__init__(agent, user_of(invite.headers.get("From")) or "unknown")
        self.sig = sig
        self.invite = invite
        self.call_id = invite.call_id or ""
        self.to_tag = new_tag()
        self.setup: CallSetup | None = None
        #: the relay allocation: in progress, granted, or why not (None: no relay offered)
        self._relay: defer.Deferred[Allocation] | Allocation | str | None = None
        self._life: _IncomingInputs = _IncomingMachine(self)

    # the outside world -----------------------------------------------------------

    def handle(self) -> None:
        if self.agent.accept_factory is None:
            self.sig.respond(self.invite, 603, to_tag=self.to_tag)
            self._life.refuse()
            return
        try:
            self.setup = read_setup(self.invite)
        except ValueError as e:
            log.warn("call {call}: refusing an INVITE: {why}", call=self.call_id, why=str(e))
            self.sig.respond(self.invite, 400, to_tag=self.to_tag)
            self._life.refuse()
            return
        self.agent.call_started(self)
        log.debug("call {call}: INVITE from {peer}", call=self.call_id, peer=self.peer_id)
        self._timer = self.reactor.callLater(ACK_TIMEOUT, self.stop, "no ACK from the server")
        self._allocate_relay()
        self._prepare()

    def ack(self, request: Request) -> None:
        self._life.ack(request)

    def cancelled(self, request: Request) -> None:
        """CANCEL from the server: 487 to the INVITE if it was not answered yet."""
        self._life.cancelled(request)

    def peer_ended(self, request: Request) -> None:
        self.stop(f"{request.method} from the server")

    def stop(self, why: str) -> None:
        self._life.stop(why)

    def signaling_lost(self) -> None:
        """The signaling connection is gone: a call not yet dialing cannot go on."""
        self._life.signaling_lost()

    def probe_limit(self) -> int | None:
        """As many as the server asks for (``X-Kerjo-Probes``): one behind a NAT it knows."""
        return self.setup.probe_limit if self.setup is not None else None

    # outputs -------------------------------------------------------------------------

    def _allocate_relay(self) -> None:
        """With ``X-Kerjo-Relay``: a TCP allocation, in parallel with probing (nat/relay.py)."""
        offer = self.setup.relay if self.setup is not None else None
        if offer is None or self.setup is None:
            return
        plan = relay_plan(offer, local_ip_of(self.sig))
        peers = [self.setup.peer_public] if self.setup.peer_public else []
        d = defer.Deferred.fromCoroutine(relay.offer_side(self.reactor, plan, peers))
        d.addTimeout(RELAY_ANSWER_WAIT, self.reactor)
        self._relay = d

    def _answer(self) -> None:
        """The 200 OK, once our relay allocation (if any) has its answer."""
        pending = self._relay
        if isinstance(pending, defer.Deferred):
            pending.addBoth(self._relay_ready)
            return
        self._send_answer()

    def _relay_ready(self, result: Allocation | Failure) -> None:
        self._relay = result if isinstance(result, Allocation) else None
        if isinstance(result, Failure):
            value = result.value
            why = value.reason if isinstance(value, (relay.RelayFailed, TurnError)) else (
                "no allocation in time" if result.check(defer.TimeoutError) else reason_of(result))
            log.info("call {call}: no relay: {why}", call=self.call_id, why=why)
            self._relay = why
        if self.phase() != "answered":  # stopped meanwhile
            if isinstance(result, Allocation):
                result.close()
            return
        self._send_answer()

    def _send_answer(self) -> None:
        sig = self.registered_sig
        assert sig is not None and self.setup is not None and self.agent.accept_factory is not None
        # The tag lets the peer reach our app port before our dial moment.
        dialer = self.make_dialer(self.setup, self.agent.accept_factory)
        offer = self.offer(sig)
        if isinstance(self._relay, Allocation):
            dialer.accept_relay(self._relay)
            offer = offer.with_candidates([relay_candidate(self._relay.relayed, self._relay.mapped)])
        elif isinstance(self._relay, str):
            dialer.relay_unavailable(self._relay)
        self.sig.respond(
            self.invite, 200, to_tag=self.to_tag,
            headers=[
                ("Contact", f"<sips:{sig.user_id}@{format_endpoint(sig.local)};transport=tls>"),
                ("Content-Type", "application/sdp"),
            ],
            body=offer.to_bytes(),
        )

    def release(self) -> None:
        """The call is over: an allocation no race took (or still being made) is given up."""
        pending = self._relay
        if isinstance(pending, defer.Deferred):
            self._relay = None
            pending.addErrback(lambda _: None)
            pending.cancel()
        elif isinstance(pending, Allocation) and self.dialer is None:
            pending.close()
        super().release()

    def _prepare_failed(self, failure: Failure, answer: bool) -> None:
        log.warn("call {call}: could not answer: {why}", call=self.call_id, why=reason_of(failure))
        if answer and not self.sig.disconnected.called:
            self.sig.respond(self.invite, 500, to_tag=self.to_tag)

    def _dial(self, request: Request) -> None:
        assert self.dialer is not None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        log.debug("call {call}: ACK, dialing in {ms:.0f} ms", call=self.call_id, ms=dial_in_seconds(request) * 1000.0)
        self.dialer.start(dial_in_seconds(request)).addCallbacks(self._life.connected, self._life.dial_failed)

    def _succeeded(self, result: DialResult) -> None:
        elapsed_ms = result.elapsed * 1000.0
        self._report(outcome_body(result.outcome, result.technique, result.remote, elapsed_ms, self._tried()))
        self._end()
        self.agent.peer_accepted(PeerConnection(
            self.peer_id, result.protocol, result.technique, result.outcome, result.remote, elapsed_ms,
        ))

    def _dial_failed(self, failure: Failure) -> None:
        log.info("call {call} from {peer} failed: {why}", call=self.call_id, peer=self.peer_id, why=reason_of(failure))
        technique = self.dialer.failed_technique if self.dialer is not None else "none"
        self._report(outcome_body("failed", technique, None, self._elapsed_ms(), self._tried()))

    def _report(self, body: bytes) -> None:
        self.report(self.sig, body, self.to_tag, self.sig.uri_of(self.peer_id), tag_of(self.invite.headers.get("From")))

    def _refuse_unanswered(self) -> None:
        if not self.sig.disconnected.called:
            self.sig.respond(self.invite, 487, to_tag=self.to_tag)

    def _stopped(self, why: str, dialing: bool) -> None:
        dialer = self.dialer
        self._end()
        if dialer is not None and not dialer.finished:
            if not dialing:
                dialer.result.addErrback(lambda _: None)  # nobody waits on it yet
            dialer.stop(why)


# -- the machine ---------------------------------------------------------------------

_call = TypeMachineBuilder(_IncomingInputs, IncomingCall)
_preparing = _call.state("preparing")
_answered = _call.state("answered")
_dialing = _call.state("dialing")
_done = _call.state("done")
_I = _IncomingInputs
_LOST = "lost the signaling connection"

_preparing.upon(_I.refuse).to(_done).returns(None)


@_preparing.upon(_I.registered).loop()
def _registered(inputs: _I, call: IncomingCall, sig: SignalingClientProtocol, registration: Registration) -> None:
    call._take_port(sig, registration)


@_preparing.upon(_I.port_taken).loop()
def _port_taken(inputs: _I, call: IncomingCall, prepared: PreparedPort | None) -> None:
    call._use_port(prepared)


@_done.upon(_I.port_taken).loop()
def _port_too_late(inputs: _I, call: IncomingCall, prepared: PreparedPort | None) -> None:
    call._drop_port(prepared)


@_preparing.upon(_I.ready).to(_answered)
def _ready(inputs: _I, call: IncomingCall) -> None:
    call._answer()


@_preparing.upon(_I.failed).to(_done)
def _failed_preparing(inputs: _I, call: IncomingCall, failure: Failure) -> None:
    call._prepare_failed(failure, answer=True)
    call._end()


@_answered.upon(_I.failed).to(_done)
def _failed_answered(inputs: _I, call: IncomingCall, failure: Failure) -> None:
    call._prepare_failed(failure, answer=False)
    call._end()


@_dialing.upon(_I.failed).loop()
@_done.upon(_I.failed).loop()
def _failed_late(inputs: _I, call: IncomingCall, failure: Failure) -> None:
    call._prepare_failed(failure, answer=False)


@_answered.upon(_I.ack).to(_dialing)
def _ack(inputs: _I, call: IncomingCall, request: Request) -> None:
    call._dial(request)


@_dialing.upon(_I.connected).to(_done)
def _connected(inputs: _I, call: IncomingCall, result: DialResult) -> None:
    call._succeeded(result)


@_dialing.upon(_I.dial_failed).to(_done)
def _dial_failed(inputs: _I, call: IncomingCall, failure: Failure) -> None:
    call._dial_failed(failure)
    call._end()


@_done.upon(_I.dial_failed).loop()
def _dial_stopped(inputs: _I, call: IncomingCall, failure: Failure) -> None:
    call._dial_failed(failure)  # the call was stopped while dialing: still report it


@_preparing.upon(_I.cancelled).to(_done)
def _cancel_preparing(inputs: _I, call: IncomingCall, request: Request) -> None:
    call._refuse_unanswered()
    call._stopped(f"{request.method} from the server", dialing=False)


@_answered.upon(_I.cancelled).to(_done)
def _cancel_answered(inputs: _I, call: IncomingCall, request: Request) -> None:
    call._stopped(f"{request.method} from the server", dialing=False)


@_dialing.upon(_I.cancelled).to(_done)
def _cancel_dialing(inputs: _I, call: IncomingCall, request: Request) -> None:
    call._stopped(f"{request.method} from the server", dialing=True)


@_preparing.upon(_I.stop).to(_done)
@_answered.upon(_I.stop).to(_done)
def _stop_waiting(inputs: _I, call: IncomingCall, why: str) -> None:
    call._stopped(why, dialing=False)


@_dialing.upon(_I.stop).to(_done)
def _stop_dialing(inputs: _I, call: IncomingCall, why: str) -> None:
    call._stopped(why, dialing=True)


@_preparing.upon(_I.signaling_lost).to(_done)
@_answered.upon(_I.signaling_lost).to(_done)
def _lost(inputs: _I, call: IncomingCall) -> None:
    call._stopped(_LOST, dialing=False)


# An ACK before our answer (or after the end), a step that finishes after the
# call ended: nothing to do.  A dialing call outlives its signaling connection.
for _state in (_preparing, _dialing, _done):
    _state.upon(_I.ack).loop().returns(None)
_done.upon(_I.registered).loop().returns(None)
_done.upon(_I.ready).loop().returns(None)
_done.upon(_I.connected).loop().returns(None)
_done.upon(_I.cancelled).loop().returns(None)
_done.upon(_I.stop).loop().returns(None)
_dialing.upon(_I.signaling_lost).loop().returns(None)
_done.upon(_I.signaling_lost).loop().returns(None)
for _state in (_preparing, _answered, _dialing, _done):
    _state.upon(_I.phase).loop().returns(_state.name)

_IncomingMachine = _call.build()
