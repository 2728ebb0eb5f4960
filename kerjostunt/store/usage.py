"""What the server records about its peers: last seen, NAT, call attempts, flags."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, or_, select, update

from kerjostunt.store.models import Attempt
from kerjostunt.store.queries import (
    ATTEMPT_INSERT,
    LOCK_STATES,
    RECENT_OUTCOMES,
    SEEN_UPDATE,
    STATE_UPDATE,
    USERS,
    EngineBound,
    chunks,
    translated,
)
from kerjostunt.store.records import (
    OUTCOMES,
    RECENT_WINDOW,
    STUNT_STATES,
    AttemptRecord,
    InvalidValue,
    PairOutcome,
    RecentAttempt,
    UnknownUser,
    detail_of,
    next_states,
    witnessed,
)

#: Outcomes whose flag rule reads no history (``records.next_states``): no recent-outcomes query.
SUCCESSES = ("direct", "stunt")


class UsageLog(EngineBound):
    """The ``Database`` operations that record usage (``AsyncStore`` offers them as ``UsageRecorder``)."""

    @translated
    def record_seen(self, user_id: str, ip: str, port: int, when: float) -> None:
        with self.engine.begin() as c:
            result = c.execute(SEEN_UPDATE, {"b_user_id": user_id, "b_ip": ip, "b_port": int(port), "b_when": when})
            if result.rowcount == 0:
                raise UnknownUser(f"unknown user {user_id!r}")

    @translated
    def record_seen_many(self, rows: Sequence[tuple[str, str, int, float]]) -> list[str]:
        """``record_seen`` for many ``(user_id, ip, port, when)`` rows in one
        transaction, in order; returns the user IDs that do not exist.

        The server's write-behind (``AsyncStore.record_seen``) gathers a
        REGISTER's worth of these per 100 ms: one commit instead of one each.
        """
        if not rows:
            return []
        params = [
            {"b_user_id": user_id, "b_ip": ip, "b_port": int(port), "b_when": when}
            for user_id, ip, port, when in rows
        ]
        with self.engine.begin() as c:
            result = c.execute(SEEN_UPDATE, params)
            if self.engine.dialect.supports_sane_multi_rowcount and result.rowcount == len(params):
                return []
            wanted = list(dict.fromkeys(row[0] for row in rows))
            found: set[str] = set()
            for chunk in chunks(wanted):
                found.update(c.execute(select(USERS.c.user_id).where(USERS.c.user_id.in_(chunk))).scalars())
        return [user_id for user_id in wanted if user_id not in found]

    @translated
    def record_nat(self, user_id: str, nat: Mapping[str, Any], when: float) -> None:
        try:
            text = json.dumps(dict(nat), sort_keys=True)
        except (TypeError, ValueError) as e:
            raise InvalidValue(f"NAT description is not JSON: {e}") from e
        with self.engine.begin() as c:
            result = c.execute(update(USERS).where(USERS.c.user_id == user_id).values(nat=text, last_seen=when))
            if result.rowcount == 0:
                raise UnknownUser(f"unknown user {user_id!r}")

    @translated
    def record_attempt(
        self,
        call_id: str,
        caller: str,
        callee: str,
        technique: str | None,
        outcome: str,
        predicted: str | None,
        actual: str | None,
        duration_ms: float | None,
        when: float,
        witnesses: Sequence[str] | None = None,
        detail: str | None = None,
    ) -> dict[str, str]:
        """Store one attempt and apply the flag rule (``next_states``).

        ``witnesses``: the users whose own report agrees with ``outcome``
        (None: both, as for an operator's import); a user's flag moves only
        on its own report. The attempt is stored even if a user has been
        deleted meanwhile; the returned ``{user_id: state}`` holds the users
        that still exist.
        """
        if outcome not in OUTCOMES:
            raise InvalidValue(f"outcome must be one of {', '.join(OUTCOMES)}")
        # Core, not an ORM Session: once per call, and the Session cost several
        # times the SQL (docs/performance.rst).
        with self.engine.begin() as c:
            return _insert_attempt(c, (call_id, caller, callee, technique, outcome, predicted, actual, duration_ms,
                                       when, witnesses, detail))

    @translated
    def record_attempts_many(self, rows: Sequence[Sequence[Any]]) -> list[dict[str, str]]:
        """``record_attempt`` for many rows (its arguments, in its order) in one
        transaction, in order; each row's new states, as ``record_attempt``.

        The server's write-behind (``store/behind.py``) gathers the attempts
        of the next few tens of milliseconds: one commit and one hand-off to
        the store's thread for all of them. Every user row the batch touches
        is locked first, in one sorted order, so two batches (two instances)
        never wait for each other in a cycle.
        """
        for row in rows:
            if row[4] not in OUTCOMES:
                raise InvalidValue(f"outcome must be one of {', '.join(OUTCOMES)}")
        if not rows:
            return []
        with self.engine.begin() as c:
            users = sorted({user for row in rows for user in (row[1], row[2])})
            # Locked once for the batch; each row's rule then reads and updates this copy.
            states = {row.user_id: row.stunt_state for row in c.execute(LOCK_STATES, {"user_ids": users})}
            # The rows go in as one executemany, written early only when a
            # later row's rule must read them (a failure's recent outcomes).
            unwritten: list[dict[str, Any]] = []

            def write() -> None:
                if unwritten:
                    c.execute(ATTEMPT_INSERT, list(unwritten))
                    unwritten.clear()

            results = []
            for row in rows:
                unwritten.append(_attempt_row(tuple(row)))
                results.append(_apply_flags(c, *_rule_inputs(tuple(row)), states, before_read=write))
            write()
            return results

    @translated
    def set_stunt_state(self, user_id: str, state: str) -> None:
        if state not in STUNT_STATES:
            raise InvalidValue(f"state must be one of {', '.join(STUNT_STATES)}")
        with self._session() as s, s.begin():
            self._user(s, user_id).stunt_state = state

    @translated
    def pair_outcomes(self, user_id: str, since: float, limit: int = 500) -> dict[str, PairOutcome]:
        """Each peer's pair with ``user_id``: its latest outcome and the failures since its last success.

        From the attempts between them (either direction) since ``since``,
        newest ``limit`` of the user's; a peer without attempts is absent.
        The trusted peers list shows each pair from the asking user's point
        of view with it (``server/web.py``, issue 12).
        """
        with self._session() as s:
            rows = s.execute(
                select(Attempt.caller, Attempt.callee, Attempt.outcome)
                .where(or_(Attempt.caller == user_id, Attempt.callee == user_id), Attempt.at >= since)
                .order_by(Attempt.at.desc(), Attempt.id.desc())
                .limit(limit)
            ).all()
        pairs: dict[str, PairOutcome] = {}
        settled: set[str] = set()
        for caller, callee, outcome in rows:  # newest first
            other = callee if caller == user_id else caller
            if other not in pairs:
                pairs[other] = PairOutcome(outcome, 0)
            if other in settled:
                continue
            if outcome == "failed":
                pairs[other] = PairOutcome(pairs[other].latest, pairs[other].failures + 1)
            else:
                settled.add(other)
        return pairs

    @translated
    def recent_attempts(self, user_id: str, limit: int = 20) -> list[AttemptRecord]:
        """The user's latest attempts, as caller or callee, newest first."""
        with self._session() as s:
            rows = s.scalars(
                select(Attempt)
                .where(or_(Attempt.caller == user_id, Attempt.callee == user_id))
                .order_by(Attempt.at.desc(), Attempt.id.desc())
                .limit(limit)
            )
            return [
                AttemptRecord(
                    id=a.id,
                    call_id=a.call_id,
                    caller=a.caller,
                    callee=a.callee,
                    technique=a.technique,
                    outcome=a.outcome,
                    predicted=a.predicted,
                    actual=a.actual,
                    duration_ms=a.duration_ms,
                    when=a.at,
                    detail=detail_of(a.detail),
                )
                for a in rows
            ]


def _insert_attempt(c: Connection, row: tuple[Any, ...], locked: dict[str, str] | None = None) -> dict[str, str]:
    """One attempt's row (``record_attempt``'s arguments, in order; the last two
    may be left out) and its flag rule, in the caller's transaction
    (``locked``: see ``_apply_flags``)."""
    c.execute(ATTEMPT_INSERT, _attempt_row(row))
    return _apply_flags(c, *_rule_inputs(row), locked)


def _attempt_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """The attempts table's columns for one ``record_attempt`` argument tuple."""
    call_id, caller, callee, technique, outcome, predicted, actual, duration_ms, when, *rest = row
    witnesses: Sequence[str] | None = rest[0] if rest else None
    return {
        "call_id": call_id, "caller": caller, "callee": callee, "technique": technique,
        "outcome": outcome, "predicted": predicted, "actual": actual, "duration_ms": duration_ms,
        "at": when, "witnesses": None if witnesses is None else ",".join(sorted(set(witnesses))),
        "detail": rest[1] if len(rest) > 1 else None,  # JSON, server/calls/detail.py
    }


def _rule_inputs(row: tuple[Any, ...]) -> tuple[str, str, str, float, Sequence[str] | None]:
    """What the flag rule reads of one argument tuple: outcome, caller, callee, when, witnesses."""
    return row[4], row[1], row[2], row[8], row[9] if len(row) > 9 else None


def _apply_flags(c: Connection, outcome: str, caller: str, callee: str, when: float,
                 witnesses: Sequence[str] | None, held: dict[str, str] | None = None,
                 before_read: Callable[[], None] | None = None) -> dict[str, str]:
    """The flag rule for one stored attempt, in its transaction: the users' new states.

    ``held``: the states of every user this transaction locked already
    (a batch, ``record_attempts_many``); kept up to date here, so the
    batch's next rows see this one's changes without reading them again.
    The callee's recent outcomes are read only when the rule looks at them
    (a failure the callee reported); ``before_read`` runs first (the batch
    writes its rows so far).
    """
    if held is None:
        # Lock both rows, in a fixed order, so concurrent outcomes for the
        # same user (PostgreSQL, several workers) apply one after another.
        locked = {
            row.user_id: row.stunt_state
            for row in c.execute(LOCK_STATES, {"user_ids": sorted({caller, callee})})
        }
    else:
        locked = {user_id: held[user_id] for user_id in (caller, callee) if user_id in held}
    callee_reported = witnesses is None or callee in witnesses
    recent: list[RecentAttempt] = []
    if outcome not in SUCCESSES and callee_reported:
        if before_read is not None:
            before_read()
        recent = [
            RecentAttempt(row.outcome, row.caller if row.callee == callee else row.callee,
                          witnessed(row.witnesses, callee))
            for row in c.execute(
                RECENT_OUTCOMES, {"user_id": callee, "since": when - RECENT_WINDOW, "until": when})
        ]
    new_caller, new_callee = next_states(
        outcome,
        locked.get(caller, "unknown"),
        locked.get(callee, "unknown"),
        recent,
        caller_reported=witnesses is None or caller in witnesses,
        callee_reported=callee_reported,
    )
    states = {user_id: state for user_id, state in ((caller, new_caller), (callee, new_callee))
              if user_id in locked}
    for user_id, state in states.items():
        if state != locked[user_id]:
            c.execute(STATE_UPDATE, {"b_user_id": user_id, "b_state": state})
    if held is not None:
        held.update(states)
    return states
