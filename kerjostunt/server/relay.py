"""The opt-in TURN relay: who may use it, when, and the per-call credential (docs/relay.rst).

The STUNT server never carries data; a relay is a separate, standard TURN
server (coturn) an operator runs beside it with ``use-auth-secret``.  The
server shares coturn's ``static-auth-secret`` and hands each side of a call
a credential of the TURN REST API scheme valid for ``lifetime`` seconds, so
coturn needs no user database and a leaked credential dies on its own.

When a call gets one (``RelayGate.when``): at once when the server's probes
say no direct technique joins the two NATs (where it answered 488 before),
and as a fallback, once the direct techniques failed, when the pair's calls
failed since their last success; a pair never tried, or joined directly
last time, is not offered the relay (it costs the callee an allocation).
Which users may relay at all: ``--relay-user`` and ``--relay-group``
(both sides must be allowed); neither given means every user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.wire import kerjo, turn

__all__ = ["RelaySettings", "RelayGate", "parse_relay_url", "read_secret"]

log = Logger()

Endpoint = tuple[str, int]
DEFAULT_PORT = 3478


@dataclass(frozen=True)
class RelaySettings:
    """What ``--relay``, ``--relay-secret-file`` and the relay limits say."""

    servers: tuple[Endpoint, ...]
    secret: bytes
    #: seconds a handed-out credential stays valid (coturn refuses it after)
    lifetime: int = 600
    #: user IDs that may relay (None: no restriction by user)
    users: frozenset[str] | None = None
    #: groups whose members may relay (None: no restriction by group)
    groups: frozenset[str] | None = None
    #: offer the relay as a fallback to pairs whose calls failed since their last success
    fallback: bool = True


def parse_relay_url(text: str) -> Endpoint:
    """``turn:HOST[:PORT]`` (an IP literal, IPv6 in brackets) -> (ip, port); ValueError otherwise.

    Only TCP to the TURN server is used (``?transport=tcp`` is accepted and
    implied); names are not resolved, so every call names the same address.
    """
    if not text.startswith("turn:"):
        raise ValueError("a relay is turn:HOST[:PORT]")
    target, _, query = text[len("turn:"):].partition("?")
    if query and query.lower() != "transport=tcp":
        raise ValueError("only ?transport=tcp is supported")
    bracketed_bare = target.startswith("[") and target.endswith("]")
    if bracketed_bare or (not target.startswith("[") and target.count(":") == 0):
        target = f"{target}:{DEFAULT_PORT}"
    try:
        return kerjo.parse_endpoint(target)
    except ValueError:
        raise ValueError(f"bad relay address {text!r} (an IP literal and an optional port)") from None


def read_secret(path: str) -> bytes:
    """The first line of the secret file (coturn's ``static-auth-secret``); ValueError when empty."""
    with open(path, "rb") as f:
        secret = f.read().split(b"\n", 1)[0].strip()
    if not secret:
        raise ValueError(f"{path}: empty relay secret")
    return secret


class RelayGate:
    """Decides a call's relay and mints its credentials; ``groups_of`` is the store's."""

    def __init__(self, settings: RelaySettings, clock_seconds: Callable[[], float],
                 groups_of: Callable[[str], defer.Deferred[list[str]]]) -> None:
        self.settings = settings
        self._now = clock_seconds
        self._groups_of = groups_of

    def when(self, unjoinable: str, pair_failures: int) -> str | None:
        """``now`` for NATs no technique joins, ``fallback`` after failures, else None."""
        if unjoinable:
            return kerjo.RELAY_NOW
        if pair_failures > 0 and self.settings.fallback:
            return kerjo.RELAY_FALLBACK
        return None

    def allowed(self, users: Sequence[str]) -> defer.Deferred[bool]:
        """May every one of ``users`` relay?  (One store round trip per user when groups limit it.)"""
        allowed_users, groups = self.settings.users, self.settings.groups
        if groups is None:
            return defer.succeed(allowed_users is None or all(u in allowed_users for u in users))
        pending = [u for u in users if allowed_users is None or u not in allowed_users]
        checks = [self._groups_of(u).addCallback(lambda gs: bool(groups & set(gs))) for u in pending]
        d: defer.Deferred[list[bool]] = defer.gatherResults(checks, consumeErrors=True)
        return d.addCallback(all)

    def decide(self, caller: str, callee: str, unjoinable: str,
               pair_failures: int) -> defer.Deferred[dict[str, kerjo.RelayOffer]] | None:
        """None when the call gets no relay; else each side's offer, {} when a side may not relay."""
        when = self.when(unjoinable, pair_failures)
        if when is None:
            return None

        def offers(allowed: bool) -> dict[str, kerjo.RelayOffer]:
            return {u: self.offer(u, when) for u in (caller, callee)} if allowed else {}

        def failed(failure: Failure) -> dict[str, kerjo.RelayOffer]:
            log.failure("Store failed checking who may relay ({caller}, {callee})", failure,
                        caller=caller, callee=callee)
            return {}

        return self.allowed([caller, callee]).addCallback(offers).addErrback(failed)

    def offer(self, user: str, when: str) -> kerjo.RelayOffer:
        """A credential for ``user`` valid ``lifetime`` seconds from now, for every server."""
        expiry = int(self._now()) + self.settings.lifetime
        creds = turn.rest_credentials(self.settings.secret, user, expiry)
        return kerjo.RelayOffer(self.settings.servers, creds.username, creds.password, when)
