"""The relay's part of a call's race (nat/relay.py, docs/relay.rst), mixed into the Dialer.

The relay is the last resort (or the only one, when the NATs leave no
direct path): the callee's allocation waits for the caller's Connect,
the caller allocates and Connects once its direct techniques failed, or
at once; either way the relayed stream goes through the same per-call
handshake as every other technique.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python.failure import Failure

from kerjostunt.client.calls.setup import CallSetup, Endpoint, reason_of, relay_plan
from kerjostunt.client.nat import relay
from kerjostunt.client.nat.contest import Contest
from kerjostunt.client.nat.sockets import SocketReactor
from kerjostunt.client.nat.turn import Allocation, TurnError

if TYPE_CHECKING:
    from kerjostunt.client.calls.race import DialResult, _RaceInputs

__all__ = ["RelayRace"]


class RelayRace:
    """The relay technique of ``Dialer`` (race.py), which owns these attributes."""

    reactor: SocketReactor
    setup: CallSetup
    local_ip: str
    pending: int
    errors: list[str]
    handshakes: Any
    _contest: Contest[DialResult]
    _life: _RaceInputs
    _relay: Allocation | None
    _relay_started: bool
    _relay_error: str
    _won: str

    def _attempt_failed(self, why: str, attempt: int | None = None) -> None:
        raise NotImplementedError  # Dialer's

    def accept_relay(self, allocation: Allocation) -> None:
        """The callee's allocation: the caller's Connect arrives as a ConnectionAttempt.

        It counts as an attempt in flight until then (or the safety net):
        the caller may relay only once its direct techniques failed.
        """
        self._relay = allocation
        self.pending += 1
        relay.accept_side(allocation, self.handshakes, self._relay_connected, self._relay_failed)

    @property
    def failed_technique(self) -> str:
        """The technique a failed outcome names: ``relay`` when the relay was tried (the server records it)."""
        return "relay" if self._relay_error else "none"

    def relay_unavailable(self, why: str) -> None:
        """The callee could not allocate: the call goes on without a relay."""
        self._relay_error = why
        self.errors.append(f"relay: {why}")

    def _relay_due(self, when: str) -> bool:
        offer = self.setup.relay
        return (offer is not None and offer.when == when and self.setup.role == "initiator"
                and not self._relay_started)

    def _start_relay(self) -> None:
        offer = self.setup.relay
        assert offer is not None
        self._relay_started = True
        peers = [c.endpoint for c in sorted(self.setup.remote.of_type("relay"), key=lambda c: -c.priority)]
        self.pending += 1
        plan = relay_plan(offer, self.local_ip)
        d = self._contest.track(defer.Deferred.fromCoroutine(
            relay.dial_side(self.reactor, plan, peers, self.handshakes)))
        d.addCallbacks(self._relay_dialed, self._relay_dial_failed)

    def _relay_dialed(self, result: tuple[Any, Allocation, Endpoint]) -> None:
        protocol, allocation, peer = result
        self._relay = allocation
        self._relay_connected(protocol, peer)

    def _relay_connected(self, protocol: Any, peer: Endpoint) -> None:
        self.pending -= 1  # the handshake takes over the count
        self._life.contend(protocol, peer, "relay", "relay")

    def _relay_dial_failed(self, reason: Failure) -> None:
        if reason.check(defer.CancelledError):
            return
        value = reason.value
        self._relay_failed(value.reason if isinstance(value, (relay.RelayFailed, TurnError)) else reason_of(reason))

    def _relay_failed(self, why: str) -> None:
        self._relay_error = why
        self._attempt_failed(f"relay: {why}")

    def _release_relay(self) -> None:
        """The race is over: an allocation that did not win is freed (one that won lives with its connection)."""
        allocation, self._relay = self._relay, None
        if allocation is not None and self._won != "relay":
            allocation.close()
