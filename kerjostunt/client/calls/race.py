"""
The connection race of one call: every technique at once, the first verified connection wins.

The peer's host candidates on a shared LAN, its passive candidates, the
punch and (between a random NAT and an easy one) the birthday search all
start at the dial moment the server chose; each connection runs the per-call
handshake, and the first to pass it is the call's connection.  The peer may
reach our app port before that moment: such a connection contends too.

The race's life is a state machine (``waiting`` for the dial moment ->
``dialing`` -> ``done``); its bookkeeping (timers, connects in flight,
contenders, the result fired once) is the ``Contest`` the punch and the
birthday search use as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.appport import CallHandshakeFactory, PreambleFactory, call_tag
from kerjostunt.client.calls.explain import explain, word_of
from kerjostunt.client.calls.family import FAMILY_STAGGER, FamilyRace
from kerjostunt.client.calls.relayrace import RelayRace
from kerjostunt.client.calls.setup import CallSetup, ConnectFailed, Endpoint, reason_of, screened
from kerjostunt.client.nat import birthday
from kerjostunt.client.nat.contest import Contest
from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.client.nat.punch import PunchFailed, PunchPlan, PunchResult, punch
from kerjostunt.client.nat.sockets import SocketReactor, abort_protocol, connect_from
from kerjostunt.client.nat.turn import Allocation
from kerjostunt.wire.candidates import Scope, is_loopback
from kerjostunt.wire.kerjo import RELAY_FALLBACK, RELAY_NOW
from kerjostunt.wire.prediction import SEQUENTIAL, NATDescription, no_technique
from kerjostunt.wire.sdp import MAPPING_FOUNDATION, Candidate

__all__ = ["FAMILY_STAGGER", "RETRY_JITTER", "DialResult", "Dialer", "DialerConfig"]

log = Logger()

RETRY_JITTER = 0.2  # seconds added at random to each punch retry (PunchPlan.retry_jitter)


@dataclass(frozen=True)
class DialResult:
    protocol: object
    outcome: str
    technique: str
    remote: Endpoint
    elapsed: float


@dataclass(frozen=True)
class DialerConfig:
    """How long and how hard one call's race tries (the agent's punch settings)."""

    #: seconds the punch (and the birthday search, at most birthday.WINDOW) may take
    deadline: float = 10.0
    #: TTL of the first SYN to each punch candidate (None: no priming)
    low_ttl: int | None = 2
    handshake_timeout: float = 5.0
    direct_timeout: float = 3.0
    #: the peer's "use STUNT" flag is set: no direct attempt to its public candidates
    stunt_only: bool = False
    #: we offered our gateway's port mapping: the peer may dial it up to direct_timeout after the dial moment
    offered_mapping: bool = False


class _RaceInputs(Protocol):
    """What happens to a race; the machine below says what each means in each state."""

    def begin(self) -> None:
        "The dial moment."

    def contend(self, protocol: Any, remote: Endpoint, outcome: str, technique: str) -> None:
        "A connection in handshake (dialed, or accepted on the app port)."

    def check(self) -> None:
        "An attempt ended without a winner: is anything left?"

    def win(self, result: DialResult) -> None:
        "A connection passed the handshake."

    def fail(self, failure: ConnectFailed) -> None:
        "Give up: every attempt failed, the safety net fired, or the call stopped."

    def finished(self) -> bool:
        "Has the race ended?"

    def phase(self) -> str:
        "The state's name (for agent.py's ``dialer.state`` until it asks ``finished``)."


class Dialer(RelayRace):
    """
    All techniques of one call at once; the first verified connection wins.

    ``result`` fires with a DialResult or fails with ConnectFailed naming
    every attempt's last error.  ``stunt_only``: the peer's "use STUNT" flag
    says its public endpoint is closed, so it is skipped; ``own_probes``:
    this call's ProbeResults (the birthday roles).
    """

    def __init__(
        self,
        reactor: SocketReactor,
        setup: CallSetup,
        app_factory: IProtocolFactory,
        *,
        local_ip: str,
        punch_port: int,
        own_public_ip: str | None,
        config: DialerConfig = DialerConfig(),
        own_probes: Sequence[ProbeResult] = (),
        server_ip: str | None = None,
        ipv6_punch: Endpoint | None = None,
    ) -> None:
        self.reactor = reactor
        self.ipv6_punch = ipv6_punch
        self.setup = setup
        self.local_ip = local_ip
        self.punch_port = punch_port
        self.lan = setup.peer_public is not None and setup.peer_public == own_public_ip
        #: the peer's candidates we may dial (wire/candidates.py), whatever the server sent;
        #: loopback only when our server is on this host (a local fact, not what it said)
        self.remote = screened(setup, Scope(
            same_network=self.lan,
            local=is_loopback(server_ip or local_ip),
            own=frozenset([server_ip]) if server_ip else frozenset(),
        ))
        self.config = config
        self.stunt_only = config.stunt_only
        self.own_probes = list(own_probes)
        self.handshakes = CallHandshakeFactory(
            setup.secret, setup.handshake_id, setup.role, app_factory, reactor, config.handshake_timeout)
        self.tag = call_tag(setup.secret, setup.handshake_id)
        self.dial_at = reactor.seconds()
        self.pending = 0
        self.errors: list[str] = []
        self._contest: Contest[DialResult] = Contest(reactor, cancelled=lambda: self.stop("cancelled"))
        self._punch: defer.Deferred[PunchResult] | None = None  # the punch, once started
        self._lan_dialed = False
        #: [technique, result] per attempt, in start order ("" while it runs)
        self._tried: list[list[str]] = []
        self._try_of: dict[int, int] = {}  # id(protocol) -> its attempt, during the handshake
        self._nats: tuple[NATDescription | None, NATDescription | None] = (None, None)
        # the relay (nat/relay.py): the allocation in use, whether the caller's dial started, why it failed
        self._relay: Allocation | None = None
        self._relay_started = False
        self._relay_error = ""
        self._won = ""
        self._contest.on_close(self._release_relay)
        self._early: set[Endpoint] = set()  # dialed before the dial moment (start)
        self._family = FamilyRace(self._contest, self._staggered)  # when IPv4 starts, if at all
        self._life = _RaceMachine(self)

    @property
    def result(self) -> defer.Deferred[DialResult]:
        return self._contest.result

    @property
    def finished(self) -> bool:
        """The race has ended (won, failed or stopped); an app-port connection now is dropped."""
        return self._life.finished()

    def phase(self) -> str:
        """The machine's state by name, for logs and tests; decisions ask the machine instead."""
        return self._life.phase()

    def tried(self) -> tuple[tuple[str, str], ...]:
        """(technique, result) per attempt in start order; one still running when the race ended: cancelled."""
        return tuple((t, r or "cancelled") for t, r in self._tried)

    def _begin_try(self, technique: str, result: str = "") -> int:
        self._tried.append([technique, result])
        return len(self._tried) - 1

    def _end_try(self, index: int | None, result: str) -> None:
        if index is not None and not self._tried[index][1]:
            self._tried[index][1] = result

    # planning ------------------------------------------------------------------

    def direct_candidates(self) -> list[tuple[Candidate, str]]:
        """Passive candidates to connect to plainly: host ones only on a shared LAN."""
        remote = self.remote
        plan: list[tuple[Candidate, str]] = []
        if self.lan:
            plan += [(c, "lan") for c in remote.of_type("host", "passive")]
        if self.lan and plan:
            # Its public candidates are our own NAT's address: only a hairpin NAT would pass
            # them, and a sequential NAT would give each a port another call was promised.
            return plan
        # The peer's own port mapping first: its gateway opened it, whatever the flag says.
        plan += [(c, "port-mapping") for c in remote.of_type("srflx", "passive") if c.foundation == MAPPING_FOUNDATION]
        if not self.stunt_only:
            plan += [(c, "public") for c in remote.of_type("srflx", "passive")
                     if c.foundation != MAPPING_FOUNDATION and c.endpoint not in {p.endpoint for p, _ in plan}]
        return plan

    def ipv6_candidates(self) -> tuple[Endpoint, ...]:
        """The peer's IPv6 punch endpoints when both sides have one (signaling over IPv4)."""
        if self.ipv6_punch is None:
            return ()
        return tuple(c.endpoint for c in self.setup.remote.other_family("so") if ":" in c.ip and c.port)

    def punch_candidates(self) -> tuple[Endpoint, ...]:
        """The predicted endpoints best first, then the peer's punch port itself."""
        remote = self.remote
        ordered = sorted(remote.of_type("prflx"), key=lambda c: -c.priority)
        so = remote.punch_candidate
        if so is not None:
            ordered.append(so)
        seen: list[Endpoint] = []
        for c in ordered:
            if c.endpoint not in seen and c.port:
                seen.append(c.endpoint)
        return tuple(seen)

    # the outside world -----------------------------------------------------------

    def start(self, delay: float) -> defer.Deferred[DialResult]:
        """Dial ``delay`` seconds from now; the peer's LAN candidates at once.

        A connect inside our LAN needs no simultaneous open and takes no NAT
        port, so it need not wait for the moment both SYNs leave together.
        """
        self.dial_at = self.reactor.seconds() + delay
        self._contest.later(delay, self._life.begin)
        if self._relay_due(RELAY_NOW):
            # Nothing to synchronise with the peer's SYNs: the relay starts now, not at the dial moment.
            self._start_relay()
        early = {"lan", "port-mapping"} if self._may_dial_mapping_early() else {"lan"}
        for candidate, technique in self.direct_candidates():
            if technique in early:
                self._early.add(candidate.endpoint)
                self._dial_direct(candidate.endpoint, technique)
        return self.result

    def _may_dial_mapping_early(self) -> bool:
        """The peer's port mapping is a plain connect: no SYNs to cross, so it need not
        wait for the dial moment either (NAT lab: p50 314 -> 271 ms), unless our own NAT
        is sequential, whose predicted window assumes the punch's SYNs come first."""
        own_nat = birthday.describe_own(self.own_probes, self.local_ip)
        return own_nat is None or own_nat.allocation != SEQUENTIAL

    def accepted(self, protocol: Any, remote: Endpoint) -> None:
        """A connection the peer made to our app port, already in handshake (from outside our
        LAN: through the gateway's mapping when we offered one)."""
        outside = "port-mapping" if self.config.offered_mapping else "public"
        self._life.contend(protocol, remote, "direct", "lan" if self.lan else outside)

    def stop(self, why: str) -> None:
        """Abandon the call (CANCEL/BYE, timeout, agent stopping)."""
        self._life.fail(ConnectFailed(why))

    # dialing (outputs of the machine) ----------------------------------------------

    def _dial_all(self) -> None:
        """The dial moment: the IPv6 punch first, the rest after the stagger or never (family.py).

        Without an IPv6 path the rest starts at once. A pending count holds
        the staggered start, so an IPv6 punch that fails before it does not
        end the race.
        """
        if not self._start_ipv6():
            self._dial_ipv4()
            return
        self.pending += 1
        self._family.arm()

    def _staggered(self) -> None:
        self.pending -= 1
        self._dial_ipv4()

    def _start_ipv6(self) -> bool:
        """The IPv6 simultaneous open through both stateful firewalls (docs/punching.rst, "ipv6")."""
        candidates = self.ipv6_candidates()
        if self.ipv6_punch is None or not candidates:
            return False
        # No low hop-limit priming: there is no NAT mapping to make, and through a
        # dropping firewall the primed SYN's conntrack entry made the peer's SYN-ACK
        # out of window now and then (NAT lab: p50 350 ms primed, 296 unprimed).
        plan = PunchPlan(local=self.ipv6_punch, candidates=candidates, deadline=self.config.deadline,
                         low_ttl=None, retry_jitter=RETRY_JITTER, grace=self.handshakes.proof_wait)
        self.pending += 1
        attempt = self._begin_try("ipv6")
        d = self._contest.track(punch(self.reactor, plan, self._family.wrap(self.handshakes)))
        d.addCallbacks(self._ipv6_won, self._ipv6_failed, callbackArgs=(attempt,), errbackArgs=(attempt,))
        return True

    def _ipv6_failed(self, reason: Failure, attempt: int) -> None:
        self._technique_failed(reason, "ipv6: ", attempt)
        if not reason.check(defer.CancelledError):
            self._family.ipv6_failed()  # a held IPv4 start goes now

    def _ipv6_won(self, result: PunchResult, attempt: int) -> None:
        self.pending -= 1
        self._end_try(attempt, "connected")
        self._life.win(DialResult(result.protocol, "stunt", "ipv6", result.remote, self.elapsed()))

    def _dial_ipv4(self) -> None:
        """Every technique of the signaling family, in the order that keeps the predictions true."""
        log.debug("call {call}: dialing as {role}", call=self.setup.call_id, role=self.setup.role)
        if self._relay_due(RELAY_NOW):
            self._start_relay()  # (started already in ``start``; here for a race begun otherwise)
        # Host candidates on our own LAN first (cheapest, and they take no
        # NAT port).  Then the punch, before any connect that leaves through
        # the NAT: a sequential NAT gives every new connection the next port,
        # and the predicted window assumes the punch's SYNs are the first
        # after the probes (NAT lab, test_sequential).
        direct = self.direct_candidates()
        for candidate, technique in direct:
            if technique == "lan" and candidate.endpoint not in self._early:
                self._dial_direct(candidate.endpoint, technique)
        own_nat = birthday.describe_own(self.own_probes, self.local_ip)
        peer_nat = birthday.parse_nat_header(self.setup.peer_nat)
        self._nats = (own_nat, peer_nat)
        skip_punch = self._needless(peer_nat, direct) or _hopeless(own_nat, peer_nat)
        if skip_punch:
            self._begin_try("punch", "skipped")
            self.errors.append(f"punch: {skip_punch}")
        else:
            self._start_punch()
        for candidate, technique in direct:
            if technique != "lan" and candidate.endpoint not in self._early:
                self._dial_direct(candidate.endpoint, technique)
        # The birthday technique last: its hard side opens hundreds of
        # sockets in this turn, which would delay the direct connects by
        # tens of ms (NAT lab: random NAT to a public peer).
        skip_birthday = skip_punch or _reversed(own_nat, peer_nat, self.peer_unnatted(peer_nat))
        if skip_birthday:
            if skip_birthday != skip_punch:
                self._begin_try("birthday", "skipped")
                self.errors.append(f"birthday: {skip_birthday}")
        else:
            self._start_birthday(own_nat, peer_nat)
        # A safety net: the punch ends at its deadline (plus the grace of a handshake in flight).
        self._contest.later(self.config.deadline + self.handshakes.proof_wait + 1.0, self._give_up)
        # Attempts that failed at once were counted; the machine looks at
        # them only now that every technique has started.
        self._life.check()

    def _needless(self, peer_nat: NATDescription | None, direct: list[tuple[Candidate, str]]) -> str:
        """Why a punch (and a birthday search) would only cost NAT ports here, or "".

        A peer on our LAN is dialed on its host candidates: a punch towards
        our own NAT's public address needs a hairpin NAT, and through a
        sequential NAT each of its SYNs would take a port another call was
        promised (NAT lab, issue 12).  A peer with a public address whose
        endpoint is open is dialed directly: one outbound connect, the
        connection reversal, instead of a punch from behind our NAT.
        """
        techniques = {technique for _, technique in direct}
        if self.lan and "lan" in techniques:
            return "not tried: the peer is on our LAN"
        if self.peer_unnatted(peer_nat) and not self.stunt_only and "public" in techniques:
            return "not tried: the peer has a public address, dialed directly"
        return ""

    def peer_unnatted(self, peer_nat: NATDescription | None) -> bool:
        """The peer has no NAT: its own punch address is the public one the server sees it at.

        The addresses decide where both are known: a preserving NAT whose
        mappings all kept their ports looks like no NAT in the probes.
        """
        punch = self.remote.punch_candidate
        if punch is not None and self.setup.peer_public is not None:
            return punch.ip == self.setup.peer_public
        return peer_nat is not None and not peer_nat.behind_nat

    def _dial_direct(self, endpoint: Endpoint, technique: str) -> None:
        self.pending += 1
        attempt = self._begin_try(technique)
        try:
            d = connect_from(
                self.reactor, (self.local_ip, 0), endpoint,
                PreambleFactory(self.handshakes, self.tag), timeout=self.config.direct_timeout,
            )
        except OSError as e:
            self._attempt_failed(f"{technique} {endpoint[0]}:{endpoint[1]}: {e}", attempt)
            return

        def connected(protocol: Any) -> None:
            self.pending -= 1  # the handshake takes over the count
            self._try_of[id(protocol)] = attempt
            self._life.contend(protocol, endpoint, "direct", technique)

        def failed(reason: Failure) -> None:
            if reason.check(defer.CancelledError):
                return
            self._attempt_failed(f"{technique} {endpoint[0]}:{endpoint[1]}: {reason_of(reason)}", attempt)

        self._contest.track(d).addCallbacks(connected, failed)

    def _start_punch(self) -> None:
        candidates = self.punch_candidates()
        if not candidates:
            return
        plan = PunchPlan(
            local=(self.local_ip, self.punch_port),
            candidates=candidates,
            deadline=self.config.deadline,
            low_ttl=self.config.low_ttl,
            # Peers whose first SYNs missed each other (start skew of
            # more than one one-way delay, NATs that answer RST) would
            # otherwise retry in lockstep and miss every time.
            retry_jitter=RETRY_JITTER,
            grace=self.handshakes.proof_wait,
        )
        self.pending += 1
        attempt = self._begin_try("punch")
        self._punch = self._contest.track(punch(self.reactor, plan, self.handshakes))
        self._punch.addCallbacks(self._technique_won, self._technique_failed, callbackArgs=(attempt,),
                                 errbackArgs=("punch: ", attempt))

    def _start_birthday(self, own_nat: NATDescription | None, peer_nat: NATDescription | None) -> None:
        """The birthday technique when one NAT is random and the other's mapping
        endpoint-independent (birthday.py); it runs beside the punch."""
        role, why = birthday.choose_role(own_nat, peer_nat)
        candidates = self.punch_candidates()
        if role is None or not candidates:
            if why:
                self.errors.append(f"birthday: {why}")
            return
        plan = birthday.plan_for_call(
            role, local_ip=self.local_ip, punch_port=self.punch_port, peer_endpoint=candidates[0],
            deadline=self.config.deadline, low_ttl=self.config.low_ttl, grace=self.handshakes.proof_wait,
        )
        self.pending += 1
        attempt = self._begin_try("birthday")
        d = self._contest.track(birthday.birthday(self.reactor, plan, self.handshakes))
        d.addCallbacks(self._technique_won, self._technique_failed, callbackArgs=(attempt,),
                       errbackArgs=("", attempt))

    def _technique_won(self, result: PunchResult, attempt: int) -> None:
        self.pending -= 1
        self._end_try(attempt, "connected")
        self._life.win(DialResult(result.protocol, "stunt", result.technique, result.remote, self.elapsed()))

    def _technique_failed(self, reason: Failure, prefix: str, attempt: int) -> None:
        """The punch (prefix ``punch: ``) or the birthday search (which names itself) gave up."""
        if reason.check(defer.CancelledError):
            return
        why = reason.value.reason if isinstance(reason.value, PunchFailed) else reason_of(reason)
        self._attempt_failed(prefix + why, attempt)

    def _watch(self, protocol: Any, remote: Endpoint, outcome: str, technique: str) -> None:
        """A contender: it wins when its handshake passes."""
        self.pending += 1
        attempt = self._try_of.pop(id(protocol), None)
        if attempt is None:  # the peer reached our app port
            attempt = self._begin_try("accepted" if technique == "public" else technique)

        def ok(app: Any) -> None:
            self.pending -= 1
            self._end_try(attempt, "connected")
            if not self.finished:
                self._won = technique
            self._life.win(DialResult(app, outcome, technique, remote, self.elapsed()))

        def bad(reason: Failure) -> None:
            self._end_try(attempt, "handshake")
            self._attempt_failed(f"{technique} {remote[0]}:{remote[1]}: {reason_of(reason)}")

        self._contest.contend(protocol, ok, bad)

    def elapsed(self) -> float:
        """Seconds since the dial moment (0 before it): the outcome's ``elapsed_ms``."""
        return max(0.0, self.reactor.seconds() - self.dial_at)

    # ending --------------------------------------------------------------------

    def _attempt_failed(self, why: str, attempt: int | None = None) -> None:
        self.pending -= 1
        self._end_try(attempt, word_of(why))
        self.errors.append(why)
        self._life.check()

    def explain(self) -> str:
        """The closest technique and what to try (``explain.py``): the end of the ``failed:`` line."""
        return explain(self.tried(), *self._nats)

    def _check_exhausted(self) -> None:
        if self.pending > 0:
            return
        if self._relay_due(RELAY_FALLBACK):
            self._start_relay()  # the direct techniques failed: now the relay
            return
        if self._awaiting_mapping():
            return
        self._life.fail(ConnectFailed(self._reason("all techniques failed: ", "nothing to dial")))

    def _awaiting_mapping(self) -> bool:
        """Our own attempts are over, but the peer may still be dialing our port mapping
        (a random NAT facing another: the mapping is the only way in): look again later."""
        left = self.dial_at + self.config.direct_timeout - self.reactor.seconds()
        if not self.config.offered_mapping or left <= 0:
            return False
        self._contest.later(left, self._life.check)
        return True

    def _give_up(self, patient: bool = True) -> None:
        if patient and self._contest.in_flight:  # a handshake in flight gets its time, once (contest.py)
            self._contest.later(self.handshakes.proof_wait, self._give_up, False)
            return
        for entry in self._tried:  # still running at the safety net: out of time, not beaten
            entry[1] = entry[1] or "timeout"
        self._life.fail(ConnectFailed(self._reason("no verified connection in time: ", "no answer")))

    def _reason(self, prefix: str, nothing: str) -> str:
        """What failed; a relay that was tried and failed first (``relay: ...``): it was the last resort."""
        if self._relay_error:
            others = [e for e in self.errors if not e.startswith("relay: ")]
            return f"relay: {self._relay_error}" + (f" (before it: {'; '.join(others)})" if others else "")
        return prefix + "; ".join(self.errors or [nothing]) + " -- " + self.explain()


def _hopeless(own: NATDescription | None, peer: NATDescription | None) -> str:
    """Why punching cannot work (prediction.no_technique), or "". The direct attempts still run."""
    why = no_technique(own, peer)
    return f"not tried: {why}" if why else ""


def _reversed(own: NATDescription | None, peer: NATDescription | None, peer_unnatted: bool) -> str:
    """Why the birthday search is not needed, or "": one side has a public address.

    The side behind the NAT dials the public one (``public`` technique, one
    connect); seen before: a public peer and a random NAT met by birthday
    with 512 sockets and 2,048 guesses where that one connect did.
    """
    if own is not None and not own.behind_nat and not peer_unnatted:
        return "not tried: the peer's NAT dials our public address"
    if peer_unnatted and (own is None or own.behind_nat):
        return "not tried: the peer has a public address"
    return ""


# -- the machine ---------------------------------------------------------------------

_race = TypeMachineBuilder(_RaceInputs, Dialer)
_waiting = _race.state("waiting")
_dialing = _race.state("dialing")
_done = _race.state("done")


@_waiting.upon(_RaceInputs.begin).to(_dialing)
def _begin(inputs: _RaceInputs, race: Dialer) -> None:
    race._dial_all()


@_waiting.upon(_RaceInputs.contend).loop()
@_dialing.upon(_RaceInputs.contend).loop()
def _contend(inputs: _RaceInputs, race: Dialer, protocol: Any, remote: Endpoint, outcome: str,
             technique: str) -> None:
    race._watch(protocol, remote, outcome, technique)


@_done.upon(_RaceInputs.contend).loop()
def _too_late(inputs: _RaceInputs, race: Dialer, protocol: Any, remote: Endpoint, outcome: str,
              technique: str) -> None:
    abort_protocol(protocol)


@_dialing.upon(_RaceInputs.check).loop()
def _check(inputs: _RaceInputs, race: Dialer) -> None:
    race._check_exhausted()


@_waiting.upon(_RaceInputs.win).to(_done)
@_dialing.upon(_RaceInputs.win).to(_done)
def _win(inputs: _RaceInputs, race: Dialer, result: DialResult) -> None:
    race._contest.win(result)


@_waiting.upon(_RaceInputs.fail).to(_done)
@_dialing.upon(_RaceInputs.fail).to(_done)
def _fail(inputs: _RaceInputs, race: Dialer, failure: ConnectFailed) -> None:
    race._contest.lose(failure)


# Before the dial moment nothing is exhausted; once done, nothing more happens.
_dialing.upon(_RaceInputs.begin).loop().returns(None)
_done.upon(_RaceInputs.begin).loop().returns(None)
_waiting.upon(_RaceInputs.check).loop().returns(None)
_done.upon(_RaceInputs.check).loop().returns(None)
_done.upon(_RaceInputs.win).loop().returns(None)
_done.upon(_RaceInputs.fail).loop().returns(None)
for _state, _over in ((_waiting, False), (_dialing, False), (_done, True)):
    _state.upon(_RaceInputs.finished).loop().returns(_over)
    _state.upon(_RaceInputs.phase).loop().returns(_state.name)

_RaceMachine = _race.build()
