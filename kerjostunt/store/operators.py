"""What an operator reads and who is one: attempt listings, the /status window, the operator flag.

``kerjostunt attempts`` lists attempts with each technique's result
(``attempts.detail``); the web service's /status page reads the last hour;
a user with the ``operator`` flag (``kerjostunt operator add ID``) may read
/status (docs/admin.rst, docs/web.rst).
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select, update

from kerjostunt.store.models import Attempt, User
from kerjostunt.store.queries import EngineBound, translated
from kerjostunt.store.records import AttemptRecord, UnknownUser, check_name, detail_of

__all__ = ["Operations"]


def _record(a: Attempt) -> AttemptRecord:
    return AttemptRecord(id=a.id, call_id=a.call_id, caller=a.caller, callee=a.callee, technique=a.technique,
                         outcome=a.outcome, predicted=a.predicted, actual=a.actual, duration_ms=a.duration_ms,
                         when=a.at, detail=detail_of(a.detail))


class Operations(EngineBound):
    """The ``Database`` operations for operators."""

    @translated
    def set_operator(self, user_id: str, operator: bool) -> None:
        with self.engine.begin() as c:
            result = c.execute(update(User).where(User.user_id == check_name(user_id, "user ID"))
                               .values(operator=operator))
            if result.rowcount == 0:
                raise UnknownUser(f"unknown user {user_id!r}")

    @translated
    def is_operator(self, user_id: str) -> bool:
        """False for an unknown user too: the web asks after the password check."""
        with self.engine.connect() as c:
            return bool(c.execute(select(User.operator).where(User.user_id == user_id)).scalar())

    @translated
    def operator_ids(self) -> list[str]:
        with self.engine.connect() as c:
            return list(c.execute(select(User.user_id).where(User.operator.is_(True)).order_by(User.user_id))
                        .scalars())

    @translated
    def attempts(self, user_id: str | None = None, peer: str | None = None, last: int = 20) -> list[AttemptRecord]:
        """The latest ``last`` attempts, oldest first: of ``user_id`` (either side), with ``peer``."""
        query = select(Attempt)
        if user_id is not None and peer is not None:
            query = query.where(or_(and_(Attempt.caller == user_id, Attempt.callee == peer),
                                    and_(Attempt.caller == peer, Attempt.callee == user_id)))
        elif user_id is not None or peer is not None:
            who = user_id if user_id is not None else peer
            query = query.where(or_(Attempt.caller == who, Attempt.callee == who))
        with self._session() as s:
            rows = s.scalars(query.order_by(Attempt.at.desc(), Attempt.id.desc()).limit(max(1, last))).all()
            return [_record(a) for a in reversed(rows)]

    @translated
    def attempts_since(self, since: float, limit: int = 20000) -> list[AttemptRecord]:
        """Every attempt at or after ``since``, oldest first, at most ``limit`` (the newest)."""
        with self._session() as s:
            rows = s.scalars(select(Attempt).where(Attempt.at >= since)
                             .order_by(Attempt.at.desc(), Attempt.id.desc()).limit(limit)).all()
            return [_record(a) for a in reversed(rows)]
