"""The call table: routing each call request and response to its call, and what calls need.

``CallManager`` finds the call a message belongs to (the caller's leg by
connection and Call-ID, the callee's leg by our Call-ID), answers what no
call needs to see, limits how often one user may INVITE, keeps ended calls
lingering for strays, and wires calls to the registrar, the store and the
probe observations.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Concatenate, ParamSpec, cast

from automat import NoTransition
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.server.calls import messages
from kerjostunt.server.calls.detail import refusal_detail
from kerjostunt.server.calls.dialing import new_mappings, offers_mapping, parse_offer
from kerjostunt.server.calls.lanes import NATLanes
from kerjostunt.server.calls.machine import CALLEE, CALLER, Call, CallInputs, Phase
from kerjostunt.server.calls.messages import tag_of, top_branch
from kerjostunt.server.calls.natview import NATView
from kerjostunt.server.calls.pairs import PairBook
from kerjostunt.server.calls.seams import (
    Attempt,
    CallSettings,
    CallStore,
    Clock,
    Elsewhere,
    Observations,
    RelayDecider,
    Timer,
)
from kerjostunt.server.calls.turnprobes import TurnProbes
from kerjostunt.server.register import RequestError, user_of
from kerjostunt.server.registrar import Registrar, SignalingConnection
from kerjostunt.server.signaling import TokenBucket
from kerjostunt.store import UnknownUser
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import OutcomeError, parse_outcome
from kerjostunt.wire.prediction import (
    NATDescription,
    Prediction,
)
from kerjostunt.wire.sdp import SDPError, SessionDescription
from kerjostunt.wire.sip.headers import parse_uri
from kerjostunt.wire.sip.message import Request, Response, make_response

log = Logger(namespace="kerjostunt.server.calls")

P = ParamSpec("P")


def _content_type(message: Request | Response) -> str:
    return (message.headers.get("Content-Type") or "").split(";")[0].strip().lower()


class CallManager:
    """The call table and everything a call needs from the rest of the server."""

    def __init__(
        self,
        clock: Clock,
        domain: str,
        registrar: Registrar,
        store: CallStore,
        observations: Observations,
        counter: Callable[[str], None] = lambda what: None,
        settings: CallSettings = CallSettings(),
    ) -> None:
        self._clock = clock
        self.domain = domain
        self.registrar = registrar
        self.store = store
        self.observations = observations
        self._counter = counter
        self._settings = settings
        self._by_caller_leg: dict[tuple[SignalingConnection, str], Call] = {}
        self._by_server_id: dict[str, Call] = {}
        self._by_conn: dict[SignalingConnection, set[Call]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: set[Deferred[object]] = set()
        # Ended calls in the order they ended: they all linger equally long, so
        # one timer for the oldest does instead of one DelayedCall per call
        # (6,400 of them in the reactor's heap at 200 calls/s).
        self._lingering: deque[tuple[float, Call]] = deque()
        self._linger_timer: Timer | None = None
        self.lanes = NATLanes(clock, settings.nat_dial_gap)
        self.nat_view = NATView(observations, self.lanes)
        self.turn_probes = TurnProbes(clock, observations, self.lanes)
        self.pairs = PairBook(clock)
        # calls told ``182 Queued`` while they wait for a turn: the next notice
        self._notices: dict[Call, Timer] = {}
        #: users on other instances of a cluster; None: one instance (set by server/cluster/)
        self.elsewhere: Elsewhere | None = None
        #: the opt-in TURN relay (service.py sets it with --relay), None: no relay
        self.relay: RelayDecider | None = None

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
                self.feed(call, CallInputs.caller_lost)
            if conn is call.callee_conn:
                self.feed(call, CallInputs.callee_lost)

    def stop(self) -> Deferred[object]:
        """Record what the calls in progress know, stop every timer (clean shutdown)."""
        for call in list(self.calls()):
            self.feed(call, CallInputs.forget)
        self._lingering.clear()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        self._linger_timer = None
        return cast("Deferred[object]", DeferredList(list(self._pending), consumeErrors=True))

    # -- what calls use (CallHost) -------------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def settings(self) -> CallSettings:
        return self._settings

    def count(self, what: str) -> None:
        self._counter(what)

    def calls(self) -> list[Call]:
        return list(self._by_server_id.values())

    def leg_added(self, call: Call, conn: SignalingConnection) -> None:
        self._by_conn.setdefault(conn, set()).add(call)

    def linger_from_now(self, call: Call) -> None:
        """Forget ``call`` ``linger`` seconds from now (and give up its turn at any NAT)."""
        self.lanes.leave(call)
        self.turn_probes.drop(call)
        linger = self._settings.linger
        self._lingering.append((self._clock.seconds() + linger, call))
        if self._linger_timer is None:
            self._linger_timer = self._clock.callLater(linger, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        now = self._clock.seconds()
        lingering = self._lingering
        while lingering and lingering[0][0] <= now:
            _, call = lingering.popleft()
            if call.machine.phase() is not Phase.CLOSED:
                self.feed(call, CallInputs.forget)
        if lingering:
            self._linger_timer = self._clock.callLater(lingering[0][0] - now, self._linger_over)

    def remove(self, call: Call) -> None:
        self.lanes.leave(call)
        self.turn_probes.drop(call)
        notice = self._notices.pop(call, None)
        if notice is not None and notice.active():
            notice.cancel()
        self._by_caller_leg.pop((call.caller_conn, call.caller_call_id), None)
        self._by_server_id.pop(call.server_call_id, None)
        for conn in call.legs():
            calls = self._by_conn.get(conn)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._by_conn[conn]

    def answer_timed_out(self, call: Call) -> None:
        self.feed(call, CallInputs.answer_timed_out)

    def feed(self, call: Call, event: Callable[Concatenate[CallInputs, P], None],
             *args: P.args, **kwargs: P.kwargs) -> None:
        """Feed ``call`` the input ``event`` with its arguments: ``feed(call, CallInputs.cancel)``.

        The input is named by its ``CallInputs`` method, so its arguments are
        type-checked here and the log can name it (the machine's own bound
        methods carry automat's generated names). One that the state ignores
        is not an error; an exception is logged, so one call's bug never
        reaches another call or the connection.
        """
        name = event.__name__
        try:
            getattr(call.machine, name)(*args, **kwargs)
        except NoTransition:
            log.debug("Call {id}: {event} ignored in {phase}", id=call.server_call_id, event=name,
                      phase=call.machine.phase())
        except Exception:
            log.failure("Call {id}: {event} failed", id=call.server_call_id, event=name)
            self.count("internal_errors")

    def prediction_for(self, user_id: str, sdp: SessionDescription, conn: SignalingConnection) -> Prediction:
        """The side's prediction (natview.py); on a cluster, made where the user's probes are."""
        if self.elsewhere is not None and (remote := self.elsewhere.prediction_of(conn)) is not None:
            return remote
        return self.nat_view.prediction_for(user_id, sdp, conn.peer[0])

    def dial_scheduled(self, call: Call, dial_caller_ms: int, dial_callee_ms: int) -> int:
        """Both sides' dial moments are set: milliseconds to add to both, after earlier calls through a NAT.

        Notes what each lane side opens there and ends the call's turn (lanes.py).
        """
        if not call.lanes:
            return 0
        assert call.caller_prediction is not None and call.callee_prediction is not None
        assert call.callee_sdp is not None and call.callee_conn is not None
        dialed = {CALLER: new_mappings(call.callee_sdp, call.callee_prediction, call.callee_conn.peer[0]),
                  CALLEE: new_mappings(call.caller_sdp, call.caller_prediction, call.caller_conn.peer[0])}
        mappings = {key: dialed[side] for side, key in call.lanes.items()}
        at = self._clock.seconds() + max(dial_caller_ms, dial_callee_ms) / 1000.0
        return round(self.lanes.dialing(call, at, mappings) * 1000.0)

    def record(self, call: Call) -> None:
        attempt = call.attempt()
        when = self._clock.seconds()
        # kerjostunt_calls_total{outcome, technique} reads these keys (metrics.py).
        self.count(f"calls_{attempt['outcome']}_{attempt['technique'] or 'none'}")
        # The one info line per call; the steps before it are debug (--log-level).
        log.info("Call {caller} -> {callee}: {outcome} ({technique}), predicted {predicted}, actual {actual}",
                 **attempt)
        addresses = {call.caller_id: call.caller_conn.peer[0]}
        if call.callee_conn is not None:
            addresses[call.callee_id] = call.callee_conn.peer[0]
        self.pairs.recorded(call.caller_id, call.callee_id, attempt["outcome"] != "failed", addresses)
        self._store_attempt(call, when, attempt)

    def _store_attempt(self, call: Call, when: float, attempt: Attempt) -> None:
        d = self.store.record_attempt(when=when, **attempt)
        self._pending.add(d)

        def done(result: object) -> object:
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
            self.feed(call, CallInputs.cancel)
        elif method == "BYE":
            self._bye(conn, request, call, side)
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

    def _bye(self, conn: SignalingConnection, request: Request, call: Call, side: str) -> None:
        """Ends the side's dialog; an outcome body on it is that side's report first (one request, not two)."""
        outcome = None
        if request.body and _content_type(request) == kerjo.OUTCOME_CONTENT_TYPE:
            try:
                outcome = parse_outcome(request.body)
            except OutcomeError as exc:
                conn.send(make_response(request, 400, f"Bad Request: {exc}"))
                return
        conn.send(make_response(request, 200, to_tag=None))
        phase = call.machine.phase()
        if phase in (Phase.CHECKING, Phase.RINGING):  # not answered: no outcome to take
            self.feed(call, CallInputs.cancel if side == CALLER else CallInputs.callee_lost)
            return
        if outcome is not None and phase is Phase.REPORTING:
            self.feed(call, CallInputs.report, side, outcome)
        self.feed(call, CallInputs.bye, side)

    def _info(self, conn: SignalingConnection, request: Request, call: Call, side: str) -> None:
        if _content_type(request) != kerjo.OUTCOME_CONTENT_TYPE:
            response = make_response(request, 415)
            response.headers.add("Accept", kerjo.OUTCOME_CONTENT_TYPE)
            conn.send(response)
            return
        try:
            outcome = parse_outcome(request.body)
        except OutcomeError as exc:
            conn.send(make_response(request, 400, f"Bad Request: {exc}"))
            return
        phase = call.machine.phase()
        if phase not in (Phase.REPORTING, Phase.RECORDED):
            conn.send(make_response(request, 481, "Call/Transaction Does Not Exist: not answered"))
            return
        conn.send(make_response(request, 200))
        if phase is Phase.REPORTING:
            self.feed(call, CallInputs.report, side, outcome)

    def _invite(self, conn: SignalingConnection, request: Request) -> None:
        caller = self._caller(conn, request)
        if not self._admit(caller):
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
        content_type = _content_type(request)
        if content_type and content_type != "application/sdp":  # RFC 3261 8.2.3: 415 names what we take
            response = make_response(request, 415)
            response.headers.add("Accept", "application/sdp")
            conn.send(response)
            return
        if content_type != "application/sdp":
            raise RequestError(400, "Bad Request: application/sdp body required")
        try:
            sdp = parse_offer(request.body)
        except SDPError as exc:
            raise RequestError(400, f"Bad Request: {exc}") from None
        call = Call(self, self.domain, conn, request, caller, callee, sdp)
        self._by_caller_leg[(conn, call_id)] = call
        self._by_server_id[call.server_call_id] = call
        self.leg_added(call, conn)
        self.count("invites")
        call.trying_later()
        self._check(call)

    def _caller(self, conn: SignalingConnection, request: Request) -> str:
        """The caller, registered on this connection, starting a new dialog (no re-INVITE)."""
        caller = user_of(request.headers.get("From"), self.domain)
        binding = self.registrar.lookup(caller)
        if caller not in conn.user_ids or binding is None or binding.connection is not conn:
            raise RequestError(403, "Forbidden: not registered on this connection")
        if tag_of(request.headers.get("To")) is not None:
            call, _ = self._find(conn, request.call_id or "")
            raise RequestError(488 if call else 481, "re-INVITE not supported" if call else None)
        return caller

    def _admit(self, caller: str) -> bool:
        """The per-caller INVITE rate limit."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            # TokenBucket is typed against the IReactorTime interface; it uses seconds() only.
            bucket = self._buckets[caller] = TokenBucket(
                cast(IReactorTime, self._clock), self._settings.invite_rate, self._settings.invite_burst)
        return bucket.take()

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
            if call.machine.phase() is not Phase.CHECKING:
                return
            if verdict == "unknown":
                self.feed(call, CallInputs.refused, 404, None)
                return
            if verdict != "ok":
                self.feed(call, CallInputs.refused, 403, "Forbidden: no shared group")
                return
            callee_conn = self._callee_conn(call.callee_id)
            if callee_conn is None:
                self._offline(call)
                return
            ips = (call.caller_conn.peer[0], callee_conn.peer[0])
            nats = self.nat_view.sides((call.caller_id, ips[0]), (call.callee_id, ips[1]))
            # A caller offering an IPv6 punch port may meet the callee over IPv6, where there is no NAT
            # (docs/punching.rst, "ipv6"; the callee's answer shows only later whether it can); a side
            # with its gateway's port mapping at its public address is dialed there directly.
            callee = self.registrar.lookup(call.callee_id)  # a callee's mapping is in its REGISTER
            joinable = call.caller_sdp.other_family("so") or offers_mapping(call.caller_sdp, ips[0]) or bool(
                callee is not None and callee.port_mapping)
            why = "" if joinable else self.nat_view.why_unjoinable(*ips, nats)
            self._with_relay(call, callee_conn, why, nats, lambda: self._take_turn(call, callee_conn, nats))

        def failed(failure: Failure) -> None:
            if call.machine.phase() is not Phase.CHECKING:
                return
            if isinstance(failure.value, UnknownUser):
                self.feed(call, CallInputs.refused, 404, None)
                return
            log.failure("Store failed checking call {caller} -> {callee}", failure,
                        caller=call.caller_id, callee=call.callee_id)
            self.count("store_errors")
            self.feed(call, CallInputs.refused, 503, "Service Unavailable: user database", 5)

        # One store round trip: callee exists, and shares a group with the caller.
        d = self.store.call_check(call.caller_id, call.callee_id)
        d.addCallbacks(checked, failed)
        d.addErrback(lambda f: log.failure("Call check failed", f))

    def _take_turn(self, call: Call, callee_conn: SignalingConnection,
                   nats: tuple[NATDescription | None, ...]) -> None:
        """The call's turn at its sequential NATs (lanes.py), then the INVITE goes on."""
        call.lanes = self.nat_view.lanes_of(call.caller_conn.peer[0], callee_conn.peer[0], nats)
        if call.lanes and self._crossing(call):
            self.count("invites_crossing")
            self.feed(call, CallInputs.refused, 491, kerjo.CROSSING_REASON)
            return
        def go() -> None:
            self.turn_probes.when_quiet(call, self._settings.nat_quiet, lambda: self._forward(call))

        if not self.lanes.enter(call, tuple(call.lanes.values()), go,
                                fixed_early=CALLER in call.lanes):  # the caller's prediction goes in the INVITE
            self._queued(call)

    def _with_relay(self, call: Call, callee_conn: SignalingConnection, unjoinable: str,
                    nats: tuple[NATDescription | None, ...], go: Callable[[], None]) -> None:
        """Decide the call's relay (server/relay.py), then ``go``: NATs no technique joins get
        it at once and skip the NAT lanes (nobody punches), or the 488 without one."""
        failures = self.pairs.failed(call.caller_id, call.callee_id, call.caller_conn.peer[0])
        gate = self.relay
        decided = gate.decide(call.caller_id, call.callee_id, unjoinable, failures) if gate else None

        def then(offers: dict[str, kerjo.RelayOffer]) -> None:
            if call.machine.phase() is not Phase.CHECKING:
                return
            if offers:
                call.relay = {CALLER: offers[call.caller_id], CALLEE: offers[call.callee_id]}
                self.count(f"relay_offered_{offers[call.caller_id].when}")
            if unjoinable and not offers:
                self._no_technique(call, callee_conn, unjoinable, nats)
            elif unjoinable:
                self._forward(call)
            else:
                go()

        if decided is None:
            then({})
        else:
            decided.addCallback(then)

    def _no_technique(self, call: Call, callee_conn: SignalingConnection, why: str,
                      nats: tuple[NATDescription | None, ...]) -> None:
        """488: no technique joins the two NATs. Recorded as the pair's failed attempt, as a dial would be."""
        self.count("invites_no_technique")
        self.pairs.recorded(call.caller_id, call.callee_id, False, {
            call.caller_id: call.caller_conn.peer[0], call.callee_id: callee_conn.peer[0]})
        # Logged as the call's refusal (488, the reason names why: calls/machine.py).
        self._store_attempt(call, self._clock.seconds(), {
            "call_id": call.server_call_id, "caller": call.caller_id, "callee": call.callee_id,
            "technique": "none", "outcome": "failed", "predicted": None, "actual": None, "duration_ms": 0.0,
            "witnesses": (),  # the pair's NATs, not either user: no global flag moves
            "detail": refusal_detail(f"488 no technique: {why}", nats, (CALLER, CALLEE))})
        self.feed(call, CallInputs.refused, 488, f"{kerjo.NO_TECHNIQUE_REASON}: {why}")

    def _crossing(self, call: Call) -> bool:
        """Is the callee's own call to the caller waiting for (or holding) a turn at a NAT?

        Then that call will connect them: a second one the other way would
        only take the NAT's turn and ports twice and end as a duplicate.
        """
        return any(isinstance(other, Call) and other.caller_id == call.callee_id
                   and other.callee_id == call.caller_id for other in self.lanes.calls())

    def _queued(self, call: Call) -> None:
        """``182 Queued`` to a caller waiting for its turn at a NAT, again every ``queued_notice`` s: its
        client counts its connect timeout from the latest (a call that timed out queued twice)."""
        self._notices.pop(call, None)
        if not self.lanes.is_waiting(call) or call.machine.phase() is not Phase.CHECKING:
            return
        call.answer(make_response(call.invite, 182, "Queued: waiting for a turn at a NAT"))
        self._notices[call] = self._clock.callLater(self._settings.queued_notice, self._queued, call)

    def _forward(self, call: Call) -> None:
        """The call's turn at its NATs (at once without one): forward it, if the callee is still there."""
        if call.machine.phase() is not Phase.CHECKING:
            return
        callee_conn = self._callee_conn(call.callee_id)
        if callee_conn is None:
            self._offline(call)
            return
        if call.lanes and self.registrar.lookup(call.callee_id) is not None:  # a stand-in probes elsewhere
            call.callee_probes = self.nat_view.probes_needed(callee_conn.peer[0])  # inside the turn: few
            log.debug("Call {caller} -> {callee}: its turn at {lanes}", caller=call.caller_id, callee=call.callee_id,
                      lanes=sorted(set(call.lanes.values())))
        self.feed(call, CallInputs.checked, callee_conn)

    def _callee_conn(self, user_id: str) -> SignalingConnection | None:
        """The user's connection here, else its stand-in on the instance holding it (a cluster)."""
        binding = self.registrar.lookup(user_id)
        if binding is not None:
            return binding.connection
        return self.elsewhere.connection_of(user_id) if self.elsewhere is not None else None

    def _offline(self, call: Call) -> None:
        """480; saying so when the pair's calls failed since its last success (pairs.py)."""
        gave_up = self.pairs.failed(call.caller_id, call.callee_id, call.caller_conn.peer[0]) > 0
        self.feed(call, CallInputs.refused, 480, kerjo.PAIR_FAILED_REASON if gave_up else None)

    # -- responses ---------------------------------------------------------------------

    def _response(self, conn: SignalingConnection, response: Response) -> None:
        call_id = response.call_id or ""
        call = self._by_server_id.get(call_id)
        cseq = response.cseq
        if call is not None and call.callee_conn is conn and cseq is not None and cseq[1] == "INVITE":
            if top_branch(response) != call.invite_branch:
                log.debug("Response with a foreign branch for call {id}", id=call_id)
                return
            self._invite_response(call, response)
            return
        # Answers to the CANCELs and BYEs the server sent, or strays.
        log.debug("Absorbed {code} for {cseq} from {peer}", code=response.code, cseq=cseq, peer=conn.peer)

    def _invite_response(self, call: Call, response: Response) -> None:
        code = response.code
        if code < 200:
            if code != 100 and call.machine.phase() is Phase.RINGING:
                call.answer(messages.answer(call, call.invite, code, response.reason))
            return
        if code >= 300:
            self.feed(call, CallInputs.rejected, response)
            return
        if call.machine.phase() is not Phase.RINGING:
            self.feed(call, CallInputs.late_answer, response)
            return
        try:
            if _content_type(response) != "application/sdp":
                raise SDPError("no SDP")
            sdp = parse_offer(response.body)
        except SDPError as exc:
            log.info("Call {id}: unusable answer from {callee}: {why}", id=call.server_call_id,
                     callee=call.callee_id, why=str(exc))
            self.feed(call, CallInputs.bad_answer, response)
            return
        self.feed(call, CallInputs.answered, response, sdp)
