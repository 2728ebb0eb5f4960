"""Call attempts written behind, many per transaction (issue 16's per-call cost).

Each call's attempt used to be a transaction and a hand-off to the store's
thread of its own: about 0.7 ms of the server's CPU per call, a third of
it. ``AsyncStore.record_attempt`` now hands its row to ``AttemptsBehind``,
which gathers the rows of the next ``ATTEMPT_DELAY`` seconds (or
``ATTEMPT_BATCH`` of them) and writes them with
``Database.record_attempts_many``: one transaction, in order, so the flag
rule sees each attempt after the ones before it exactly as one at a time.

Nothing is lost or hidden by the wait:

- the batch is a usage record (``store/lanes.py``): a busy database retries
  it for as long as it takes, and a stop saves it to the pending file;
- a batch the database refuses otherwise (not busy) is tried again one row
  at a time, so one bad row fails alone and every other is written; a row
  that still fails fails its caller's Deferred, which logs it;
- ``AsyncStore.stop`` sends what is held before it waits for the queue;
- readers that need the attempts or the flags they move (the peers list's
  pair outcomes, ``/status``, a user's record and flag) call ``settled``
  first: it sends what is held and waits for every batch sent so far, so a
  read never misses an attempt this process acknowledged. (With several
  store threads, PostgreSQL, a read queued after a batch could otherwise
  run beside it.) Another process (``kerjostunt attempts``) sees a call's
  attempt at most ``ATTEMPT_DELAY`` seconds later than before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.store.lanes import Gathered
from kerjostunt.store.records import StoreBusy

__all__ = ["ATTEMPT_BATCH", "ATTEMPT_DELAY", "AttemptsBehind"]

ATTEMPT_DELAY = 0.05  # seconds an attempt may wait to share a transaction
ATTEMPT_BATCH = 50  # attempts that are written at once without waiting

Row = tuple[Any, ...]  # record_attempt's arguments, in its order
States = dict[str, str]


class AttemptsBehind:
    """The held-back attempts, and the batches on their way to the database.

    ``write_many`` stores rows in one transaction and hands each row's new
    states (or the Failure) to its second argument; ``write_one`` stores one
    row (the retry of a refused batch) likewise. Both are
    ``AsyncStore._submit`` calls of the usage kind, whose ``then`` runs
    before the store counts the call done: ``stop`` fires after every
    caller has its answer.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        write_many: Callable[[list[Row], Callable[[Any], None]], object],
        write_one: Callable[[Row, Callable[[Any], None]], object],
        delay: float = ATTEMPT_DELAY,
        size: int = ATTEMPT_BATCH,
    ) -> None:
        self._write_many, self._write_one = write_many, write_one
        self._gathered = Gathered(clock, delay, size, self._send)
        self._sent = 0  # batches sent so far (each one's number)
        self._in_flight: set[int] = set()  # the numbers of those not yet answered
        #: readers waiting, each for the batches up to the number it was given
        self._readers: list[tuple[int, Deferred[None]]] = []
        self.held = 0  # rows gathered, not yet sent

    def add(self, row: Row) -> Deferred[States]:
        """Hold ``row`` for the next batch; fires with its new states once written."""
        self.held += 1
        return self._gathered.add(row)

    def flush(self) -> None:
        """Send what is held now, as one batch."""
        self._gathered.flush()

    def settled(self, failing: bool = False) -> Deferred[None]:
        """Send what is held; fires once every batch sent until now is written or
        failed (not those sent later: a steady stream of calls does not starve
        the reader), or at once while writes are ``failing`` (see ``release``)."""
        self.flush()
        if not self._in_flight or failing:
            return succeed(None)
        reader: Deferred[None] = Deferred()
        self._readers.append((self._sent, reader))
        return reader

    def release(self) -> None:
        """Writes met a locked or lost database: the readers waiting go on now and
        see what is stored, as every read does then (``store/lanes.py``)."""
        readers, self._readers = self._readers, []
        for _upto, reader in readers:
            reader.callback(None)

    def _send(self, items: list[tuple[Row, Deferred[States]]]) -> None:
        self.held -= len(items)
        self._sent += 1
        number = self._sent
        self._in_flight.add(number)

        def fan_out(result: list[States] | Failure) -> None:
            if isinstance(result, Failure):
                self._refused(items, result, number)
                return
            for index, (_row, waiter) in enumerate(items):
                # A batch kept in the pending file fires with [] (pending.USAGE_OPS).
                waiter.callback(result[index] if index < len(result) else {})
            self._landed(number)

        self._write_many([row for row, _ in items], fan_out)

    def _refused(self, items: list[tuple[Row, Deferred[States]]], failure: Failure, number: int) -> None:
        """The batch failed (not busy: the lanes retry those): each row on its own,
        so one the database refuses does not take the others with it."""
        if len(items) == 1 or failure.check(StoreBusy):
            for _row, waiter in items:
                waiter.errback(failure)
            self._landed(number)
            return
        self.log.warn("A batch of {n} attempts was refused ({why}); writing them one by one",
                      n=len(items), why=failure.getErrorMessage())
        left = [len(items)]

        def answer(waiter: Deferred[States], result: States | Failure) -> None:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
            left[0] -= 1
            if left[0] == 0:
                self._landed(number)

        for row, waiter in items:
            self._write_one(row, functools.partial(answer, waiter))

    def _landed(self, number: int) -> None:
        self._in_flight.discard(number)
        oldest = min(self._in_flight, default=self._sent + 1)
        ready = [reader for upto, reader in self._readers if upto < oldest]
        self._readers = [(upto, reader) for upto, reader in self._readers if upto >= oldest]
        for reader in ready:
            reader.callback(None)
