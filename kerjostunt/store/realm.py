"""The database's realm: set once, when the database is first used, read by everyone after.

Every user's HA1 is H(user:realm:password), so a user added under one
realm cannot log in to a server that challenges with another; before the
realm lived here, a server started with ``--domain X`` and users added
without it failed every login with ``403`` and nothing said why. Now the
first server start or admin command on a new database stores its
``--domain`` (``claim_realm``); a later one with another domain is refused
with ``RealmMismatch``, and a user whose own realm differs (imported or
added before the realm was stored) is named by ``realm_problem``.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from kerjostunt.store.models import Meta
from kerjostunt.store.queries import EngineBound, translated
from kerjostunt.store.records import StoreError, UserRecord

__all__ = ["REALM_KEY", "RealmKeeper", "RealmMismatch", "realm_problem"]

REALM_KEY = "realm"


class RealmMismatch(StoreError):
    """The database's realm is not the one asked for."""

    def __init__(self, stored: str, wanted: str, where: str) -> None:
        super().__init__(
            f"the database {where} has realm {stored!r} (set when it was created), not {wanted!r}: "
            f"use --domain {stored} or another --db"
        )
        self.stored, self.wanted = stored, wanted


def realm_problem(user: UserRecord, realm: str | None) -> str | None:
    """Why ``user`` cannot log in under ``realm``, when the realm is the reason; else None."""
    if realm is None or user.realm == realm:
        return None
    return (f"{user.user_id}'s password was set for realm {user.realm!r}, not this server's {realm!r}: "
            f"set it again with 'kerjostunt user passwd {user.user_id}'")


class RealmKeeper(EngineBound):
    """``Database``'s realm operations."""

    url: str

    @translated
    def realm(self) -> str | None:
        """The stored realm; None for a database no server or command has claimed yet."""
        with self.engine.connect() as c:
            value: str | None = c.execute(select(Meta.value).where(Meta.key == REALM_KEY)).scalar()
            return value

    @translated
    def claim_realm(self, wanted: str | None, default: str) -> str:
        """The realm to use: the stored one, or ``wanted`` (else ``default``) stored now.

        ``RealmMismatch`` if ``wanted`` is given and differs from the stored
        realm. Always writes (a no-op update when the realm is stored), so a
        read-only database fails here, at start, not at the first REGISTER.
        """
        try:
            stored = self._claim_once(wanted or default)
        except IntegrityError:  # another process stored one between our read and insert
            stored = self._claim_once(wanted or default)
        if wanted is not None and wanted != stored:
            raise RealmMismatch(stored, wanted, _safe_url(self.url))
        return stored

    def _claim_once(self, value: str) -> str:
        with self.engine.begin() as c:
            stored = c.execute(select(Meta.value).where(Meta.key == REALM_KEY)).scalar()
            if stored is None:
                c.execute(insert(Meta).values(key=REALM_KEY, value=value))
                return value
            c.execute(update(Meta).where(Meta.key == REALM_KEY).values(value=stored))
            return str(stored)


def _safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest and sep:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url
