"""One call's life at the server: the ``Call`` and its Automat machine.

``CallInputs`` lists what can happen to a call; the transitions below say,
state by state, which steps of docs/protocol.rst each input takes. The
steps themselves are methods of ``Call`` (the machine's core), which holds
what the call knows and sends what ``messages`` builds. Only the machine
knows the call's state; ``Call.machine.phase()`` tells it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.logger import Logger

from kerjostunt.machines import indexed
from kerjostunt.server.calls import messages
from kerjostunt.server.calls.detail import attempt_detail
from kerjostunt.server.calls.dialing import augmented, dial_in_ms, format_endpoint, local_addresses, scope_between
from kerjostunt.server.calls.messages import peer_headers, tag_of
from kerjostunt.server.calls.seams import Attempt, CallSettings, Clock, Timer
from kerjostunt.server.registrar import SignalingConnection
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import Outcome, RelayOffer, Role, new_branch, new_tag
from kerjostunt.wire.prediction import Prediction
from kerjostunt.wire.sdp import SessionDescription
from kerjostunt.wire.sip.message import REASONS, Request, Response, make_response

log = Logger(namespace="kerjostunt.server.calls")

CALLER, CALLEE = "caller", "callee"


class Phase(StrEnum):
    """The states of the call machine, as ``CallInputs.phase`` names them."""

    CHECKING = "checking"
    RINGING = "ringing"
    REPORTING = "reporting"
    RECORDED = "recorded"
    ENDED = "ended"
    CLOSED = "closed"


class CallInputs(Protocol):
    """Everything that can happen to a call; the call table feeds these."""

    def checked(self, callee_conn: SignalingConnection) -> None:
        "The store says yes and the callee is online."

    def refused(self, code: int, reason: str | None, retry_after: int | None = None) -> None:
        "The call cannot go ahead: answer the caller with this."

    def answered(self, response: Response, sdp: SessionDescription) -> None:
        "The callee's 200 OK with a usable SDP."

    def rejected(self, response: Response) -> None:
        "The callee's error response."

    def bad_answer(self, response: Response) -> None:
        "A 200 OK whose SDP is unusable."

    def answer_timed_out(self) -> None:
        "No final response from the callee in time."

    def cancel(self) -> None:
        "The caller gave up (CANCEL, or BYE before the answer)."

    def caller_lost(self) -> None:
        "The caller's signaling connection went away."

    def callee_lost(self) -> None:
        "The callee's signaling connection went away."

    def bye(self, side: str) -> None:
        "A BYE from one side once the call is answered."

    def report(self, side: str, outcome: Outcome) -> None:
        "One side's outcome INFO."

    def decided(self) -> None:
        "The caller reported success, or both sides reported: record now."

    def outcome_timed_out(self) -> None:
        "Nobody decided the outcome in time."

    def late_answer(self, response: Response) -> None:
        "A 200 OK after the call ended (it crossed our CANCEL)."

    def forget(self) -> None:
        "Linger time over, or the server stops."

    def phase(self) -> Phase:
        "Which state the call is in (the call table's routing asks)."
        ...


class CallHost(Protocol):
    """What a call needs from its call table (``CallManager``)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def settings(self) -> CallSettings: ...

    def count(self, what: str) -> None: ...

    def leg_added(self, call: Call, conn: SignalingConnection) -> None: ...

    def prediction_for(self, user_id: str, sdp: SessionDescription, conn: SignalingConnection) -> Prediction: ...

    def record(self, call: Call) -> None: ...

    def dial_scheduled(self, call: Call, dial_caller_ms: int, dial_callee_ms: int) -> int: ...

    def linger_from_now(self, call: Call) -> None: ...

    def remove(self, call: Call) -> None: ...

    def answer_timed_out(self, call: Call) -> None: ...


class Call:
    """One call: what the server knows about it, and every step of protocol.rst as a method.

    The step methods are the machine's outputs: only the transitions below call them.
    """

    def __init__(self, host: CallHost, domain: str, caller_conn: SignalingConnection, invite: Request,
                 caller_id: str, callee_id: str, caller_sdp: SessionDescription) -> None:
        self.host = host
        self.caller_conn = caller_conn
        self.callee_conn: SignalingConnection | None = None
        self.invite = invite
        self.caller_id, self.callee_id = caller_id, callee_id
        self.caller_sdp = caller_sdp
        self.callee_sdp: SessionDescription | None = None
        # Our side of both dialogs, fresh (in this order: tests fix the random source).
        self.domain = domain
        self.caller_call_id = invite.call_id or ""
        self.caller_from = invite.headers.get("From")
        self.to_tag = new_tag()                      # ours, in the caller's dialog
        self.server_call_id = f"{secrets.token_hex(12)}@{domain}"
        self.server_tag = new_tag()                  # ours, in the callee's dialog
        self.invite_branch = new_branch()
        self.callee_tag: str | None = None
        self.forwarded: Request | None = None
        self.secret = secrets.token_hex(32)
        self.caller_prediction: Prediction | None = None
        self.callee_prediction: Prediction | None = None
        self.reports: dict[str, Outcome] = {}
        # sides that have had their BYE (a tuple: the collector stops walking it)
        self.byes_sent: tuple[str, ...] = ()
        self._cseq = {CALLER: 0, CALLEE: 1}
        self._trying_timer: Timer | None = None
        self._answer_timer: Timer | None = None
        self._outcome_timer: Timer | None = None
        #: side -> the sequential NAT (public address) whose turn the call takes (lanes.py)
        self.lanes: dict[str, str] = {}
        #: how many probe endpoints the callee probes (None: all; natview.probes_needed)
        self.callee_probes: int | None = None
        #: side -> the TURN relay and credential that side is handed (manager.py, server/relay.py)
        self.relay: dict[str, RelayOffer] = {}
        self.machine: CallInputs = CallMachine(self)

    def _own_addresses(self) -> frozenset[str]:
        """The server's addresses no candidate may name: configured, and as both legs reach it."""
        return self.host.settings.server_addresses | local_addresses(*self.legs())

    def legs(self) -> list[SignalingConnection]:
        return [c for c in (self.caller_conn, self.callee_conn) if c is not None]

    # -- the caller's answers --------------------------------------------------------

    def trying_later(self) -> None:
        """``100 Trying`` if no other answer is sent within ``trying_delay`` (RFC 3261 17.2.1):
        over TLS nothing retransmits the INVITE, and most calls are answered sooner."""
        self._trying_timer = self.host.clock.callLater(self.host.settings.trying_delay, self._send_trying)

    def _send_trying(self) -> None:
        self._trying_timer = None
        self.caller_conn.send(make_response(self.invite, 100))

    def answer(self, response: Response) -> None:
        """Any response to the caller's INVITE: the ``100 Trying`` is no longer needed."""
        self._trying_timer = _cancelled(self._trying_timer)
        self.caller_conn.send(response)

    # -- checking -> ringing -----------------------------------------------------------

    def forward(self, callee_conn: SignalingConnection) -> None:
        """The INVITE to the callee, with the caller's SDP augmented by its prediction."""
        self.callee_conn = callee_conn
        self.host.leg_added(self, callee_conn)
        self.caller_prediction = self.host.prediction_for(self.caller_id, self.caller_sdp, self.caller_conn)
        peer = peer_headers(self.secret, Role.RESPONDER, self.caller_prediction, self.caller_conn.peer[0])
        peer += self._relay_header(CALLEE)
        if self.callee_probes is not None:
            peer.append((kerjo.PROBES, str(self.callee_probes)))
        scope = scope_between(self.caller_conn.peer[0], callee_conn.peer[0], self._own_addresses())
        body = augmented(self.caller_sdp, self.caller_prediction, self.caller_conn.peer[0], scope).to_bytes()
        self.forwarded = messages.forwarded_invite(self, peer, body)
        callee_conn.send(self.forwarded)
        self._answer_timer = self.host.clock.callLater(self.host.settings.answer_timeout, self._answer_timeout)

    def _relay_header(self, side: str) -> list[tuple[str, str]]:
        offer = self.relay.get(side)
        return [(kerjo.RELAY, offer.value())] if offer is not None else []

    def refuse(self, code: int, reason: str | None, retry_after: int | None = None) -> None:
        self.answer(messages.answer(self, self.invite, code, reason, retry_after))
        self.host.count(f"calls_refused_{code}")
        log.info("Call {caller} -> {callee} refused: {code} {reason}", caller=self.caller_id,
                 callee=self.callee_id, code=code, reason=reason or REASONS.get(code, ""))

    # -- ringing -> reporting --------------------------------------------------------

    def connect(self, response: Response, sdp: SessionDescription) -> None:
        """The moment of the call: 200 to the caller and ACK to the callee, back to back."""
        assert self.callee_conn is not None
        self.callee_sdp = sdp
        self.callee_tag = tag_of(response.headers.get("To"))
        self.callee_prediction = self.host.prediction_for(self.callee_id, sdp, self.callee_conn)
        dial_caller, dial_callee = dial_in_ms(self.caller_conn.rtt, self.callee_conn.rtt)
        later = self.host.dial_scheduled(self, dial_caller, dial_callee)  # after earlier calls via a NAT
        dial_caller, dial_callee = dial_caller + later, dial_callee + later
        peer = peer_headers(self.secret, Role.INITIATOR, self.callee_prediction, self.callee_conn.peer[0])
        peer += self._relay_header(CALLER)
        scope = scope_between(self.callee_conn.peer[0], self.caller_conn.peer[0], self._own_addresses())
        body = augmented(sdp, self.callee_prediction, self.callee_conn.peer[0], scope).to_bytes()
        ok = messages.ok(self, self.invite, peer, dial_caller, body)
        ack = messages.to_callee(self, "ACK", 1, self.callee_tag, dial_in=dial_callee)
        self.answer(ok)
        self.callee_conn.send(ack)
        # The outcome is due outcome_timeout after the later of the two dial moments.
        due = max(dial_caller, dial_callee) / 1000.0 + self.host.settings.outcome_timeout
        self._outcome_timer = self.host.clock.callLater(due, self.machine.outcome_timed_out)
        self.host.count("calls_answered")
        log.debug("Call {caller} -> {callee} answered; dial in {a}/{b} ms", caller=self.caller_id,
                  callee=self.callee_id, a=dial_caller, b=dial_callee)

    # -- ringing -> ended ------------------------------------------------------------

    def pass_rejection(self, response: Response) -> None:
        self.answer(messages.passed_rejection(self, self.invite, response))
        self.host.count(f"calls_rejected_{response.code}")
        log.info("Call {caller} -> {callee} rejected by {callee}: {code} {reason}", caller=self.caller_id,
                 callee=self.callee_id, code=response.code, reason=response.reason)

    def refuse_bad_answer(self, response: Response) -> None:
        self.callee_tag = tag_of(response.headers.get("To"))
        self.answer(messages.answer(self, self.invite, 502, "Bad Gateway: unusable answer"))
        self._send_callee(messages.to_callee(self, "ACK", 1, self.callee_tag))
        self.bye_to(CALLEE)

    def time_out(self) -> None:
        self.answer(messages.answer(self, self.invite, 408))
        self.cancel_callee()
        self.host.count("calls_timed-out_408")
        log.info("Call {caller} -> {callee}: 408, {callee} did not answer within {timeout:.0f} s",
                 caller=self.caller_id, callee=self.callee_id, timeout=self.host.settings.answer_timeout)

    def terminated(self) -> None:
        self.answer(messages.answer(self, self.invite, 487))
        self.host.count("calls_cancelled_487")

    def cancel_callee(self) -> None:
        if self.forwarded is not None:
            self._send_callee(messages.cancel(self, self.forwarded))

    def unavailable(self) -> None:
        self.answer(messages.answer(self, self.invite, 480, "Temporarily Unavailable: callee went away"))

    def ack_and_bye(self, response: Response) -> None:
        """A 200 that crossed our CANCEL: the callee's dialog exists now, so end it."""
        self.callee_tag = tag_of(response.headers.get("To"))
        self._send_callee(messages.to_callee(self, "ACK", 1, self.callee_tag))
        self.bye_to(CALLEE)

    # -- reporting -------------------------------------------------------------------

    def connected(self) -> bool:
        """Has either side reported a connection? Then the peers talk and BYEs are theirs."""
        return any(r.success for r in self.reports.values())

    def bye_other(self, side: str) -> None:
        if not self.connected():
            self.bye_to(CALLEE if side == CALLER else CALLER)
        self._bye_sent(side)  # that side said goodbye itself

    def note_report(self, side: str, outcome: Outcome) -> bool:
        """Keep the side's first report; True when the reports so far decide the call.

        Both reports decide. A caller's success (its elapsed time is the
        call's time to connect; a callee reached before its own dial moment
        reports ~0) waits ``report_grace`` more for the callee's own word:
        only its own report moves the callee's flag (issue 13), and it comes
        within milliseconds of the caller's. The outcome timer records a lone
        report.
        """
        self.reports.setdefault(side, outcome)
        caller = self.reports.get(CALLER)
        if len(self.reports) == 2:
            return True
        if side == CALLER and caller is not None and caller.success:
            self._stop_outcome_timer()
            self._outcome_timer = self.host.clock.callLater(self.host.settings.report_grace,
                                                            self.machine.outcome_timed_out)
        return False

    def record(self) -> None:
        self._stop_outcome_timer()
        self.host.record(self)

    def attempt(self) -> Attempt:
        """What goes to store.record_attempt, from the reports so far."""
        success = next(((side, r) for side in (CALLER, CALLEE)
                        if (r := self.reports.get(side)) is not None and r.success), None)
        if success is not None:
            side, rep = success
            # The caller's report names the callee's endpoint, and vice versa.
            dialed = self.callee_prediction if side == CALLER else self.caller_prediction
            outcome, technique, actual, elapsed = rep.outcome, rep.technique, rep.remote, rep.elapsed_ms
        else:
            dialed = self.callee_prediction
            # A relayed attempt that failed too is recorded as the relay's (its reason is the client's).
            relayed = any(r.technique == "relay" for r in self.reports.values())
            outcome, technique, actual = "failed", "relay" if relayed else "none", None
            elapsed = max((r.elapsed_ms for r in self.reports.values() if r.elapsed_ms is not None), default=None)
        predicted = dialed.endpoints()[0] if dialed is not None and dialed.ports else None
        detail = attempt_detail(self.reports, {CALLER: self.caller_prediction, CALLEE: self.callee_prediction})
        # Whose own report says what the row says: one side's claim moves only its own flag.
        users = {CALLER: self.caller_id, CALLEE: self.callee_id}
        witnesses = tuple(users[side] for side, r in self.reports.items() if r.success == (success is not None))
        return {"call_id": self.server_call_id, "caller": self.caller_id, "callee": self.callee_id,
                "technique": technique, "outcome": outcome, "predicted": format_endpoint(predicted),
                "actual": format_endpoint(actual), "duration_ms": elapsed, "witnesses": witnesses,
                "detail": detail}

    # -- the end ---------------------------------------------------------------------

    def finish(self) -> None:
        """Ended or recorded: stop the timers, shed what is no longer needed, linger."""
        self._trying_timer = _cancelled(self._trying_timer)
        self.stop_answer_timer()
        self._stop_outcome_timer()
        self._shed()
        self.host.linger_from_now(self)

    def remove(self) -> None:
        for timer in (self._trying_timer, self._answer_timer, self._outcome_timer):
            _cancelled(timer)
        self.host.remove(self)

    def _shed(self) -> None:
        """Drop what only a call in progress needs, keeping what absorbing strays needs.

        An ended call stays in the call table for ``linger`` seconds (32),
        so at 200 calls/s about 6,400 of them are alive, and every full
        garbage collection walks what they hold: with the messages, SDPs,
        predictions and reports still attached, 27 tracked objects and about
        20 microseconds of each full collection per call (bench/callpath.py),
        130 ms pauses at 6,400 calls, the INVITE-to-200 tail. From here on
        only identifiers, tags, connections and the machine are read (a late
        200 gets ACK and BYE; INFO, BYE and CANCEL get answers).
        """
        self.invite = self.forwarded = None  # type: ignore[assignment]
        self.caller_sdp = self.callee_sdp = None  # type: ignore[assignment]
        self.caller_prediction = self.callee_prediction = None
        self.reports = {}

    # -- helpers ---------------------------------------------------------------------

    def bye_to(self, side: str) -> None:
        """One BYE per side at most, in that side's dialog."""
        if side in self.byes_sent:
            return
        self._bye_sent(side)
        self._cseq[side] += 1
        if side == CALLEE:
            self._send_callee(messages.to_callee(self, "BYE", self._cseq[CALLEE], self.callee_tag))
        else:
            self.caller_conn.send(messages.to_caller(self, "BYE", self._cseq[CALLER]))

    def _bye_sent(self, side: str) -> None:
        if side not in self.byes_sent:
            self.byes_sent += (side,)

    def _send_callee(self, request: Request) -> None:
        if self.callee_conn is not None:
            self.callee_conn.send(request)

    def stop_answer_timer(self) -> None:
        self._answer_timer = _cancelled(self._answer_timer)

    def _answer_timeout(self) -> None:
        self._answer_timer = None
        self.host.answer_timed_out(self)

    def _stop_outcome_timer(self) -> None:
        self._outcome_timer = _cancelled(self._outcome_timer)


def _cancelled(timer: Timer | None) -> Timer | None:
    """Cancel ``timer`` if it is still due; what the attribute that held it holds now (None)."""
    if timer is not None and timer.active():
        timer.cancel()
    return None


# -- the machine: state by state, what each input does ------------------------------------

_builder = TypeMachineBuilder(CallInputs, Call)
checking = _builder.state(Phase.CHECKING)
ringing = _builder.state(Phase.RINGING)
reporting = _builder.state(Phase.REPORTING)
recorded = _builder.state(Phase.RECORDED)
ended = _builder.state(Phase.ENDED)
closed = _builder.state(Phase.CLOSED)

for _state, _phase in ((checking, Phase.CHECKING), (ringing, Phase.RINGING), (reporting, Phase.REPORTING),
                       (recorded, Phase.RECORDED), (ended, Phase.ENDED), (closed, Phase.CLOSED)):
    _state.upon(CallInputs.phase).loop().returns(_phase)


# checking: the store is working ("100 due in 0.2 s; waiting for the store: target exists, shared group")

@checking.upon(CallInputs.checked).to(ringing)
def _forward(inputs: CallInputs, call: Call, callee_conn: SignalingConnection) -> None:
    call.forward(callee_conn)


@checking.upon(CallInputs.refused).to(ended)
def _refuse(inputs: CallInputs, call: Call, code: int, reason: str | None, retry_after: int | None = None) -> None:
    call.refuse(code, reason, retry_after)
    call.finish()


@checking.upon(CallInputs.cancel).to(ended)
def _cancelled_checking(inputs: CallInputs, call: Call) -> None:
    call.terminated()
    call.finish()


@checking.upon(CallInputs.caller_lost).to(ended)
def _caller_lost_checking(inputs: CallInputs, call: Call) -> None:
    call.finish()


checking.upon(CallInputs.callee_lost).loop().returns(None)


@checking.upon(CallInputs.forget).to(closed)
def _forget_checking(inputs: CallInputs, call: Call) -> None:
    call.remove()


# ringing: INVITE forwarded; the callee decides

@ringing.upon(CallInputs.answered).to(reporting)
def _connect(inputs: CallInputs, call: Call, response: Response, sdp: SessionDescription) -> None:
    call.stop_answer_timer()
    call.connect(response, sdp)


@ringing.upon(CallInputs.rejected).to(ended)
def _pass_rejection(inputs: CallInputs, call: Call, response: Response) -> None:
    call.stop_answer_timer()
    call.pass_rejection(response)
    call.finish()


@ringing.upon(CallInputs.bad_answer).to(ended)
def _refuse_bad_answer(inputs: CallInputs, call: Call, response: Response) -> None:
    call.stop_answer_timer()
    call.refuse_bad_answer(response)
    call.finish()


@ringing.upon(CallInputs.answer_timed_out).to(ended)
def _time_out(inputs: CallInputs, call: Call) -> None:
    call.time_out()
    call.finish()


@ringing.upon(CallInputs.cancel).to(ended)
def _cancelled_ringing(inputs: CallInputs, call: Call) -> None:
    call.stop_answer_timer()
    call.terminated()
    call.cancel_callee()
    call.finish()


@ringing.upon(CallInputs.caller_lost).to(ended)
def _caller_lost_ringing(inputs: CallInputs, call: Call) -> None:
    call.stop_answer_timer()
    call.cancel_callee()
    call.finish()


@ringing.upon(CallInputs.callee_lost).to(ended)
def _callee_lost_ringing(inputs: CallInputs, call: Call) -> None:
    call.stop_answer_timer()
    call.unavailable()
    call.finish()


@ringing.upon(CallInputs.forget).to(closed)
def _forget_ringing(inputs: CallInputs, call: Call) -> None:
    call.cancel_callee()
    call.remove()


# reporting: 200 and ACK sent with the dial moment; the peers dial and tell

@reporting.upon(CallInputs.report).loop()
def _note_report(inputs: CallInputs, call: Call, side: str, outcome: Outcome) -> None:
    if call.note_report(side, outcome):
        inputs.decided()  # runs once this transition is done


@reporting.upon(CallInputs.decided).to(recorded)
def _decided(inputs: CallInputs, call: Call) -> None:
    call.record()
    call.finish()


@reporting.upon(CallInputs.bye).loop()
def _bye_other(inputs: CallInputs, call: Call, side: str) -> None:
    call.bye_other(side)


@reporting.upon(CallInputs.caller_lost).loop()
def _bye_callee(inputs: CallInputs, call: Call) -> None:
    if not call.connected():
        call.bye_to(CALLEE)


@reporting.upon(CallInputs.callee_lost).loop()
def _bye_caller(inputs: CallInputs, call: Call) -> None:
    if not call.connected():
        call.bye_to(CALLER)


@reporting.upon(CallInputs.outcome_timed_out).to(recorded)
def _outcome_timed_out(inputs: CallInputs, call: Call) -> None:
    call.record()
    call.finish()


@reporting.upon(CallInputs.forget).to(closed)
def _forget_reporting(inputs: CallInputs, call: Call) -> None:
    call.record()
    call.remove()


_input: Callable[..., None]
for _input in (CallInputs.cancel, CallInputs.answered, CallInputs.late_answer):
    reporting.upon(_input).loop().returns(None)


# recorded ("the attempt is stored") and ended ("failed, refused or cancelled before
# connecting"): only absorbing, late INFO/BYE still get 200 until the call is forgotten

for _state in (recorded, ended):
    for _input in (CallInputs.report, CallInputs.bye, CallInputs.cancel, CallInputs.caller_lost,
                   CallInputs.callee_lost, CallInputs.outcome_timed_out, CallInputs.answer_timed_out,
                   CallInputs.rejected):
        _state.upon(_input).loop().returns(None)


@recorded.upon(CallInputs.forget).to(closed)
def _forget_recorded(inputs: CallInputs, call: Call) -> None:
    call.remove()


@ended.upon(CallInputs.forget).to(closed)
def _forget_ended(inputs: CallInputs, call: Call) -> None:
    call.remove()


@ended.upon(CallInputs.late_answer).loop()
def _ack_and_bye(inputs: CallInputs, call: Call, response: Response) -> None:
    call.ack_and_bye(response)


recorded.upon(CallInputs.late_answer).loop().returns(None)

# closed: forgotten by the call table; nothing but phase() has a transition

CallMachine = indexed(_builder.build())
del _state, _phase, _input
