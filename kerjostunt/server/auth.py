"""Digest authentication for REGISTER, through twisted.cred.

The server stores only HA1 values (MD5 and SHA-256), so the checker asks the
store for the HA1 of the algorithm the client chose and recomputes the
response.  Nonces are stateless (an HMAC over their creation time and the
client address they were issued to), so thousands of concurrent challenges
cost no memory; a nonce older than ``lifetime`` is answered with
``stale=true``. What is remembered is what replay protection needs: the
nonce counts used (``NonceCounts``, for the nonces' short life). Logins go
through ``AuthGuard``, which asks the ``GuessThrottle`` first. The rules and
their defaults: docs/protocol.rst, "Digest answers and password guessing".
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from twisted.cred import error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.server.throttle import GuessThrottle
from kerjostunt.wire.sip.digest import ALGORITHMS, digest_response
from kerjostunt.wire.sip.headers import parse_uri

#: how long a nonce answers "ok" (seconds): long enough for a challenge's
#: answer and a client's quick retry, short enough that a captured
#: Authorization header is worth little (it is also bound to an address
#: and its nonce count is tracked)
NONCE_LIFETIME = 60.0


def nonce_time(nonce: str) -> float | None:
    """When one of our nonces was issued (its first field), None if it has no time."""
    stamp = nonce.split(".", 1)[0]
    try:
        return int(stamp, 16) / 1000.0
    except ValueError:
        return None


class NonceManager:
    """Stateless digest nonces: ``<hex time>.<hex random>.<hex hmac>``.

    The HMAC covers the time, the random part and what the nonce is bound
    to (the client's IP address for REGISTER): a nonce issued to one
    address is ``"bad"`` from another, so a captured header cannot be
    replayed from elsewhere. ``NonceCounts`` makes it single-use per count.
    """

    def __init__(self, clock: IReactorTime, lifetime: float = NONCE_LIFETIME, key: bytes | None = None) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._key = key or os.urandom(32)

    def _mac(self, stamp: str, salt: str, bound: str) -> str:
        return hmac.new(self._key, f"{stamp}.{salt}|{bound}".encode(), sha256).hexdigest()[:32]

    def issue(self, bound: str = "") -> str:
        stamp = f"{int(self._clock.seconds() * 1000):x}"
        salt = secrets.token_hex(8)
        return f"{stamp}.{salt}.{self._mac(stamp, salt, bound)}"

    def check(self, nonce: str, bound: str = "") -> str:
        """Return ``"ok"``, ``"stale"`` (ours but too old) or ``"bad"`` (not ours, or for another binding)."""
        parts = nonce.split(".")
        if len(parts) != 3:
            return "bad"
        stamp, salt, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(stamp, salt, bound).encode()):
            return "bad"
        issued = nonce_time(nonce)
        if issued is None:
            return "bad"
        age = self._clock.seconds() - issued
        if age < -1.0 or age > self.lifetime:
            return "stale"
        return "ok"


class NonceCounts:
    """The nonce counts already used (RFC 7616 3.4: ``nc`` tracked).

    A nonce's ``nc`` must grow with every use, so a replayed
    nonce+nc is refused; a nonce whose answer was wrong is burnt (one guess
    per challenge). Entries are dropped once their nonce is older than
    ``lifetime`` (``NonceManager`` then calls it stale anyway, so keep
    ``lifetime`` at least the manager's); past ``max_nonces`` the oldest is
    dropped and every nonce issued up to it is refused from then on, so
    forgetting never reopens a replay. No clock: the nonces' own times
    say how old they are.
    """

    _BURNT = -1

    def __init__(self, lifetime: float = NONCE_LIFETIME, max_nonces: int = 100_000) -> None:
        self._lifetime = lifetime
        self._max = max_nonces
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._newest = float("-inf")
        self._floor = float("-inf")

    def use(self, nonce: str, nc: str | None) -> bool:
        """Record one use of ``nonce`` with count ``nc``; False for a replay (or no count)."""
        try:
            count = int(nc or "", 16)
        except ValueError:
            return False
        issued = nonce_time(nonce)
        stamp = issued if issued is not None else 0.0
        if issued is not None and issued <= self._floor:
            return False
        self._prune(stamp)
        last = self._last.get(nonce, (stamp, 0))[1]
        if last == self._BURNT or count <= last:
            return False
        self._last[nonce] = (stamp, count)
        return True

    def burn(self, nonce: str) -> None:
        """No further answer with this nonce is checked (a wrong one was given)."""
        stamp = self._last.get(nonce, (nonce_time(nonce) or 0.0, 0))[0]
        self._last[nonce] = (stamp, self._BURNT)

    def _prune(self, stamp: float) -> None:
        self._newest = max(self._newest, stamp)
        while self._last:
            nonce, (first, _) = next(iter(self._last.items()))
            if len(self._last) >= self._max:
                self._floor = max(self._floor, first)
            elif first >= self._newest - self._lifetime:
                break
            del self._last[nonce]

    def __len__(self) -> int:
        return len(self._last)


class ISIPDigestCredentials(ICredentials):
    """A REGISTER's digest answer, checkable against a stored HA1."""

    def check_ha1(ha1: str) -> bool:
        """True if the client's response matches this HA1."""


@implementer(ISIPDigestCredentials)
@dataclass
class SIPDigestCredentials:
    """The fields of an ``Authorization: Digest`` header, plus the method."""

    username: str
    realm: str
    method: str
    uri: str
    nonce: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None

    @classmethod
    def from_params(cls, method: str, params: dict[str, str]) -> SIPDigestCredentials:
        """Build from parsed Authorization params; ValueError if unusable."""
        try:
            creds = cls(
                username=params["username"],
                realm=params["realm"],
                method=method,
                uri=params["uri"],
                nonce=params["nonce"],
                response=params["response"].lower(),
                algorithm=params.get("algorithm", "MD5").upper(),
                qop=params.get("qop"),
                nc=params.get("nc"),
                cnonce=params.get("cnonce"),
            )
        except KeyError as missing:
            raise ValueError(f"Authorization lacks {missing}") from None
        if creds.algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {creds.algorithm}")
        if creds.qop is None:
            raise ValueError("qop=auth required")  # RFC 7616: without it, nc cannot be tracked
        if creds.qop != "auth":
            raise ValueError(f"unsupported qop {creds.qop}")
        if creds.nc is None or creds.cnonce is None:
            raise ValueError("qop=auth needs nc and cnonce")
        return creds

    def check_ha1(self, ha1: str) -> bool:
        expected = digest_response(
            ha1, self.method, self.uri, self.nonce, self.algorithm, self.qop, self.nc, self.cnonce
        )
        return hmac.compare_digest(expected.encode(), self.response.encode())


@implementer(portal.IRealm)
class SIPRealm:
    """Avatars are just user IDs: being authenticated is all REGISTER needs."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, str, Callable[[], None]]:
        return interfaces[0], avatarId, lambda: None


class Replayed(error.UnauthorizedLogin):
    """A nonce+nc used before, or a burnt nonce: nothing was checked; challenge again (stale)."""


class Throttled(error.UnauthorizedLogin):
    """Too many failures from this source or for this user: refused unchecked."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins, retry in {retry_after:.0f} s")
        self.retry_after = retry_after


@implementer(ICredentialsChecker)
class StoreDigestChecker:
    """Checks digest answers against the HA1 values in the store.

    Each answer's nonce count is recorded first (``NonceCounts``): a
    replayed one fails with ``Replayed`` before any lookup, and a wrong
    answer burns its nonce, so every guess costs a new challenge.
    """

    credentialInterfaces = (ISIPDigestCredentials,)

    def __init__(
        self, get_ha1: Callable[[str, str], defer.Deferred[str | None]], counts: NonceCounts | None = None
    ) -> None:
        # get_ha1 is AsyncStore.get_ha1: blocking SQL stays off the reactor.
        self._get_ha1 = get_ha1
        self.counts = counts if counts is not None else NonceCounts()

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials: SIPDigestCredentials) -> Generator[Deferred[Any], Any, Any]:
        # Any: ICredentialsChecker declares bytes avatar IDs; ours are str user IDs.
        if credentials.qop != "auth" or not self.counts.use(credentials.nonce, credentials.nc):
            raise Replayed("nonce count used before")
        ha1: str | None = yield self._get_ha1(credentials.username, credentials.algorithm)
        if ha1 is None or not credentials.check_ha1(ha1):
            self.counts.burn(credentials.nonce)
            raise error.UnauthorizedLogin("bad credentials")
        return credentials.username


def make_portal(get_ha1: Callable[[str, str], defer.Deferred[str | None]]) -> portal.Portal:
    return portal.Portal(SIPRealm(), [StoreDigestChecker(get_ha1)])


def credentials_user(credentials: ICredentials) -> str:
    """The user name a login is for (digest or username/password)."""
    if isinstance(credentials, SIPDigestCredentials):
        return credentials.username
    if IUsernamePassword.providedBy(credentials):
        name = credentials.username
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return "?"


class AuthGuard:
    """A portal's ``login`` behind a ``GuessThrottle``: the one way in for SIP and the web.

    A locked source or user gets ``Throttled`` without its password being
    looked at; a wrong password is counted against the source and the
    user; a good one makes the source one of the user's usual addresses.
    ``Replayed`` answers are not guesses (nothing was checked) and do not
    count.
    """

    def __init__(self, portal: portal.Portal, throttle: GuessThrottle, service: str = "sip") -> None:
        self.portal = portal
        self.throttle = throttle
        self.service = service

    def login(self, credentials: ICredentials, source: str, *interfaces: Any) -> Deferred[Any]:
        user = credentials_user(credentials)
        wait = self.throttle.locked(user, source)
        if wait > 0:
            return defer.fail(Throttled(wait))

        self.throttle.checking(user, source)

        def good(result: Any) -> Any:
            self.throttle.checked(user, source)
            self.throttle.succeeded(user, source)
            return result

        def bad(failure: Failure) -> Failure:
            self.throttle.checked(user, source)
            if failure.check(error.UnauthorizedLogin) and not failure.check(Replayed):
                self.throttle.failed(user, source, self.service)
            return failure

        return self.portal.login(credentials, None, *interfaces).addCallbacks(good, bad)


def sip_uri_matches(digest_uri: str, request_uri: str) -> bool:
    """Is a digest ``uri`` the REGISTER's Request-URI (RFC 3261 22.4)?

    Compared as URIs, not strings: the same host, and the same port when
    both name one. ``sip:`` and ``sips:`` count as one (sipp always writes
    ``sip:`` in the digest, whatever the Request-URI), as do a missing and
    a given port (tools add the port on one side only). A user part or
    another host is refused: the answer was computed for another request.
    """
    if digest_uri == request_uri:
        return True
    try:
        mine, theirs = parse_uri(digest_uri), parse_uri(request_uri)
    except ValueError:
        return False
    if mine.host.lower() != theirs.host.lower() or mine.user != theirs.user:
        return False
    return mine.port is None or theirs.port is None or mine.port == theirs.port


def challenge_params(realm: str, nonce: str, algorithm: str, stale: bool = False) -> dict[str, str]:
    """The WWW-Authenticate fields for one algorithm (RFC 8760: one header each)."""
    params = {"realm": realm, "nonce": nonce, "algorithm": algorithm, "qop": "auth"}
    if stale:
        params["stale"] = "true"
    return params
