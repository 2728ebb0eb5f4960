"""
A punch port probed ahead of time, so that a call does not wait for its probes.

Probing the punch port (a fresh reusable port, one Binding request to each
probe endpoint in turn) costs two to three round trips to the server per
probe endpoint.  Done when a call starts, on both sides, it was most of the
time to connect (NAT lab: 2 x 260 ms of 830 ms).  The probes only have to
come *before* the punch, not right before it, so the agent probes its next
punch port while it is idle and keeps it bound; a call, outgoing or
incoming, takes it and skips probing.  See docs/punching.rst.

Two rules keep a prepared port as good as a freshly probed one:

- **No probing while a call dials.**  A sequential NAT gives every new
  connection the next port; probes made during a punch would take the ports
  the server predicted for it.  The agent asks for the next port only when
  no call is left, ``settle`` seconds later.
- **A maximum age.**  The server predicts from the probes; the older they
  are, the more other connections (other applications, other hosts behind
  the NAT) may have moved a sequential NAT on, and an endpoint-independent
  NAT may have dropped the probes' mapping.  A port older than ``max_age``
  (30 s) is closed, and the call probes a new one itself, as without this
  module.  When the probes showed an address-dependent mapping (the
  mapped endpoint differed between probe endpoints), the prediction
  extrapolates the NAT's port counter, which every new connection behind
  the NAT moves on: such a port is used only for ``dependent_max_age``
  (5 s, a home NAT's worth of few new connections).  Not so when the
  probes showed a random allocation: its prediction is no counter but the
  public address alone (the port is a guess nobody relies on: the birthday
  search, a port mapping or IPv6 join such a NAT), so its port keeps for
  ``max_age`` too.  With the 5 s limit a random-NAT callee probed afresh at
  the INVITE of every call more than 5 s after the last, 170 ms before it
  could answer, in 4 of 10 tries of the NAT lab's random/drop +v6 row
  (docs/nat-lab.rst).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.wire.prediction import RANDOM, Sample, classify

__all__ = ["PreparedPort", "ReadyPort"]

log = Logger()


@dataclass
class PreparedPort:
    """A bound reusable punch port and what probing it showed."""

    holder: socket.socket
    local_ip: str
    port: int
    results: list[ProbeResult]
    probed_at: float
    public_ip: str | None = field(default=None)

    @property
    def endpoint_independent(self) -> bool:
        """Every probe endpoint saw the same mapping (or there was only one probe)."""
        return len({(r.mapped_ip, r.mapped_port) for r in self.results}) <= 1

    @property
    def extrapolated(self) -> bool:
        """The server's prediction for this port counts on the NAT's port counter:
        an address-dependent mapping whose allocation is not random."""
        if self.endpoint_independent:
            return False
        samples = [Sample(local_port=r.local_port, mapped_ip=r.mapped_ip, mapped_port=r.mapped_port,
                          server_ip=r.server[0], server_port=r.server[1], time=float(i), local_ip=self.local_ip)
                   for i, r in enumerate(self.results)]
        return classify(samples).allocation != RANDOM

    def close(self) -> None:
        self.holder.close()


class ReadyPort:
    """
    At most one prepared punch port, refilled when no call is running.

    ``prepare`` binds and probes a new port: it fires with a
    ``PreparedPort``, or with None when there is nothing to probe with (no
    registration, no probe ports offered); it may fail.  ``take`` hands the
    port to a call (waiting for a preparation already under way, since it is
    partly done); ``refill`` schedules the next one; ``clear`` closes
    everything (signaling lost, agent stopped).
    """

    def __init__(
        self,
        clock: IReactorTime,
        prepare: Callable[[], defer.Deferred[PreparedPort | None]],
        *,
        max_age: float = 30.0,
        dependent_max_age: float = 5.0,
        settle: float = 0.5,
    ) -> None:
        self.clock = clock
        self.prepare = prepare
        self.max_age = max_age
        self.dependent_max_age = dependent_max_age
        self.settle = settle
        self._ready: PreparedPort | None = None
        self._preparing: defer.Deferred[PreparedPort | None] | None = None
        self._takers: list[defer.Deferred[PreparedPort | None]] = []
        self._watchers: list[defer.Deferred[None]] = []
        self._timer: IDelayedCall | None = None
        self._generation = 0  # bumped by clear(): a preparation started before it is discarded
        #: the newest probes of several endpoints from any punch port: what our NAT does, for a
        #: call the server asks for one probe only (``X-Kerjo-Probes``; calls/base.py)
        self.latest: list[ProbeResult] = []
        #: when the last preparation failed (no probe answered), None after a success
        self.failed_at: float | None = None

    @property
    def ready(self) -> bool:
        return self._fresh(self._ready)

    def failed_recently(self) -> bool:
        """The last preparation found no probe server answering, less than ``max_age`` ago.

        A call then does not probe either: it would wait out the same
        timeouts (up to three times ``probe_timeout``) before its INVITE,
        and the server predicts from the signaling address without probes.
        """
        return self.failed_at is not None and self.clock.seconds() - self.failed_at < self.max_age

    def refill(self, delay: float | None = None) -> None:
        """Prepare the next port after ``delay`` (default ``settle``) unless one is ready or coming."""
        if self._preparing is not None or self._fresh(self._ready) or self._timer is not None:
            return
        if delay == 0:
            self._start()
        else:
            self._timer = self.clock.callLater(self.settle if delay is None else delay, self._start)

    def take(self) -> defer.Deferred[PreparedPort | None]:
        """The prepared port if it is fresh (it becomes the caller's), else None."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._preparing is not None:
            taker: defer.Deferred[PreparedPort | None] = defer.Deferred()
            self._takers.append(taker)
            return taker
        return defer.succeed(self._pop())

    def when_ready(self) -> defer.Deferred[None]:
        """Fires (with None) once the preparation under way, if any, has ended."""
        if self._preparing is None:
            return defer.succeed(None)
        watcher: defer.Deferred[None] = defer.Deferred()
        self._watchers.append(watcher)
        return watcher

    def clear(self) -> None:
        """Close the prepared port and forget a preparation under way."""
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()
        self._preparing = None
        self._wake(None)

    # -- inside ------------------------------------------------------------------------

    def _fresh(self, port: PreparedPort | None) -> bool:
        if port is None:
            return False
        limit = min(self.max_age, self.dependent_max_age) if port.extrapolated else self.max_age
        return self.clock.seconds() - port.probed_at <= limit

    def _pop(self) -> PreparedPort | None:
        ready, self._ready = self._ready, None
        if ready is not None and not self._fresh(ready):
            log.debug("prepared punch port {port} is {age:.0f} s old: not used",
                      port=ready.port, age=self.clock.seconds() - ready.probed_at)
            ready.close()
            return None
        return ready

    def _start(self) -> None:
        self._timer = None
        if self._preparing is not None or self._fresh(self._ready):
            return
        stale, self._ready = self._ready, None
        if stale is not None:
            stale.close()
        generation = self._generation
        d = defer.maybeDeferred(self.prepare)
        self._preparing = d
        d.addBoth(self._prepared, generation)

    def _prepared(self, result: PreparedPort | None | Failure, generation: int) -> None:
        if generation != self._generation:  # cleared meanwhile
            if isinstance(result, PreparedPort):
                result.close()
            return
        self._preparing = None
        if isinstance(result, Failure):
            log.info("preparing a punch port failed: {why}", why=result.getErrorMessage())
            self.failed_at = self.clock.seconds()
            result = None
        elif result is not None:
            self.failed_at = None
            self.latest = list(result.results)
            log.debug("punch port {port} prepared", port=result.port)
        self._ready = result
        self._wake(self._pop() if self._takers else None)

    def _wake(self, port: PreparedPort | None) -> None:
        """The first call waiting gets ``port``; other calls probe for themselves."""
        takers, self._takers = self._takers, []
        watchers, self._watchers = self._watchers, []
        for taker in takers:
            taker.callback(port)
            port = None
        for watcher in watchers:
            watcher.callback(None)
