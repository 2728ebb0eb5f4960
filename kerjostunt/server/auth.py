"""Digest authentication for REGISTER, through twisted.cred.

The server stores only HA1 values (MD5 and SHA-256), so the checker asks the
store for the HA1 of the algorithm the client chose and recomputes the
response.  Nonces are stateless (an HMAC over their creation time), so
thousands of concurrent challenges cost no memory and survive nothing they
should not: a nonce older than ``lifetime`` is answered with ``stale=true``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from twisted.cred import error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kerjostunt.wire.sip.digest import ALGORITHMS, digest_response


class NonceManager:
    """Stateless digest nonces: ``<hex time>.<hex random>.<hex hmac>``."""

    def __init__(self, clock: IReactorTime, lifetime: float = 300.0, key: bytes | None = None) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._key = key or os.urandom(32)

    def _mac(self, stamp: str, salt: str) -> str:
        return hmac.new(self._key, f"{stamp}.{salt}".encode(), sha256).hexdigest()[:32]

    def issue(self) -> str:
        stamp = f"{int(self._clock.seconds() * 1000):x}"
        salt = secrets.token_hex(8)
        return f"{stamp}.{salt}.{self._mac(stamp, salt)}"

    def check(self, nonce: str) -> str:
        """Return ``"ok"``, ``"stale"`` (ours but too old) or ``"bad"``."""
        parts = nonce.split(".")
        if len(parts) != 3:
            return "bad"
        stamp, salt, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(stamp, salt).encode()):
            return "bad"
        try:
            issued = int(stamp, 16) / 1000.0
        except ValueError:
            return "bad"
        age = self._clock.seconds() - issued
        if age < -1.0 or age > self._lifetime:
            return "stale"
        return "ok"


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
        if creds.qop is not None and creds.qop != "auth":
            raise ValueError(f"unsupported qop {creds.qop}")
        if creds.qop == "auth" and (creds.nc is None or creds.cnonce is None):
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


@implementer(ICredentialsChecker)
class StoreDigestChecker:
    """Checks digest answers against the HA1 values in the store."""

    credentialInterfaces = (ISIPDigestCredentials,)

    def __init__(self, get_ha1: Callable[[str, str], defer.Deferred[str | None]]) -> None:
        # get_ha1 is AsyncStore.get_ha1: blocking SQL stays off the reactor.
        self._get_ha1 = get_ha1

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials: SIPDigestCredentials) -> Generator[Deferred[Any], Any, Any]:
        # Any: ICredentialsChecker declares bytes avatar IDs; ours are str user IDs.
        ha1: str | None = yield self._get_ha1(credentials.username, credentials.algorithm)
        if ha1 is None or not credentials.check_ha1(ha1):
            raise error.UnauthorizedLogin("bad credentials")
        return credentials.username


def make_portal(get_ha1: Callable[[str, str], defer.Deferred[str | None]]) -> portal.Portal:
    return portal.Portal(SIPRealm(), [StoreDigestChecker(get_ha1)])


def challenge_params(realm: str, nonce: str, algorithm: str, stale: bool = False) -> dict[str, str]:
    """The WWW-Authenticate fields for one algorithm (RFC 8760: one header each)."""
    params = {"realm": realm, "nonce": nonce, "algorithm": algorithm, "qop": "auth"}
    if stale:
        params["stale"] = "true"
    return params
