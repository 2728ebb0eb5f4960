"""Password guessing, slowed down: lockouts per source address and per user.

Every failed password check (SIP REGISTER, the web's Digest or Basic) counts
against the source IP and against the user it was for. Past a few free
failures each further one locks that key out for a time that doubles, up to
a cap; while locked, logins are refused *before* the password is checked, so
a locked-out guesser learns nothing. Counters are forgotten after a quiet
while.

The per-user lock would let anyone lock a user out from elsewhere, so it
does not apply to the addresses the user last logged in from successfully:
the right password from the user's usual address still works while a
guesser elsewhere is locked out. (The per-source lock still applies there:
a guesser behind the user's own NAT locks that address.)

Checks still running count too, once a key has failed before: many
parallel guesses from one source get the free ones, not one per
connection.

Failures are logged in aggregate, not one line each: the first failure of a
source in an interval at once, the rest summed in one line per source when
the interval is over (written at the next authentication event or
``flush``: no timer, so nothing is left on the reactor). Refusals are
counted: ``auth_throttled`` (a login refused because locked) besides the
callers' own failure counters. Defaults and reasons: docs/protocol.rst
("Digest answers and password guessing") and docs/security.rst ("Accounts, digests and probe tokens").
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["ThrottleConfig", "GuessThrottle", "FailureLog", "THROTTLED_COUNTER"]

log = Logger(namespace="kerjostunt.server.throttle")

#: the counter bumped for each login refused because its source or user is locked
THROTTLED_COUNTER = "auth_throttled"


@dataclass(frozen=True)
class ThrottleConfig:
    """The limits; the defaults are the server's."""

    #: failures from one source IP before the first lock
    free_per_source: int = 5
    #: failures for one user (from anywhere but its trusted addresses) before the first lock
    free_per_user: int = 10
    #: the first lock; each further failure doubles it
    base_lock: float = 1.0
    #: the longest lock
    max_lock: float = 900.0
    #: a counter is forgotten this long after its last failure
    forget_after: float = 3600.0
    #: addresses remembered per user as "usual" (its last good logins)
    trusted_per_user: int = 4
    #: keys kept per table (sources, users, trusted): oldest dropped past it
    max_entries: int = 65536
    #: the aggregated failure log's interval
    log_interval: float = 60.0
    #: sources named in one interval's summary; the rest are one "other sources" line
    log_sources: int = 100


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class _Table:
    """Failure counters by key, least recently failed first, bounded."""

    def __init__(self, free: int, config: ThrottleConfig) -> None:
        self._free = free
        self._config = config
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def locked_for(self, key: str, now: float, pending: int = 0) -> float:
        """Seconds ``key`` is locked for; ``pending`` checks still running count as failures
        once ``key`` has failed before (so parallel guesses cannot overshoot the free ones)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        if now - entry.last > self._config.forget_after:
            del self._entries[key]
            return 0.0
        if pending and entry.count + pending >= self._free:
            return max(self._config.base_lock, entry.locked_until - now)
        return max(0.0, entry.locked_until - now)

    def fail(self, key: str, now: float) -> None:
        entry = self._entries.pop(key, None)
        if entry is None or now - entry.last > self._config.forget_after:
            entry = _Failures()
        entry.count += 1
        entry.last = now
        over = entry.count - self._free
        if over > 0:
            lock = self._config.base_lock * 2.0 ** min(over - 1, 40)
            entry.locked_until = now + min(self._config.max_lock, lock)
        self._entries[key] = entry
        while len(self._entries) > self._config.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Tally:
    count: int = 0
    users: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)


class FailureLog:
    """Authentication failures in the log: one line per source per interval.

    The first failure of a source is written at once (a mistyped password
    shows up immediately); later ones in the same interval are summed, and
    the sum is written once the interval is over. A source that keeps
    failing thus costs one line per interval, whatever its rate.
    """

    MAX_NAMES = 5

    def __init__(self, clock: IReactorTime, config: ThrottleConfig) -> None:
        self._clock = clock
        self._config = config
        self._tallies: dict[str, _Tally] = {}
        self._others = 0
        self._started = clock.seconds()

    def failed(self, service: str, user: str, source: str) -> None:
        self.tick()
        tally = self._tallies.get(source)
        if tally is None:
            if len(self._tallies) >= self._config.log_sources:
                self._others += 1
                return
            self._tallies[source] = _Tally()
            log.info("{service}: wrong credentials for {user} from {source}",
                     service=service, user=user, source=source)
            return
        tally.count += 1
        tally.services.add(service)
        if len(tally.users) < self.MAX_NAMES:
            tally.users.add(user)

    def tick(self) -> None:
        """Write the last interval's sums if it is over."""
        if self._clock.seconds() - self._started >= self._config.log_interval:
            self.flush()

    def flush(self) -> None:
        """Write the sums now and start a new interval.

        A source that failed again during the interval stays known (its
        next failure is summed, not written at once); one that did not is
        forgotten.
        """
        interval = self._clock.seconds() - self._started
        for source, tally in list(self._tallies.items()):
            if not tally.count:
                del self._tallies[source]
                continue
            log.info(
                "{services}: {count} more failed logins from {source} in {interval:.0f} s (users: {users})",
                services="/".join(sorted(tally.services)), count=tally.count, source=source,
                interval=interval, users=", ".join(sorted(tally.users)),
            )
            self._tallies[source] = _Tally()
        if self._others:
            log.info("{count} failed logins from further sources in {interval:.0f} s",
                     count=self._others, interval=interval)
            self._others = 0
        self._started = self._clock.seconds()


class GuessThrottle:
    """Who may try a password now; shared by SIP and the web (one per server)."""

    def __init__(
        self,
        clock: IReactorTime,
        config: ThrottleConfig | None = None,
        count: Callable[[str], None] = lambda what: None,
    ) -> None:
        self.config = config or ThrottleConfig()
        self._clock = clock
        self._count = count
        self._sources = _Table(self.config.free_per_source, self.config)
        self._users = _Table(self.config.free_per_user, self.config)
        self._trusted: OrderedDict[str, deque[str]] = OrderedDict()
        self._pending: Counter[str] = Counter()
        self.log = FailureLog(clock, self.config)

    def locked(self, user: str, source: str) -> float:
        """Seconds until ``user`` may try from ``source``; 0.0 means now.

        A non-zero answer is counted (``auth_throttled``): the caller refuses
        without checking the password.
        """
        self.log.tick()
        now = self._clock.seconds()
        wait = self._sources.locked_for(source, now, self._pending["s " + source])
        if source not in self._trusted.get(user, ()):
            wait = max(wait, self._users.locked_for(user, now, self._pending["u " + user]))
        if wait > 0:
            self._count(THROTTLED_COUNTER)
        return wait

    def checking(self, user: str, source: str) -> None:
        """A password check has started (``locked`` said 0): until ``checked``, it counts as pending."""
        self._pending["s " + source] += 1
        self._pending["u " + user] += 1

    def checked(self, user: str, source: str) -> None:
        for key in ("s " + source, "u " + user):
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]

    def failed(self, user: str, source: str, service: str = "sip") -> None:
        """A wrong password (or an unknown user) for ``user`` from ``source``."""
        now = self._clock.seconds()
        self._sources.fail(source, now)
        self._users.fail(user, now)
        self.log.failed(service, user, source)

    def succeeded(self, user: str, source: str) -> None:
        """A good login: ``source`` becomes one of the user's usual addresses.

        Counters are not reset: a guesser holding an account of its own
        must not be able to wipe its record by logging in.
        """
        mine = self._trusted.pop(user, None)
        if mine is None:
            mine = deque(maxlen=self.config.trusted_per_user)
        if source in mine:
            mine.remove(source)
        mine.append(source)
        self._trusted[user] = mine
        while len(self._trusted) > self.config.max_entries:
            self._trusted.popitem(last=False)

    def sizes(self) -> tuple[int, int, int]:
        """(sources, users, trusted users) held: for tests and the bench."""
        return len(self._sources), len(self._users), len(self._trusted)
