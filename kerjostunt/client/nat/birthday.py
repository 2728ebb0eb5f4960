"""
The birthday technique: a TCP connection between a random NAT and an easy one.

A NAT that allocates a random external port for every new 5-tuple (Linux
``masquerade random``) cannot be predicted, and its filtering lets in only
packets that match a mapping it made.  Simultaneous open then needs luck,
and the birthday paradox makes the luck cheap:

- the *hard* side (random NAT) opens many sockets, each from its own fresh
  local port, all dialing the *easy* side's one predicted endpoint.  Each
  SYN makes one mapping ``H:h_i -> E:e`` in the hard NAT; the sockets stay in
  SYN_SENT;
- the *easy* side (endpoint-independent mapping: every connection from its
  punch port leaves as the same ``E:e``) dials, from the punch port, many
  random ports of the hard side's public IP, paced.  A guess that equals one
  of the ``h_i`` matches that mapping: the hard NAT forwards it to the socket
  in SYN_SENT, which answers (simultaneous open), and the easy NAT lets the
  answer in because the guess made the matching mapping.

With n hard mappings out of P ~ 64512 ports and m distinct guesses, a miss
has probability about ``exp(-n*m/P)``: n=256, m=2048 gives ~3e-4.  The
connection then passes the per-call handshake like any other.

Against an easy NAT that answers unsolicited SYNs with RST, the hard side's
SYNs must not reach it (the RST would kill the socket and close the
mapping), so each is sent with a low TTL: it makes the mapping and dies at a
router on the way.  Linux aborts a connecting socket on the ICMP time
exceeded, so a socket that gets one is redialed at once from the same port
(same 5-tuple, same mapping); routers rate-limit those ICMPs (Linux: a burst
of 6, then one a second per destination), so most sockets never see one.
The kernel's own SYN retransmission (after 1 s) would leave with the normal
TTL, so each socket still in SYN_SENT after ``cycle`` (< 1 s) is closed and
redialed, primed again.  A socket that already received the peer's SYN
(SYN_RECV, read with TCP_INFO) is left alone.

Both sides stop at ``deadline``: every socket still dialing is closed then,
and a connection whose handshake is in flight (our HELLO or our R out) may
still win within the handshake's time limit (``Contest.expire``: the peer may
already have committed to it).  Every socket is closed when the attempt ends
(won, failed, cancelled) and the number open at once is bounded (and kept
under RLIMIT_NOFILE).  See docs/punching.rst ("The birthday technique").
"""

from __future__ import annotations

import errno
import math
import os
import random
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.nat.contest import Contest, has_handshake
from kerjostunt.client.nat.punch import PunchFailed, PunchResult
from kerjostunt.client.nat.sockets import HeldConnect, SocketReactor, error_name
from kerjostunt.client.nat.sockets import abort_protocol as _drop
from kerjostunt.wire import kerjo
from kerjostunt.wire.prediction import EI, RANDOM, NATDescription, Sample, classify

log = Logger()

Endpoint = tuple[str, int]

TECHNIQUE = "birthday"
HARD = "hard"
EASY = "easy"

#: hard side: sockets (= mappings) kept in SYN_SENT towards the easy endpoint
HARD_SOCKETS = 512
#: easy side: distinct random ports dialed on the hard side's public IP
EASY_GUESSES = 2048
#: easy side: the guesses are spread over this many seconds
SPRAY_TIME = 0.8
#: easy side: at most this many guesses in flight at once
MAX_IN_FLIGHT = 1024
#: easy side: a guess unanswered this long is a miss
GUESS_TIMEOUT = 0.5
#: hard side: redial a socket still in SYN_SENT after this long, before the
#: kernel retransmits its SYN with the normal TTL (initial RTO: 1 s)
HARD_CYCLE = 0.8
#: both: the whole attempt ends this long after it started (or at the
#: caller's deadline, whichever comes first)
WINDOW = 4.0
#: easy side: start this long after the dial moment, so the hard side's
#: mappings exist when the first guesses arrive
EASY_START_DELAY = 0.02
#: descriptors left for everything else when sizing the attempt
FD_RESERVE = 256
#: ports a NAT allocates from at random (Linux: 1024-65535)
PORT_RANGE = (1024, 65535)

_TCP_SYN_RECV = 3


class BirthdayFailed(PunchFailed):
    """No guess met a mapping before the deadline (or the attempt could not run)."""


# -- deciding who does what -------------------------------------------------------


def parse_nat_header(value: str | None) -> NATDescription | None:
    """``X-Kerjo-NAT`` as the server sent it (:func:`kerjostunt.wire.kerjo.parse_nat`)."""
    return kerjo.parse_nat(value)


def describe_own(results: Sequence[Any], local_ip: str | None) -> NATDescription | None:
    """Our NAT from this call's probe results (``probing.ProbeResult``), or None."""
    samples = [
        Sample(
            local_port=r.local_port,
            mapped_ip=r.mapped_ip,
            mapped_port=r.mapped_port,
            server_ip=r.server[0],
            server_port=r.server[1],
            time=float(i),
            local_ip=local_ip,
        )
        for i, r in enumerate(results)
    ]
    return classify(samples) if samples else None


def _is_hard(nat: NATDescription | None) -> bool:
    return nat is not None and nat.allocation == RANDOM


def _is_easy(nat: NATDescription | None) -> bool:
    return nat is not None and (nat.mapping == EI or not nat.behind_nat) and nat.allocation != RANDOM


def choose_role(own: NATDescription | None, peer: NATDescription | None) -> tuple[str | None, str]:
    """
    ``(HARD | EASY | None, why)``.

    HARD: our NAT allocates at random and the peer's mapping is
    endpoint-independent; EASY: the other way round.  Both random: no
    technique can help (None).  Anything else is left to the punch.
    """
    if _is_hard(own) and _is_hard(peer):
        return None, "not tried: both NATs allocate ports at random"
    if _is_hard(own) and _is_easy(peer):
        return HARD, "our NAT is random, the peer's endpoint-independent"
    if _is_easy(own) and _is_hard(peer):
        return EASY, "the peer's NAT is random, ours endpoint-independent"
    if _is_hard(peer) or _is_hard(own):
        return None, "not tried: the other NAT's mapping is not known to be endpoint-independent"
    return None, ""


# -- the plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class BirthdayPlan:
    """
    One side of a birthday attempt.

    HARD: ``local`` is ``(ip, 0)`` (each socket binds its own fresh port on
    ``ip``), ``peer`` the easy side's predicted endpoint.  EASY: ``local`` is
    the punch port, ``peer`` is ``(hard side's public IP, 0)``; ``ports``
    fixes the guesses (tests), otherwise ``guesses`` distinct random ports of
    ``port_range``.  ``deadline``: seconds after the start (including
    ``start_delay``) by which the search stops; a connection whose handshake
    is in flight then may still take ``grace`` (``Contest.expire``).
    """

    role: str
    local: Endpoint
    peer: Endpoint
    deadline: float
    sockets: int = HARD_SOCKETS
    guesses: int = EASY_GUESSES
    ports: tuple[int, ...] | None = None
    port_range: tuple[int, int] = PORT_RANGE
    spray_time: float = SPRAY_TIME
    max_in_flight: int = MAX_IN_FLIGHT
    guess_timeout: float = GUESS_TIMEOUT
    cycle: float = HARD_CYCLE
    low_ttl: int | None = None
    start_delay: float = 0.0
    retry_interval: float = 0.05
    tick: float = 0.01
    grace: float = 10.0

    def __post_init__(self) -> None:
        if self.role not in (HARD, EASY):
            raise ValueError(f"role must be {HARD!r} or {EASY!r}")
        if self.deadline <= 0 or self.cycle <= 0 or self.guess_timeout <= 0 or self.tick <= 0:
            raise ValueError("deadline, cycle, guess_timeout and tick must be positive")
        if self.role == HARD and (self.sockets < 1 or not self.peer[1]):
            raise ValueError("a hard side needs at least one socket and the peer's port")
        if self.role == EASY and not self.local[1]:
            raise ValueError("an easy side dials from its punch port")

    def guess_ports(self) -> list[int]:
        if self.ports is not None:
            return list(self.ports)
        lo, hi = self.port_range
        count = min(self.guesses, hi - lo + 1)
        return random.SystemRandom().sample(range(lo, hi + 1), count)


def plan_for_call(
    role: str,
    *,
    local_ip: str,
    punch_port: int,
    peer_endpoint: Endpoint,
    deadline: float,
    low_ttl: int | None,
    grace: float = 10.0,
) -> BirthdayPlan:
    """The plan a call's dialer uses (module defaults, bounded by the punch deadline;
    ``grace``: the handshake's ``proof_wait``)."""
    if role == HARD:
        return BirthdayPlan(HARD, (local_ip, 0), peer_endpoint, min(WINDOW, deadline), low_ttl=low_ttl,
                            grace=grace)
    return BirthdayPlan(
        EASY, (local_ip, punch_port), (peer_endpoint[0], 0), min(WINDOW, deadline),
        start_delay=EASY_START_DELAY, grace=grace,
    )


def birthday(reactor: SocketReactor, plan: BirthdayPlan, protocol_factory: IProtocolFactory) -> Deferred[PunchResult]:
    """
    Run one side of the birthday technique; fires with a ``PunchResult``
    (``technique='birthday'``) or fails with ``BirthdayFailed``.

    As with ``punch``, a factory whose protocols carry ``handshake_done``
    (a HandshakeFactory) makes a connection count only once its handshake
    succeeded.  Cancelling the Deferred closes everything.
    """
    return _Birthday(reactor, plan, protocol_factory).start()


def fd_budget(reserve: int = FD_RESERVE) -> int:
    """How many more descriptors this process may open, minus ``reserve``.

    Raises the soft RLIMIT_NOFILE to the hard limit first (no privilege needed).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    limit = soft if soft != resource.RLIM_INFINITY else 65536
    return max(0, limit - in_use - reserve)


# -- the attempt ------------------------------------------------------------------------


class _Birthday:
    """One side of one attempt; its life is its Contest (open until won, failed or cancelled)."""

    def __init__(self, reactor: SocketReactor, plan: BirthdayPlan, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.plan = plan
        self.factory = factory
        self.contest: Contest[PunchResult] = Contest(reactor)
        self.contest.on_close(self.close_all)
        self.started = 0.0
        self.attempts = 0
        self.open: set[HeldConnect] = set()
        self.peak_open = 0
        self.errors: dict[str, int] = {}
        self.guesses: list[int] = []
        self.sprayed = False
        self.limit = 0

    # starting ---------------------------------------------------------------

    def start(self) -> Deferred[PunchResult]:
        self.started = self.reactor.seconds()
        self.contest.later(self.plan.deadline, self.expire)
        budget = fd_budget()
        if self.plan.role == HARD:
            self.limit = min(self.plan.sockets, budget)
        else:
            self.limit = min(self.plan.max_in_flight, budget)
            self.guesses = self.plan.guess_ports()
        if self.limit < 1:
            self.contest.lose(BirthdayFailed(f"birthday ({self.plan.role}): no file descriptors to spare"))
            return self.contest.result
        begin = self.open_hard if self.plan.role == HARD else self.spray
        if self.plan.start_delay > 0:
            self.contest.later(self.plan.start_delay, begin)
        else:
            begin()
        return self.contest.result

    def remaining(self) -> float:
        return self.started + self.plan.deadline - self.reactor.seconds()

    def _dial(self, local: Endpoint, remote: Endpoint, ttl: int | None,
              done: Callable[[HeldConnect, int], None]) -> tuple[HeldConnect | None, int]:
        """A new attempt (and 0), or None and the errno that prevented it."""
        try:
            attempt = HeldConnect(self.reactor, local, remote, ttl, done)
        except OSError as e:
            code = e.errno or errno.EINVAL
            self._note(code)
            return None, code
        self.attempts += 1
        self.open.add(attempt)
        self.peak_open = max(self.peak_open, len(self.open))
        return attempt, 0

    def _note(self, code: int) -> None:
        name = error_name(code)
        self.errors[name] = self.errors.get(name, 0) + 1

    # the hard side ----------------------------------------------------------

    def open_hard(self) -> None:
        if self.contest.over:
            return
        for _ in range(self.limit):
            if self.dial_hard(0) is None:
                break
        if not self.open:
            self.contest.lose(BirthdayFailed(f"birthday (hard): could not open a socket ({self._errors()})"))
            return
        log.debug("birthday (hard): {n} sockets dialing {peer}", n=len(self.open), peer=self.plan.peer)

    def dial_hard(self, port: int) -> HeldConnect | None:
        """Dial the easy endpoint from ``port`` (0: a fresh one), primed when configured."""
        if self.contest.over or self.remaining() <= 0:
            return None
        attempt, _ = self._dial((self.plan.local[0], port), self.plan.peer, self.plan.low_ttl, self.hard_done)
        if attempt is None:
            if port:
                self.contest.later(self.plan.retry_interval, self.dial_hard, port)
            return None
        attempt.timer = self.reactor.callLater(min(self.plan.cycle, self.remaining()), self.hard_cycle, attempt)
        return attempt

    def hard_cycle(self, attempt: HeldConnect) -> None:
        attempt.timer = None
        if self.contest.over or attempt not in self.open:
            return
        if attempt.tcp_state() == _TCP_SYN_RECV:
            # The peer's guess arrived: the final ACK is on its way.
            attempt.timer = self.reactor.callLater(
                min(self.plan.cycle, max(self.remaining(), 0.0)), self.hard_cycle, attempt)
            return
        self.open.discard(attempt)
        attempt.close()
        self.dial_hard(attempt.port)

    def hard_done(self, attempt: HeldConnect, code: int) -> None:
        self.open.discard(attempt)
        if self.contest.over:
            attempt.close()
            return
        if code == 0:
            self.connected(attempt, redial=attempt.port)
            return
        attempt.close()
        self._note(code)
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH) and attempt.primed:
            # The primed SYN died on the way, as meant; the mapping survives.
            self.dial_hard(attempt.port)
        else:
            self.contest.later(self.plan.retry_interval, self.dial_hard, attempt.port)

    # the easy side ----------------------------------------------------------

    def spray(self) -> None:
        if self.contest.over:
            return
        ticks = max(1, int(self.plan.spray_time / self.plan.tick))
        per_tick = max(1, math.ceil(len(self.guesses) / ticks))
        room = self.limit - len(self.open)
        for _ in range(min(per_tick, room)):
            if not self.guesses or self.remaining() <= 0:
                break
            port = self.guesses.pop()
            attempt, code = self._dial(self.plan.local, (self.plan.peer[0], port), None, self.easy_done)
            if attempt is None:
                if code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL):
                    self.guesses.append(port)  # out of resources: try again next tick
                    break
                continue
            attempt.timer = self.reactor.callLater(
                min(self.plan.guess_timeout, self.remaining()), self.easy_missed, attempt)
        if self.guesses and self.remaining() > 0:
            self.contest.later(self.plan.tick, self.spray)
        else:
            self.sprayed = True
            self.check_exhausted()

    def easy_done(self, attempt: HeldConnect, code: int) -> None:
        self.open.discard(attempt)
        if self.contest.over:
            attempt.close()
            return
        if code == 0:
            self.connected(attempt, redial=None)
            return
        attempt.close()
        self._note(code)
        self.check_exhausted()

    def easy_missed(self, attempt: HeldConnect) -> None:
        attempt.timer = None
        if attempt not in self.open:
            return
        self.open.discard(attempt)
        attempt.close()
        self._note(errno.ETIMEDOUT)
        self.check_exhausted()

    def check_exhausted(self) -> None:
        if (not self.contest.over and self.plan.role == EASY and self.sprayed
                and not self.open and not self.contest.contenders):
            self.contest.lose(BirthdayFailed(self._failure_text("all guesses missed")))

    # a connection -------------------------------------------------------------

    def connected(self, attempt: HeldConnect, redial: int | None) -> None:
        remote = attempt.remote
        try:
            protocol = attempt.adopt(self.factory)
        except Exception as e:  # the reactor refused the descriptor
            self._note(getattr(e, "errno", None) or errno.EBADF)
            protocol = None
        if protocol is None:
            if redial:
                self.dial_hard(redial)
            return
        if not has_handshake(protocol):
            self.won(protocol, protocol, remote)
            return
        def ok(app: Any) -> None:
            self.won(protocol, app, remote)

        def bad(reason: Failure) -> None:
            if self.contest.over:
                return
            self.errors["handshake failed"] = self.errors.get("handshake failed", 0) + 1
            if redial:
                self.contest.later(self.plan.retry_interval, self.dial_hard, redial)
            self.check_exhausted()

        self.contest.contend(protocol, ok, bad)

    def won(self, wrapper: Any, app: Any, remote: Endpoint) -> None:
        if self.contest.settled:
            _drop(wrapper)
            return
        result = PunchResult(
            protocol=app, remote=remote, technique=TECHNIQUE,
            attempts=self.attempts, elapsed=self.reactor.seconds() - self.started,
        )
        log.info(
            "birthday ({role}): connected {host}:{port} after {attempts} dials in {elapsed:.3f} s "
            "(at most {peak} sockets open at once)",
            role=self.plan.role, host=remote[0], port=remote[1], attempts=self.attempts,
            elapsed=result.elapsed, peak=self.peak_open,
        )
        self.contest.win(result)

    # ending -------------------------------------------------------------------

    def _errors(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "no answers"

    def _failure_text(self, why: str) -> str:
        if self.plan.role == HARD:
            what = f"{self.limit} sockets dialing {self.plan.peer[0]}:{self.plan.peer[1]}"
        else:
            what = f"guesses at {self.plan.peer[0]}"
        return (f"birthday ({self.plan.role}): {why} within {self.plan.deadline:g} s; "
                f"{self.attempts} dials, {what}, at most {self.peak_open} open at once ({self._errors()})")

    def expire(self) -> None:
        """The deadline: every socket still dialing closes now; a connection whose
        handshake is in flight may still win within the grace (``Contest.expire``)."""
        if not self.contest.over:
            self.close_all()
            self.contest.expire(BirthdayFailed(self._failure_text("no connection")), self.plan.grace)

    def close_all(self) -> None:
        """Every socket of the attempt, when it ends (won, failed, cancelled)."""
        attempts, self.open = self.open, set()
        for attempt in attempts:
            attempt.close()
