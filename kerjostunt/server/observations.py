"""What the probes leave: probe tokens (REGISTER's short-term credentials) and the observations.

Kept apart from the probe protocol (probe.py) because the calls, the
registrar and the web read them too: the tokens say which user a probe
belongs to, the observation log holds each user's recent mappings (and
those through each public address, one NAT) for prediction.py.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.store import UnknownUser
from kerjostunt.wire.prediction import Sample

__all__ = ["ProbeTokens", "Observation", "ObservationLog", "nat_not_stored", "plain_ip", "ip_family"]

_log = Logger(namespace="kerjostunt.server.probe")


def plain_ip(host: str) -> str:
    """IPv4-mapped IPv6 (a dual-stack listener) reads as the IPv4 address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)



def ip_family(host: str) -> int:
    """4 or 6 (a textual IPv6 address has a colon, an IPv4 one none)."""
    return 6 if ":" in host else 4


def _may_probe_from(source_ip: str, bound: str) -> bool:
    """The bound address itself, or any address of the other family.

    A peer registered over IPv4 probes over IPv6 too (and the other way
    round) so the server learns both of its public addresses; the token
    pins the family it registered from, where a replay from elsewhere is
    refused. The other family's address is only recorded (the first one of
    a registration: ``Registrar.note_address``), never used to predict.
    """
    return source_ip == bound or ip_family(source_ip) != ip_family(bound)


class ProbeTokens:
    """Short-lived probe credentials handed out in REGISTER's 200 OK.

    In memory only: they live for minutes, and a restarted server makes the
    peers re-register anyway.

    A token is bound to the public IP its user registered from (REGISTER
    calls ``registered_from`` before the token is issued): a probe with it
    from any other address is refused, so a captured probe replayed from
    elsewhere is not recorded against the user. Registering from a new
    address revokes the tokens bound to the old one; unregistering revokes
    them all (docs/probes.rst).
    """

    #: tokens kept per user; re-registering does not revoke the previous one
    #: (a probe may be in flight), but they cannot pile up either
    per_user = 4

    def __init__(self, clock: IReactorTime, lifetime: float = 300.0) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._tokens: dict[str, tuple[str, str, float, str | None]] = {}
        self._by_user: dict[str, deque[str]] = {}
        self._registered: dict[str, str] = {}

    def registered_from(self, user_id: str, ip: str) -> None:
        """Bind the user's next tokens to ``ip``; drop those bound elsewhere."""
        previous = self._registered.get(user_id)
        self._registered[user_id] = plain_ip(ip)
        if previous is not None and previous != plain_ip(ip):
            self.revoke_user(user_id)
            self._registered[user_id] = plain_ip(ip)

    def issue(self, user_id: str) -> tuple[str, str]:
        """(token used as STUN USERNAME, password whose UTF-8 bytes are the key)."""
        self._prune()
        token = secrets.token_urlsafe(18)
        password = secrets.token_urlsafe(24)
        bound = self._registered.get(user_id)
        self._tokens[token] = (user_id, password, self._clock.seconds() + self.lifetime, bound)
        mine = self._by_user.setdefault(user_id, deque())
        mine.append(token)
        while len(mine) > self.per_user:
            self._tokens.pop(mine.popleft(), None)
        return token, password

    def lookup(self, token: str, source_ip: str | None = None) -> tuple[str, str] | None:
        """(user, password) of a live token usable from ``source_ip``, else None.

        A token issued without a binding (no ``registered_from``) works
        from anywhere; ``source_ip`` None skips the check (tests of the
        credentials alone).
        """
        entry = self._tokens.get(token)
        if entry is None:
            return None
        user_id, password, expires, bound = entry
        if self._clock.seconds() >= expires:
            self._drop(token)
            return None
        if bound is not None and source_ip is not None and not _may_probe_from(plain_ip(source_ip), bound):
            return None
        return user_id, password

    def registered_ip(self, user_id: str) -> str | None:
        """The address the user's tokens are bound to (its signaling connection's)."""
        return self._registered.get(user_id)

    def revoke_user(self, user_id: str) -> None:
        """Every token of ``user_id`` stops working (unregistered, or deleted)."""
        self._registered.pop(user_id, None)
        for token in self._by_user.pop(user_id, ()):
            self._tokens.pop(token, None)

    def _drop(self, token: str) -> None:
        entry = self._tokens.pop(token, None)
        if entry is not None:
            mine = self._by_user.get(entry[0])
            if mine is not None:
                try:
                    mine.remove(token)
                except ValueError:
                    pass
                if not mine:
                    del self._by_user[entry[0]]

    def _prune(self) -> None:
        """Drop expired tokens, oldest first.

        Every token lives ``lifetime`` from its issue, so the dict's insertion
        order is expiry order: stop at the first live one.  (Scanning every
        token on every REGISTER made registering N peers cost O(N**2).)
        ``lookup`` still checks each token's own expiry.
        """
        now = self._clock.seconds()
        expired = []
        for token, (_, _, exp, _) in self._tokens.items():
            if now < exp:
                break
            expired.append(token)
        for token in expired:
            self._drop(token)

    def __len__(self) -> int:
        return len(self._tokens)


@dataclass(frozen=True)
class Observation:
    user_id: str
    local_port: int | None
    mapped_ip: str
    mapped_port: int
    server_ip: str
    server_port: int
    time: float


class ObservationLog:
    """Recent observations per user, bounded (oldest dropped), in memory.

    Listeners are told of each new one; the server uses that to run the
    prediction and persist the NAT description.  A failing listener is
    logged and does not stop the others.
    """

    def __init__(self, per_user: int = 32, local_ip_of: Callable[[str], str | None] | None = None) -> None:
        self.per_user = per_user
        # A user's own address as it registered it (its Contact): the probes carry none, and
        # without it a preserving NAT that kept every port looks like no NAT at all.
        self._local_ip_of = local_ip_of or (lambda user_id: None)
        self._by_user: dict[str, deque[Observation]] = {}
        # The observations seen through each public address: with a
        # sequential NAT every host behind it moves one port counter, so the
        # calls' scheduling (calls/lanes.py) reads the NAT's allocation and
        # latest port from all of them, not only from the caller's own.
        self._by_ip: dict[str, deque[Observation]] = {}
        self._listeners: list[Callable[[Observation], None]] = []
        self._address_listeners: list[Callable[[str, str, int], None]] = []

    def subscribe_addresses(self, listener: Callable[[str, str, int], None]) -> None:
        """``listener(user_id, ip, port)`` for each probe from the family a user did not register from."""
        self._address_listeners.append(listener)

    def add_other_family(self, obs: Observation) -> None:
        """A probe over the other IP family: it names an address, not a NAT's behaviour,
        so it stays out of the samples prediction reads."""
        for listener in list(self._address_listeners):
            try:
                listener(obs.user_id, obs.mapped_ip, obs.mapped_port)
            except Exception:
                _log.failure("address listener failed for {user_id}", user_id=obs.user_id)

    def add(self, obs: Observation) -> None:
        self._by_user.setdefault(obs.user_id, deque(maxlen=self.per_user)).append(obs)
        if obs.local_port is not None:
            self._by_ip.setdefault(obs.mapped_ip, deque(maxlen=2 * self.per_user)).append(obs)
        for listener in list(self._listeners):
            try:
                listener(obs)
            except Exception:
                _log.failure("observation listener failed for {user_id}", user_id=obs.user_id)

    def for_user(self, user_id: str) -> list[Observation]:
        return list(self._by_user.get(user_id, ()))

    def forget(self, user_id: str) -> None:
        self._by_user.pop(user_id, None)

    def behind(self, public_ip: str) -> list[Sample]:
        """The recent samples of every user seen at ``public_ip`` (one NAT), oldest first."""
        return [self._sample(o) for o in self._by_ip.get(public_ip, ()) if o.local_port is not None]

    def last_probe_behind(self, public_ip: str, excluding: Collection[str]) -> float | None:
        """When a user not in ``excluding`` last probed through ``public_ip`` (None: not lately)."""
        times = [o.time for o in self._by_ip.get(public_ip, ()) if o.user_id not in excluding]
        return max(times) if times else None

    def subscribe(self, callback: Callable[[Observation], None]) -> None:
        self._listeners.append(callback)

    def samples(self, user_id: str) -> list[Sample]:
        """Converted for prediction.py; observations without a reported local port are left out
        (they cannot show how a local port was mapped)."""
        return [self._sample(o) for o in self.for_user(user_id) if o.local_port is not None]

    def _sample(self, o: Observation) -> Sample:
        assert o.local_port is not None
        return Sample(o.local_port, o.mapped_ip, o.mapped_port, o.server_ip, o.server_port, o.time,
                      self._local_ip_of(o.user_id))


def nat_not_stored(failure: Failure, user_id: str, tokens: ProbeTokens, observations: ObservationLog) -> None:
    """The errback of storing what a probe showed (``store.record_nat``).

    The user may have been deleted since its token was issued (``kerjostunt
    user del`` runs in another process, so the server learns it here):
    its tokens are revoked and its observations forgotten, in one log line
    and no traceback. Anything else is a real failure and logged as one.
    """
    if failure.check(UnknownUser):
        _log.info("probe for deleted user {user_id}: its probe tokens are revoked", user_id=user_id)
        tokens.revoke_user(user_id)
        observations.forget(user_id)
        return
    _log.failure("Could not store NAT of {user}", failure, user=user_id)
