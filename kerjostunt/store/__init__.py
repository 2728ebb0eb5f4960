"""The user database: blocking ``Database`` for the CLI, ``AsyncStore`` for the server.

Nothing outside this package imports SQLAlchemy. ``records`` holds the names,
records, errors and rules (no SQL); ``queries`` the prebuilt statements;
``users`` and ``usage`` the operations ``Database`` combines; ``api`` the
async door and the ``Store`` / ``UsageRecorder`` / ``CallPolicy`` protocols.
"""

from kerjostunt.store.database import (
    NAME_RE,
    OUTCOMES,
    RECENT_WINDOW,
    STUNT_STATES,
    AttemptRecord,
    Database,
    Duplicate,
    ImportRowError,
    InvalidName,
    InvalidValue,
    PairOutcome,
    StoreBusy,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
    UnknownGroup,
    UnknownUser,
    UserRecord,
    next_states,
    pair_flag,
)

__all__ = [
    "NAME_RE",
    "OUTCOMES",
    "RECENT_WINDOW",
    "STUNT_STATES",
    "AttemptRecord",
    "Database",
    "Duplicate",
    "ImportRowError",
    "InvalidName",
    "InvalidValue",
    "PairOutcome",
    "StoreBusy",
    "StoreReadOnly",
    "StoreError",
    "StoreUnavailable",
    "UnknownGroup",
    "UnknownUser",
    "UserRecord",
    "next_states",
    "pair_flag",
]
