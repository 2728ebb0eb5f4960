"""What the store holds and the rules on it, without SQL.

Names, states and outcomes, the records the store hands out, its errors,
the "use STUNT" flag rule and the checks on credentials and import rows.
``kerjostunt.store.database`` writes and reads them with SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: The one pattern of user IDs and group names, everywhere (store, CLI, web,
#: imports). ``\A...\Z``, not ``^...$``: ``$`` also matches before a trailing
#: newline, which let "alice\n" in and broke ``user list`` and the peers file.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
STUNT_STATES = ("unknown", "direct", "stunt", "unreachable")
OUTCOMES = ("direct", "stunt", "relay", "failed")
HA1_ALGORITHMS = {"MD5": (hashlib.md5, 32), "SHA-256": (hashlib.sha256, 64)}

# The "unreachable" rule looks at this many of the user's latest attempts,
# no older than this window (seconds) before the attempt being recorded.
RECENT_ATTEMPTS = 3
RECENT_WINDOW = 24 * 3600.0
#: ... and those attempts must be with at least this many different peers: one peer
#: (an attacker calling and reporting ``failed``, or a pair no technique joins) only
#: decides its own pair's view (``pair_flag``), never the flag everyone else sees.
UNREACHABLE_PARTNERS = 2

IMPORT_COLUMNS = frozenset({"user_id", "password", "ha1_md5", "ha1_sha256", "groups"})
_HEX_RE = re.compile(r"^[0-9a-f]+$")


class StoreError(Exception):
    """Base of every error the store reports."""


class UnknownUser(StoreError):
    pass


class UnknownGroup(StoreError):
    pass


class Duplicate(StoreError):
    pass


class InvalidName(StoreError):
    pass


class InvalidValue(StoreError):
    """A value other than a name is not acceptable (HA1, state, outcome...)."""


class StoreUnavailable(StoreError):
    """The database could not be reached or failed (an outage, a bad URL)."""


class StoreBusy(StoreUnavailable):
    """The database did not do it now but may later: locked by another process,
    busy, the connection lost (the driver's ``OperationalError``). The server's
    store retries writes that fail with this (``store/api.py``)."""


class StoreReadOnly(StoreBusy):
    """The database refuses writes (a read-only file or mount): retried like a
    lock, since an operator may fix it, but /health tells it apart (503)."""


class ImportRowError(StoreError):
    def __init__(self, row: int, message: str) -> None:
        super().__init__(f"row {row}: {message}")
        self.row = row
        self.detail = message


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    realm: str
    stunt_state: str
    public_ip: str | None
    public_port: int | None
    nat: dict[str, Any] | None
    last_seen: float | None
    groups: tuple[str, ...]


@dataclass(frozen=True)
class PairOutcome:
    """How one pair's calls went: the latest outcome, and the failures since its last success."""

    latest: str
    failures: int


def pair_flag(flag: str, pair: PairOutcome | None) -> str:
    """A peer's "use STUNT" flag as one member of its pair sees it (the trusted peers list, issue 12).

    The stored flag is the peer's, from its latest attempts with anyone: in
    a group, failures with one peer (say a random NAT it cannot be joined
    with) flagged it unreachable for every other.  So the pair's own record
    decides: ``RECENT_ATTEMPTS`` failures in a row since its last success
    make it ``unreachable`` for this member; a peer flagged unreachable by
    others is ``stunt`` for a member it connected with last, ``unknown``
    (worth a call) for one it never tried.
    """
    if pair is not None and pair.failures >= RECENT_ATTEMPTS:
        return "unreachable"
    if pair is not None and pair.latest == "relay" and pair.failures == 0:
        return "relay"  # joined through the TURN relay last time (docs/relay.rst)
    if flag != "unreachable":
        return flag
    return "stunt" if pair is not None and pair.failures == 0 else "unknown"


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    call_id: str
    caller: str
    callee: str
    technique: str | None
    outcome: str
    predicted: str | None
    actual: str | None
    duration_ms: float | None
    when: float
    #: each side's techniques and results, predicted window, NAT (server/calls/detail.py); None before 0002
    detail: dict[str, Any] | None = None


def detail_of(text: str | None) -> dict[str, Any] | None:
    """The stored detail JSON, None when absent or unreadable (an old row must not break a listing)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class RecentAttempt:
    """One of a user's recent attempts, as the flag rule sees it."""

    outcome: str
    #: the other user of the attempt
    partner: str
    #: the user's own report is part of the outcome (rows from before reports were kept: True)
    own: bool = True


def next_states(
    outcome: str,
    caller_state: str,
    callee_state: str,
    callee_recent: Sequence[RecentAttempt],
    *,
    caller_reported: bool = True,
    callee_reported: bool = True,
) -> tuple[str, str]:
    """The "use STUNT" flag rule: (caller, callee) states after an attempt.

    ``callee_recent`` holds the callee's latest attempts (``RECENT_ATTEMPTS``
    of them within ``RECENT_WINDOW``, as caller or callee), the one being
    recorded included. ``*_reported``: that side's own report agrees with the
    outcome. A user's flag moves only on its own report: one side alone never
    sets the other's (issue 13: three false ``failed`` reports made bob
    ``unreachable`` in every group's list). ``unreachable`` also needs the
    user's own ``failed`` in each recent attempt, with at least
    ``UNREACHABLE_PARTNERS`` different peers. Kept in one place so the policy
    is easy to change; docs/admin.rst describes it.
    """
    if outcome == "direct":
        return caller_state, "direct" if callee_reported else callee_state
    if outcome == "stunt":
        caller_new = ("direct" if caller_state == "direct" else "stunt") if caller_reported else caller_state
        return caller_new, "stunt" if callee_reported else callee_state
    if (callee_reported and callee_recent
            and all(r.outcome == "failed" and r.own for r in callee_recent)
            and len({r.partner for r in callee_recent}) >= UNREACHABLE_PARTNERS):
        return caller_state, "unreachable"
    return caller_state, callee_state


def witnessed(witnesses: str | None, user_id: str) -> bool:
    """Is ``user_id`` among an attempt row's ``witnesses`` (NULL: a row from before they were kept)?"""
    return witnesses is None or user_id in witnesses.split(",")


def ha1(algorithm: str, user_id: str, realm: str, password: str) -> str:
    """HA1 = H(user:realm:password) as lowercase hex (RFC 7616)."""
    hasher = HA1_ALGORITHMS[algorithm][0]
    return hasher(f"{user_id}:{realm}:{password}".encode()).hexdigest()


def check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid {what} {name!r}: 1-64 characters of A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit"
        )
    return name


def check_ha1(value: str | None, algorithm: str) -> str | None:
    if value is None or value == "":
        return None
    length = HA1_ALGORITHMS[algorithm][1]
    value = value.strip().lower()
    if len(value) != length or not _HEX_RE.match(value):
        raise InvalidValue(f"{algorithm} HA1 must be {length} hex digits")
    return value


def credential_columns(
    user_id: str,
    realm: str,
    password: str | None,
    ha1_md5: str | None,
    ha1_sha256: str | None,
) -> dict[str, str | None]:
    if password is not None and (ha1_md5 or ha1_sha256):
        raise InvalidValue("give either a password or HA1 values, not both")
    if password is not None:
        if password == "":
            raise InvalidValue("empty password")
        return {
            "ha1_md5": ha1("MD5", user_id, realm, password),
            "ha1_sha256": ha1("SHA-256", user_id, realm, password),
        }
    md5 = check_ha1(ha1_md5, "MD5")
    sha = check_ha1(ha1_sha256, "SHA-256")
    if md5 is None and sha is None:
        raise InvalidValue("a password or at least one HA1 is needed")
    return {"ha1_md5": md5, "ha1_sha256": sha}


def import_row(
    number: int, row: Mapping[str, str | None], realm: str
) -> tuple[dict[str, Any], list[str]]:
    """Validate one CSV row; return the users-table values and its groups."""
    if None in row:
        raise ImportRowError(number, "more fields than the header has columns")
    unknown = sorted(set(row) - IMPORT_COLUMNS)
    if unknown:
        raise ImportRowError(
            number,
            f"unknown column {unknown[0]!r} (expected user_id, password, "
            "ha1_md5, ha1_sha256, groups)",
        )

    def value(column: str) -> str:
        return (row.get(column) or "").strip()

    user_id = value("user_id")
    if not user_id:
        raise ImportRowError(number, "column user_id: empty or missing")
    if not NAME_RE.match(user_id):
        raise ImportRowError(number, f"column user_id: invalid user ID {user_id!r}")
    password = row.get("password") or None  # passwords are taken verbatim
    md5, sha = value("ha1_md5") or None, value("ha1_sha256") or None
    if password is not None and (md5 or sha):
        raise ImportRowError(number, "column password: give a password or HA1s, not both")
    if password is None and md5 is None and sha is None:
        raise ImportRowError(number, "column password: no password, ha1_md5 or ha1_sha256")
    try:
        if password is not None:
            creds = credential_columns(user_id, realm, password, None, None)
        else:
            creds = {"ha1_md5": check_ha1(md5, "MD5")}
            try:
                creds["ha1_sha256"] = check_ha1(sha, "SHA-256")
            except InvalidValue as e:
                raise ImportRowError(number, f"column ha1_sha256: {e}") from e
    except InvalidValue as e:
        column = "password" if password is not None else "ha1_md5"
        raise ImportRowError(number, f"column {column}: {e}") from e
    groups = list(dict.fromkeys(value("groups").split()))
    for g in groups:
        if not NAME_RE.match(g):
            raise ImportRowError(number, f"column groups: invalid group name {g!r}")
    user = {
        "user_id": user_id,
        "realm": realm,
        "stunt_state": "unknown",
        "public_ip": None,
        "public_port": None,
        "nat": None,
        "last_seen": None,
        **creds,
    }
    return user, groups
