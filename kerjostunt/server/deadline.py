"""A store call's answer, or ``StoreTimeout`` once a deadline has passed.

A locked or hung database must not leave a peer without an answer: REGISTER
waits ``STORE_DEADLINE`` for the credentials and then answers 503 with
Retry-After; the web answers 503 after its own limit. The store's own
Deferred is not cancelled (its thread keeps running and ``AsyncStore``
keeps counting it, so a shutdown still waits for it); only the caller stops
waiting, and a late answer is dropped (a late failure is logged at debug).
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.store import StoreError

log = Logger()
_T = TypeVar("_T")

#: seconds REGISTER waits for the store before answering 503
STORE_DEADLINE = 2.0


class StoreTimeout(StoreError):
    """The database did not answer in time."""


def within(clock: IReactorTime, seconds: float, work: Deferred[_T]) -> Deferred[_T]:
    """``work``'s result if it comes within ``seconds``, else a ``StoreTimeout`` failure."""
    answer: Deferred[_T] = Deferred()

    def give_up() -> None:
        answer.errback(StoreTimeout(f"no answer from the database in {seconds:g} s"))

    timer = clock.callLater(seconds, give_up)

    def done(outcome: _T | Failure) -> None:
        if timer.active():
            timer.cancel()
        if answer.called:
            if isinstance(outcome, Failure):
                log.debug("A store call failed after its caller gave up: {why}", why=outcome.getErrorMessage())
            return
        if isinstance(outcome, Failure):
            answer.errback(outcome)
        else:
            answer.callback(outcome)

    work.addBoth(done)
    return answer
