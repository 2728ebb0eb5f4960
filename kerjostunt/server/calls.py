"""Calls: "connect me to user X" (docs/protocol.rst, "Calls").

The server is a small back-to-back user agent: the caller's INVITE is
answered on the caller's dialog, and a *new* INVITE (own Call-ID, branch and
From tag) goes to the callee, so two calls never share an identifier however
the peers pick theirs, and the callee never learns the caller's Call-ID.
Each call's life is one Automat machine (``Call``); the ``CallManager`` owns
the call table (both legs), the per-caller INVITE rate limit, and the
wiring to registrar, store and probe observations.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

from automat import MethodicalMachine, NoTransition
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.server.register import RequestError, user_of
from kerjostunt.server.registrar import Registrar, SignalingConnection
from kerjostunt.server.signaling import TokenBucket
from kerjostunt.store.database import UnknownUser
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import Outcome, OutcomeError, new_branch, new_tag, parse_outcome
from kerjostunt.wire.prediction import UNKNOWN, NATDescription, Prediction, classify, predict
from kerjostunt.wire.sdp import (
    Candidate,
    SDPError,
    SessionDescription,
    candidate_priority,
    parse_sdp,
    validate_offer,
)
from kerjostunt.wire.sip.headers import parse_name_addr, parse_uri, parse_via
from kerjostunt.wire.sip.message import Headers, Request, Response, make_response

log = Logger()

#: how many predicted ports each side gets (a window for sequential NATs)
PREDICTION_WINDOW = 4
#: a client's SDP may carry this many candidate lines; the server adds at most
#: PREDICTION_WINDOW prflx and MAX_SRFLX srflx lines so every SDP stays <= 32
MAX_OFFER_CANDIDATES = 16
MAX_SRFLX = 12
#: used when a connection's RTT has not been measured yet (seconds)
DEFAULT_RTT = 0.100
DIAL_MARGIN_MS = 30.0
CALLER, CALLEE = "caller", "callee"


def dial_in_ms(rtt_a: float | None, rtt_b: float | None) -> tuple[int, int]:
    """protocol.rst: both start max(ra, rb)/2 + 30 ms from now, each told relative to receipt."""
    ra = (rtt_a if rtt_a is not None else DEFAULT_RTT) * 1000.0
    rb = (rtt_b if rtt_b is not None else DEFAULT_RTT) * 1000.0
    top = max(ra, rb)
    return round((top - ra) / 2 + DIAL_MARGIN_MS), round((top - rb) / 2 + DIAL_MARGIN_MS)


def format_endpoint(endpoint: tuple[str, int] | None) -> str | None:
    """An attempt row's endpoint text (None stays None)."""
    return None if endpoint is None else kerjo.format_endpoint(endpoint)


def nat_header(prediction: Prediction) -> str:
    return kerjo.format_nat(prediction.nat, prediction.confidence)


def augmented(sd: SessionDescription, prediction: Prediction, public_ip: str) -> SessionDescription:
    """The side's own SDP plus predicted (prflx) and public passive (srflx) candidates."""
    punch = sd.punch_candidate
    assert punch is not None and sd.punch_port is not None
    extra = [
        Candidate(f"p{i + 1}", 1, "TCP", candidate_priority("prflx", "so") - i, prediction.ip, port,
                  "prflx", "so", raddr=punch.ip, rport=sd.punch_port)
        for i, port in enumerate(prediction.ports[:PREDICTION_WINDOW])
    ]
    extra += [
        Candidate(f"s{j + 1}", 1, "TCP", candidate_priority("srflx", "passive") - j, public_ip, c.port,
                  "srflx", "passive", raddr=c.ip, rport=c.port)
        for j, c in enumerate(sd.of_type("host", "passive")[:MAX_SRFLX])
    ]
    return sd.with_candidates(extra)


def _top_branch(message: Request | Response) -> str | None:
    vias = message.headers.get_all("Via")
    if not vias:
        return None
    try:
        return parse_via(vias[0]).branch
    except ValueError:
        return None


def _tag_of(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return parse_name_addr(value).tag
    except ValueError:
        return None


class Call:
    """One call's life at the server; every output is one step of protocol.rst."""

    _machine = MethodicalMachine()

    def __init__(self, manager: CallManager, caller_conn: SignalingConnection, invite: Request,
                 caller_id: str, callee_id: str, caller_sdp: SessionDescription) -> None:
        self.manager = manager
        self.caller_conn = caller_conn
        self.callee_conn: SignalingConnection | None = None
        self.invite = invite
        self.caller_call_id = invite.call_id or ""
        self.caller_id, self.callee_id = caller_id, callee_id
        self.caller_sdp = caller_sdp
        self.callee_sdp: SessionDescription | None = None
        self.to_tag = new_tag()                      # ours, in the caller's dialog
        self.server_call_id = f"{secrets.token_hex(12)}@{manager.domain}"
        self.server_tag = new_tag()                  # ours, in the callee's dialog
        self.invite_branch = new_branch()
        self.callee_tag: str | None = None
        self.forwarded: Request | None = None
        self.secret = secrets.token_hex(32)
        self.caller_prediction: Prediction | None = None
        self.callee_prediction: Prediction | None = None
        self.dial_at: float | None = None
        self.reports: dict[str, Outcome] = {}
        self.recorded: dict[str, Any] | None = None
        self.byes_sent: set[str] = set()
        self.phase = "checking"
        self.started = manager.clock.seconds()
        self._cseq = {CALLER: 0, CALLEE: 1}
        self._answer_timer: IDelayedCall | None = None
        self._outcome_timer: IDelayedCall | None = None

    # -- states ------------------------------------------------------------------

    @_machine.state(initial=True)
    def checking(self) -> None:
        """100 sent; waiting for the store (target exists, shared group)."""

    @_machine.state()
    def ringing(self) -> None:
        """INVITE forwarded to the callee; waiting for its final response."""

    @_machine.state()
    def reporting(self) -> None:
        """200 and ACK sent with the dial moment; waiting for outcome INFOs."""

    @_machine.state()
    def recorded(self) -> None:
        """The attempt is stored; late INFO/BYE still get 200 until the call is forgotten."""

    @_machine.state()
    def ended(self) -> None:
        """Failed, refused or cancelled before connecting; lingers for stray responses."""

    @_machine.state()
    def closed(self) -> None:
        """Forgotten by the call table."""

    # -- inputs ------------------------------------------------------------------

    @_machine.input()
    def checked(self, callee_conn: SignalingConnection) -> None:
        "The store says yes and the callee is online."

    @_machine.input()
    def refused(self, code: int, reason: str | None, retry_after: int | None = None) -> None:
        "The call cannot go ahead: answer the caller with this."

    @_machine.input()
    def answered(self, response: Response, sdp: SessionDescription) -> None:
        "The callee's 200 OK with a usable SDP."

    @_machine.input()
    def rejected(self, response: Response) -> None:
        "The callee's error response."

    @_machine.input()
    def bad_answer(self, response: Response) -> None:
        "A 200 OK whose SDP is unusable."

    @_machine.input()
    def answer_timed_out(self) -> None:
        "No final response from the callee in time."

    @_machine.input()
    def cancel(self) -> None:
        "The caller gave up (CANCEL, or BYE before the answer)."

    @_machine.input()
    def caller_lost(self) -> None:
        "The caller's signaling connection went away."

    @_machine.input()
    def callee_lost(self) -> None:
        "The callee's signaling connection went away."

    @_machine.input()
    def bye(self, side: str) -> None:
        "A BYE from one side once the call is answered."

    @_machine.input()
    def report(self, side: str, outcome: Outcome) -> None:
        "One side's outcome INFO."

    @_machine.input()
    def outcome_timed_out(self) -> None:
        "Nobody decided the outcome in time."

    @_machine.input()
    def late_answer(self, response: Response) -> None:
        "A 200 OK after the call ended (it crossed our CANCEL)."

    @_machine.input()
    def forget(self) -> None:
        "Linger time over, or the server stops."

    # -- outputs -----------------------------------------------------------------

    @_machine.output()
    def _forward(self, callee_conn: SignalingConnection) -> None:
        self.phase = "ringing"
        self.callee_conn = callee_conn
        self.manager.leg_added(self, callee_conn)
        self.caller_prediction = self.manager.prediction_for(self.caller_id, self.caller_sdp, self.caller_conn)
        headers = Headers()
        headers.add("Via", f"SIP/2.0/TLS {self.manager.domain};branch={self.invite_branch}")
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{self.manager.uri(self.caller_id)}>;tag={self.server_tag}")
        headers.add("To", f"<{self.manager.uri(self.callee_id)}>")
        headers.add("Call-ID", self.server_call_id)
        headers.add("CSeq", "1 INVITE")
        headers.add("Contact", f"<sips:{self.manager.domain};transport=tls>")
        headers.add("Content-Type", "application/sdp")
        self._peer_headers(headers, "responder", self.caller_prediction, self.caller_conn)
        body = augmented(self.caller_sdp, self.caller_prediction, self.caller_conn.peer[0]).to_bytes()
        self.forwarded = Request("INVITE", self.manager.uri(self.callee_id), headers, body)
        callee_conn.send(self.forwarded)
        self._answer_timer = self.manager.clock.callLater(self.manager.answer_timeout, self._answer_timeout)

    @_machine.output()
    def _refuse(self, code: int, reason: str | None, retry_after: int | None = None) -> None:
        response = make_response(self.invite, code, reason, to_tag=self.to_tag)
        if retry_after is not None:
            response.headers.add("Retry-After", str(retry_after))
        self.caller_conn.send(response)
        self.manager.count(f"calls_refused_{code}")

    @_machine.output()
    def _stop_answer_timer(self) -> None:
        self._cancel_answer_timer()

    def _cancel_answer_timer(self) -> None:
        if self._answer_timer is not None and self._answer_timer.active():
            self._answer_timer.cancel()
        self._answer_timer = None

    @_machine.output()
    def _connect(self, response: Response, sdp: SessionDescription) -> None:
        """The moment of the call: 200 to the caller and ACK to the callee, back to back."""
        assert self.callee_conn is not None
        self.phase = "reporting"
        self.callee_sdp = sdp
        self.callee_tag = _tag_of(response.headers.get("To"))
        self.callee_prediction = self.manager.prediction_for(self.callee_id, sdp, self.callee_conn)
        dial_caller, dial_callee = dial_in_ms(self.caller_conn.rtt, self.callee_conn.rtt)
        ok = make_response(self.invite, 200, to_tag=self.to_tag)
        ok.headers.add("Contact", f"<sips:{self.manager.domain};transport=tls>")
        ok.headers.add("Content-Type", "application/sdp")
        self._peer_headers(ok.headers, "initiator", self.callee_prediction, self.callee_conn)
        ok.headers.add(kerjo.DIAL_IN, kerjo.format_dial_in(dial_caller))
        ok.body = augmented(sdp, self.callee_prediction, self.callee_conn.peer[0]).to_bytes()
        ack = self._callee_request("ACK", cseq=1)
        ack.headers.add(kerjo.DIAL_IN, kerjo.format_dial_in(dial_callee))
        self.caller_conn.send(ok)
        self.callee_conn.send(ack)
        now = self.manager.clock.seconds()
        self.dial_at = now + max(dial_caller, dial_callee) / 1000.0
        self._outcome_timer = self.manager.clock.callLater(
            self.dial_at - now + self.manager.outcome_timeout, self.outcome_timed_out)
        self.manager.count("calls_answered")
        log.debug("Call {caller} -> {callee} answered; dial in {a}/{b} ms", caller=self.caller_id,
                 callee=self.callee_id, a=dial_caller, b=dial_callee)

    @_machine.output()
    def _pass_rejection(self, response: Response) -> None:
        passed = make_response(self.invite, response.code, response.reason, to_tag=self.to_tag)
        for name in ("Retry-After", "Warning"):
            value = response.headers.get(name)
            if value is not None:
                passed.headers.add(name, value)
        self.caller_conn.send(passed)
        self.manager.count(f"calls_rejected_{response.code}")

    @_machine.output()
    def _refuse_bad_answer(self, response: Response) -> None:
        self.callee_tag = _tag_of(response.headers.get("To"))
        self.caller_conn.send(make_response(self.invite, 502, "Bad Gateway: unusable answer", to_tag=self.to_tag))
        self._send_callee(self._callee_request("ACK", cseq=1))
        self._bye_to(CALLEE)

    @_machine.output()
    def _timeout_both(self) -> None:
        self.caller_conn.send(make_response(self.invite, 408, to_tag=self.to_tag))
        self._send_cancel()
        self.manager.count("calls_timed_out")

    @_machine.output()
    def _terminated(self) -> None:
        self.caller_conn.send(make_response(self.invite, 487, to_tag=self.to_tag))
        self.manager.count("calls_cancelled")

    @_machine.output()
    def _cancel_callee(self) -> None:
        self._send_cancel()

    def _send_cancel(self) -> None:
        if self.forwarded is None:
            return
        headers = Headers()
        headers.add("Via", f"SIP/2.0/TLS {self.manager.domain};branch={self.invite_branch}")
        headers.add("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            headers.add(name, self.forwarded.headers.get(name) or "")
        headers.add("CSeq", "1 CANCEL")
        self._send_callee(Request("CANCEL", self.forwarded.uri, headers))

    @_machine.output()
    def _unavailable(self) -> None:
        self.caller_conn.send(make_response(self.invite, 480, "Temporarily Unavailable: callee went away",
                                            to_tag=self.to_tag))

    @_machine.output()
    def _bye_other(self, side: str) -> None:
        if not self.reports or not any(r.success for r in self.reports.values()):
            self._bye_to(CALLEE if side == CALLER else CALLER)
        self.byes_sent.add(side)  # that side said goodbye itself

    @_machine.output()
    def _bye_callee(self) -> None:
        if not any(r.success for r in self.reports.values()):
            self._bye_to(CALLEE)

    @_machine.output()
    def _bye_caller(self) -> None:
        if not any(r.success for r in self.reports.values()):
            self._bye_to(CALLER)

    @_machine.output()
    def _note_report(self, side: str, outcome: Outcome) -> None:
        self.reports.setdefault(side, outcome)

    @_machine.output()
    def _record(self) -> None:
        self.phase = "recorded"
        self._stop_outcome_timer()
        self.manager.record(self)

    @_machine.output()
    def _ack_and_bye(self, response: Response) -> None:
        self.callee_tag = _tag_of(response.headers.get("To"))
        self._send_callee(self._callee_request("ACK", cseq=1))
        self._bye_to(CALLEE)

    @_machine.output()
    def _finish(self) -> None:
        if self.phase not in ("recorded",):
            self.phase = "ended"
        self._cancel_answer_timer()
        self._stop_outcome_timer()
        self._shed()
        self.manager.linger_from_now(self)

    @_machine.output()
    def _remove(self) -> None:
        self.phase = "closed"
        for timer in (self._answer_timer, self._outcome_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.manager.remove(self)

    # checking: the store is working
    checking.upon(checked, enter=ringing, outputs=[_forward])
    checking.upon(refused, enter=ended, outputs=[_refuse, _finish])
    checking.upon(cancel, enter=ended, outputs=[_terminated, _finish])
    checking.upon(caller_lost, enter=ended, outputs=[_finish])
    checking.upon(callee_lost, enter=checking, outputs=[])
    checking.upon(forget, enter=closed, outputs=[_remove])
    # ringing: the callee decides
    ringing.upon(answered, enter=reporting, outputs=[_stop_answer_timer, _connect])
    ringing.upon(rejected, enter=ended, outputs=[_stop_answer_timer, _pass_rejection, _finish])
    ringing.upon(bad_answer, enter=ended, outputs=[_stop_answer_timer, _refuse_bad_answer, _finish])
    ringing.upon(answer_timed_out, enter=ended, outputs=[_timeout_both, _finish])
    ringing.upon(cancel, enter=ended, outputs=[_stop_answer_timer, _terminated, _cancel_callee, _finish])
    ringing.upon(caller_lost, enter=ended, outputs=[_stop_answer_timer, _cancel_callee, _finish])
    ringing.upon(callee_lost, enter=ended, outputs=[_stop_answer_timer, _unavailable, _finish])
    ringing.upon(forget, enter=closed, outputs=[_cancel_callee, _remove])
    # reporting: the peers dial and tell
    reporting.upon(report, enter=reporting, outputs=[_note_report])
    reporting.upon(bye, enter=reporting, outputs=[_bye_other])
    reporting.upon(caller_lost, enter=reporting, outputs=[_bye_callee])
    reporting.upon(callee_lost, enter=reporting, outputs=[_bye_caller])
    reporting.upon(outcome_timed_out, enter=recorded, outputs=[_record, _finish])
    reporting.upon(forget, enter=closed, outputs=[_record, _remove])
    reporting.upon(cancel, enter=reporting, outputs=[])
    reporting.upon(answered, enter=reporting, outputs=[])
    reporting.upon(late_answer, enter=reporting, outputs=[])
    # recorded / ended: only absorbing
    for _state in (recorded, ended):
        _state.upon(report, enter=_state, outputs=[])
        _state.upon(bye, enter=_state, outputs=[])
        _state.upon(cancel, enter=_state, outputs=[])
        _state.upon(caller_lost, enter=_state, outputs=[])
        _state.upon(callee_lost, enter=_state, outputs=[])
        _state.upon(outcome_timed_out, enter=_state, outputs=[])
        _state.upon(answer_timed_out, enter=_state, outputs=[])
        _state.upon(forget, enter=closed, outputs=[_remove])
    ended.upon(late_answer, enter=ended, outputs=[_ack_and_bye])
    recorded.upon(late_answer, enter=recorded, outputs=[])
    ended.upon(rejected, enter=ended, outputs=[])
    recorded.upon(rejected, enter=recorded, outputs=[])
    del _state

    @_machine.input()
    def decided(self) -> None:
        "The caller reported success, or both sides reported."

    reporting.upon(decided, enter=recorded, outputs=[_record, _finish])

    # -- plain helpers -------------------------------------------------------------

    def on_report(self, side: str, outcome: Outcome) -> None:
        was_reporting = self.phase == "reporting"
        self.report(side, outcome)
        # The caller's report decides (its elapsed time is the call's time to
        # connect; a callee reached before its own dial moment reports ~0), or
        # both reports; the outcome timer records a lone callee report.
        caller = self.reports.get(CALLER)
        if was_reporting and ((caller is not None and caller.success) or len(self.reports) == 2):
            self.decided()

    def legs(self) -> list[SignalingConnection]:
        return [c for c in (self.caller_conn, self.callee_conn) if c is not None]

    def _peer_headers(self, headers: Headers, role: str, prediction: Prediction, other: SignalingConnection) -> None:
        headers.add(kerjo.CALL_SECRET, self.secret)
        headers.add(kerjo.ROLE, role)
        headers.add(kerjo.NAT, nat_header(prediction))
        headers.add(kerjo.PEER_PUBLIC, other.peer[0])

    def _callee_request(self, method: str, cseq: int | None = None) -> Request:
        if cseq is None:
            self._cseq[CALLEE] += 1
            cseq = self._cseq[CALLEE]
        headers = Headers()
        headers.add("Via", f"SIP/2.0/TLS {self.manager.domain};branch={new_branch()}")
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{self.manager.uri(self.caller_id)}>;tag={self.server_tag}")
        to = f"<{self.manager.uri(self.callee_id)}>" + (f";tag={self.callee_tag}" if self.callee_tag else "")
        headers.add("To", to)
        headers.add("Call-ID", self.server_call_id)
        headers.add("CSeq", f"{cseq} {method}")
        return Request(method, self.manager.uri(self.callee_id), headers)

    def _caller_request(self, method: str) -> Request:
        self._cseq[CALLER] += 1
        headers = Headers()
        headers.add("Via", f"SIP/2.0/TLS {self.manager.domain};branch={new_branch()}")
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<{self.manager.uri(self.callee_id)}>;tag={self.to_tag}")
        headers.add("To", self.invite.headers.get("From") or f"<{self.manager.uri(self.caller_id)}>")
        headers.add("Call-ID", self.caller_call_id)
        headers.add("CSeq", f"{self._cseq[CALLER]} {method}")
        return Request(method, self.manager.uri(self.caller_id), headers)

    def _bye_to(self, side: str) -> None:
        if side in self.byes_sent:
            return
        self.byes_sent.add(side)
        if side == CALLEE:
            self._send_callee(self._callee_request("BYE"))
        else:
            self.caller_conn.send(self._caller_request("BYE"))

    def _send_callee(self, request: Request) -> None:
        if self.callee_conn is not None:
            self.callee_conn.send(request)

    def _answer_timeout(self) -> None:
        self._answer_timer = None
        self.manager.guarded(self, self.answer_timed_out)

    def _stop_outcome_timer(self) -> None:
        if self._outcome_timer is not None and self._outcome_timer.active():
            self._outcome_timer.cancel()
        self._outcome_timer = None

    def _shed(self) -> None:
        """Drop what only a call in progress needs, keeping what absorbing strays needs.

        An ended call stays in the call table for ``linger`` seconds (32),
        so at 200 calls/s about 6,400 of them are alive, and every full
        garbage collection walks what they hold: with the messages, SDPs,
        predictions and reports still attached, 27 tracked objects and about
        20 microseconds of each full collection per call (bench/callpath.py),
        130 ms pauses at 6,400 calls, the INVITE-to-200 tail. From here on
        only identifiers, tags, connections and the phase are read (a late
        200 gets ACK and BYE; INFO, BYE and CANCEL get answers).
        """
        self.invite = self.forwarded = None  # type: ignore[assignment]
        self.caller_sdp = self.callee_sdp = None  # type: ignore[assignment]
        self.caller_prediction = self.callee_prediction = None
        self.reports = {}

    def attempt(self) -> dict[str, Any]:
        """What goes to store.record_attempt, from the reports so far."""
        success = next(((side, r) for side in (CALLER, CALLEE) if (r := self.reports.get(side)) is not None and r.success), None)
        if success is not None:
            side, rep = success
            # The caller's report names the callee's endpoint, and vice versa.
            dialed = self.callee_prediction if side == CALLER else self.caller_prediction
            outcome, technique, actual, elapsed = rep.outcome, rep.technique, rep.remote, rep.elapsed_ms
        else:
            dialed = self.callee_prediction
            outcome, technique, actual = "failed", "none", None
            elapsed = max((r.elapsed_ms for r in self.reports.values() if r.elapsed_ms is not None), default=None)
        predicted = dialed.endpoints()[0] if dialed is not None and dialed.ports else None
        return {"call_id": self.server_call_id, "caller": self.caller_id, "callee": self.callee_id,
                    "technique": technique, "outcome": outcome, "predicted": format_endpoint(predicted),
                    "actual": format_endpoint(actual), "duration_ms": elapsed}


class CallManager:
    """The call table and everything a call needs from the rest of the server."""

    def __init__(
        self,
        clock: IReactorTime,
        domain: str,
        registrar: Registrar,
        store: Any,
        observations: Any,
        counter: Callable[[str], None] = lambda what: None,
        *,
        answer_timeout: float = 15.0,
        outcome_timeout: float = 30.0,
        linger: float = 32.0,
        invite_rate: float = 5.0,
        invite_burst: float = 20.0,
    ) -> None:
        self.clock = clock
        self.domain = domain
        self.registrar = registrar
        self.store = store
        self.observations = observations
        self.count = counter
        self.answer_timeout = answer_timeout
        self.outcome_timeout = outcome_timeout
        self.linger = linger
        self.invite_rate, self.invite_burst = invite_rate, invite_burst
        self._by_caller_leg: dict[tuple[SignalingConnection, str], Call] = {}
        self._by_server_id: dict[str, Call] = {}
        self._by_conn: dict[SignalingConnection, set[Call]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: set[Deferred] = set()
        # Ended calls in the order they ended: they all linger equally long, so
        # one timer for the oldest does instead of one DelayedCall per call
        # (6,400 of them in the reactor's heap at 200 calls/s).
        self._lingering: deque[tuple[float, Call]] = deque()
        self._linger_timer: IDelayedCall | None = None

    # -- the router's interface ------------------------------------------------------

    def handle_request(self, conn: SignalingConnection, request: Request) -> None:
        try:
            self._request(conn, request)
        except RequestError as exc:
            if request.method != "ACK":
                conn.send(make_response(request, exc.code, exc.reason))
        except Exception:
            log.failure("Call handling failed for {method} from {peer}", method=request.method, peer=conn.peer)
            self.count("internal_errors")
            if request.method != "ACK":
                conn.send(make_response(request, 500))

    def handle_response(self, conn: SignalingConnection, response: Response) -> None:
        try:
            self._response(conn, response)
        except Exception:
            log.failure("Call handling failed for {code} from {peer}", code=response.code, peer=conn.peer)
            self.count("internal_errors")

    def connection_lost(self, conn: SignalingConnection) -> None:
        for call in list(self._by_conn.pop(conn, ())):
            if conn is call.caller_conn:
                self.guarded(call, call.caller_lost)
            if conn is call.callee_conn:
                self.guarded(call, call.callee_lost)

    def stop(self) -> Deferred:
        """Record what the calls in progress know, stop every timer (clean shutdown)."""
        for call in list(self.calls()):
            self.guarded(call, call.forget)
        self._lingering.clear()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        self._linger_timer = None
        return DeferredList(list(self._pending), consumeErrors=True)

    # -- what calls use ----------------------------------------------------------------

    def uri(self, user_id: str) -> str:
        return f"sips:{user_id}@{self.domain}"

    def calls(self) -> list[Call]:
        return list(self._by_server_id.values())

    def leg_added(self, call: Call, conn: SignalingConnection) -> None:
        self._by_conn.setdefault(conn, set()).add(call)

    def linger_from_now(self, call: Call) -> None:
        """Forget ``call`` ``linger`` seconds from now."""
        self._lingering.append((self.clock.seconds() + self.linger, call))
        if self._linger_timer is None:
            self._linger_timer = self.clock.callLater(self.linger, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        now = self.clock.seconds()
        lingering = self._lingering
        while lingering and lingering[0][0] <= now:
            _, call = lingering.popleft()
            if call.phase != "closed":
                self.guarded(call, call.forget)
        if lingering:
            self._linger_timer = self.clock.callLater(lingering[0][0] - now, self._linger_over)

    def remove(self, call: Call) -> None:
        self._by_caller_leg.pop((call.caller_conn, call.caller_call_id), None)
        self._by_server_id.pop(call.server_call_id, None)
        for conn in call.legs():
            calls = self._by_conn.get(conn)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._by_conn[conn]

    def guarded(self, call: Call, event: Callable[..., Any], *args: Any) -> None:
        """Feed an input; one that the state ignores is not an error, an exception is logged."""
        try:
            event(*args)
        except NoTransition:
            log.debug("Call {id}: {event} ignored in {phase}", id=call.server_call_id,
                      event=getattr(event, "__name__", event), phase=call.phase)
        except Exception:
            log.failure("Call {id}: {event} failed", id=call.server_call_id, event=getattr(event, "__name__", event))
            self.count("internal_errors")

    def prediction_for(self, user_id: str, sdp: SessionDescription, conn: SignalingConnection) -> Prediction:
        """From the probes of exactly the SDP's punch port; else the signaling address, low confidence."""
        punch = sdp.punch_port
        assert punch is not None
        samples = self.observations.samples(user_id)
        if any(s.local_port == punch for s in samples):
            try:
                return predict(samples, local_port=punch, window=PREDICTION_WINDOW)
            except Exception:
                log.failure("Prediction failed for {user}", user=user_id)
        nat = classify(samples) if samples else NATDescription(True, UNKNOWN, UNKNOWN, None, conn.peer[0])
        return Prediction(conn.peer[0], (punch,), 0.1, nat)

    def record(self, call: Call) -> None:
        attempt = call.attempt()
        when = self.clock.seconds()
        call.recorded = attempt
        # kerjostunt_calls_total{outcome, technique} reads these keys (metrics.py).
        self.count(f"calls_{attempt['outcome']}_{attempt['technique'] or 'none'}")
        # The one info line per call; the steps before it are debug (--log-level).
        log.info("Call {caller} -> {callee}: {outcome} ({technique}), predicted {predicted}, actual {actual}",
                 **attempt)
        d = self.store.record_attempt(when=when, **attempt)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        d.addCallback(lambda states: log.debug("STUNT states now {states}", states=states))
        d.addErrback(lambda f: log.failure("Could not record call {id}", f, id=call.server_call_id))

    # -- requests ----------------------------------------------------------------------

    def _request(self, conn: SignalingConnection, request: Request) -> None:
        if request.method == "INVITE":
            self._invite(conn, request)
            return
        call, side = self._find(conn, request.call_id or "")
        if call is None:
            if request.method != "ACK":
                conn.send(make_response(request, 481))
            return
        method = request.method
        if method == "ACK":
            return  # the caller's ACK of our 200 (or of an error) ends nothing
        if method == "CANCEL":
            if side != CALLER:
                conn.send(make_response(request, 481))
                return
            conn.send(make_response(request, 200))
            self.guarded(call, call.cancel)
        elif method == "BYE":
            conn.send(make_response(request, 200, to_tag=None))
            if call.phase in ("checking", "ringing"):
                self.guarded(call, call.cancel if side == CALLER else call.callee_lost)
            else:
                self.guarded(call, call.bye, side)
        elif method == "INFO":
            self._info(conn, request, call, side)
        else:
            conn.send(make_response(request, 405))

    def _find(self, conn: SignalingConnection, call_id: str) -> tuple[Call | None, str]:
        call = self._by_caller_leg.get((conn, call_id))
        if call is not None and call.caller_conn is conn:
            return call, CALLER
        call = self._by_server_id.get(call_id)
        if call is not None and call.callee_conn is conn:
            return call, CALLEE
        return None, ""

    def _info(self, conn: SignalingConnection, request: Request, call: Call, side: str) -> None:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != kerjo.OUTCOME_CONTENT_TYPE:
            response = make_response(request, 415)
            response.headers.add("Accept", kerjo.OUTCOME_CONTENT_TYPE)
            conn.send(response)
            return
        try:
            outcome = parse_outcome(request.body)
        except OutcomeError as exc:
            conn.send(make_response(request, 400, f"Bad Request: {exc}"))
            return
        if call.phase not in ("reporting", "recorded"):
            conn.send(make_response(request, 481, "Call/Transaction Does Not Exist: not answered"))
            return
        conn.send(make_response(request, 200))
        log.debug("Call {id}: {side} reports {outcome}", id=call.server_call_id, side=side, outcome=outcome.outcome)
        if call.phase == "reporting":
            self.guarded(call, call.on_report, side, outcome)

    def _invite(self, conn: SignalingConnection, request: Request) -> None:
        caller = user_of(request.headers.get("From"), self.domain)
        binding = self.registrar.lookup(caller)
        if caller not in conn.user_ids or binding is None or binding.connection is not conn:
            raise RequestError(403, "Forbidden: not registered on this connection")
        if _tag_of(request.headers.get("To")) is not None:
            call, _ = self._find(conn, request.call_id or "")
            raise RequestError(488 if call else 481, "re-INVITE not supported" if call else None)
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(self.clock, self.invite_rate, self.invite_burst)
        if not bucket.take():
            self.count("invites_rate_limited")
            response = make_response(request, 503, "Service Unavailable: too many calls")
            response.headers.add("Retry-After", "1")
            conn.send(response)
            return
        callee = self._target(request)
        if callee == caller:
            raise RequestError(482, "Loop Detected: calling yourself")
        call_id = request.call_id or ""
        if (conn, call_id) in self._by_caller_leg or call_id in self._by_server_id:
            raise RequestError(482, "Loop Detected: Call-ID in use")
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/sdp":
            raise RequestError(400, "Bad Request: application/sdp body required")
        try:
            sdp = parse_sdp(request.body)
            validate_offer(sdp)
            if len(sdp.candidates) > MAX_OFFER_CANDIDATES:
                raise SDPError(f"at most {MAX_OFFER_CANDIDATES} candidates")
        except SDPError as exc:
            raise RequestError(400, f"Bad Request: {exc}") from None
        call = Call(self, conn, request, caller, callee, sdp)
        self._by_caller_leg[(conn, call_id)] = call
        self._by_server_id[call.server_call_id] = call
        self.leg_added(call, conn)
        self.count("invites")
        conn.send(make_response(request, 100))
        self._check(call)

    def _target(self, request: Request) -> str:
        try:
            uri = parse_uri(request.uri)
        except ValueError:
            raise RequestError(400, "Bad Request: unparsable Request-URI") from None
        if uri.scheme.lower() not in ("sip", "sips"):
            raise RequestError(416)
        if not uri.user:  # the host is not checked: SIP tools put the server's IP there
            raise RequestError(404, "Not Found: no user")
        return uri.user

    def _check(self, call: Call) -> None:
        """404 / 403 / 480, in protocol.rst's order; the store answers later."""

        def checked(verdict: str) -> None:
            if call.phase != "checking":
                return
            if verdict == "unknown":
                self.guarded(call, call.refused, 404, None)
                return
            if verdict != "ok":
                self.guarded(call, call.refused, 403, "Forbidden: no shared group")
                return
            binding = self.registrar.lookup(call.callee_id)
            if binding is None:
                self.guarded(call, call.refused, 480, None)
            else:
                self.guarded(call, call.checked, binding.connection)

        def failed(failure: Failure) -> None:
            if call.phase != "checking":
                return
            if failure.check(UnknownUser):
                self.guarded(call, call.refused, 404, None)
                return
            log.failure("Store failed checking call {caller} -> {callee}", failure,
                        caller=call.caller_id, callee=call.callee_id)
            self.count("store_errors")
            self.guarded(call, call.refused, 503, "Service Unavailable: user database", 5)

        # One store round trip: callee exists, and shares a group with the caller.
        d = self.store.call_check(call.caller_id, call.callee_id)
        d.addCallbacks(checked, failed)
        d.addErrback(lambda f: log.failure("Call check failed", f))

    # -- responses ---------------------------------------------------------------------

    def _response(self, conn: SignalingConnection, response: Response) -> None:
        call_id = response.call_id or ""
        call = self._by_server_id.get(call_id)
        cseq = response.cseq
        if call is not None and call.callee_conn is conn and cseq is not None and cseq[1] == "INVITE":
            if _top_branch(response) != call.invite_branch:
                log.debug("Response with a foreign branch for call {id}", id=call_id)
                return
            self._invite_response(call, response)
            return
        # Answers to the CANCELs and BYEs the server sent, or strays.
        log.debug("Absorbed {code} for {cseq} from {peer}", code=response.code, cseq=cseq, peer=conn.peer)

    def _invite_response(self, call: Call, response: Response) -> None:
        code = response.code
        if code < 200:
            if code != 100 and call.phase == "ringing":
                call.caller_conn.send(make_response(call.invite, code, response.reason, to_tag=call.to_tag))
            return
        if code >= 300:
            self.guarded(call, call.rejected, response)
            return
        if call.phase != "ringing":
            self.guarded(call, call.late_answer, response)
            return
        try:
            if (response.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/sdp":
                raise SDPError("no SDP")
            sdp = parse_sdp(response.body)
            validate_offer(sdp)
            if len(sdp.candidates) > MAX_OFFER_CANDIDATES:
                raise SDPError(f"at most {MAX_OFFER_CANDIDATES} candidates")
        except SDPError as exc:
            log.info("Call {id}: unusable answer from {callee}: {why}", id=call.server_call_id,
                     callee=call.callee_id, why=str(exc))
            self.guarded(call, call.bad_answer, response)
            return
        self.guarded(call, call.answered, response, sdp)


__all__ = ["CallManager", "Call", "Outcome", "OutcomeError", "parse_outcome", "dial_in_ms", "augmented",
           "nat_header", "format_endpoint"]
