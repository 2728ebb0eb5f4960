"""What the calls need from the rest of the server, and their settings.

Each collaborator is a ``typing.Protocol`` of exactly the methods the calls
use, so the store, the probe service's observation log, the reactor and the
test fakes satisfy it structurally and none of them is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from twisted.internet.defer import Deferred

from kerjostunt.wire.kerjo import RelayOffer
from kerjostunt.wire.prediction import Prediction, Sample

if TYPE_CHECKING:
    from kerjostunt.server.registrar import SignalingConnection


class Timer(Protocol):
    """A pending ``callLater`` (``IDelayedCall``), as much as the calls use."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The reactor's ``IReactorTime``, as much as the calls use; a ``task.Clock`` in tests."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: object, **kw: object) -> Timer: ...


class Attempt(TypedDict):
    """One call's row in the attempts table: what ``CallStore.record_attempt`` takes besides ``when``."""

    call_id: str
    caller: str
    callee: str
    technique: str | None
    outcome: str
    predicted: str | None
    actual: str | None
    duration_ms: float | None
    #: the users whose own report agrees with ``outcome``: only their flags may move (issue 13)
    witnesses: tuple[str, ...]
    #: JSON: each side's race, predicted window and NAT (calls/detail.py)
    detail: str | None


class CallStore(Protocol):
    """The store's asynchronous API as the calls use it (one round trip per INVITE, one per call)."""

    def call_check(self, caller: str, callee: str) -> Deferred[str]:
        """'unknown' (no such callee), 'no-group' (no group holds both) or 'ok'."""
        ...

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
        witnesses: tuple[str, ...] | None = None,
        detail: str | None = None,
    ) -> Deferred[Any]: ...


class Observations(Protocol):
    """The probe service's observation log: the samples a user's probes left."""

    def samples(self, user_id: str) -> list[Sample]: ...

    def behind(self, public_ip: str) -> list[Sample]:
        """The recent samples of every user seen at ``public_ip`` (one NAT), oldest first."""
        ...

    def last_probe_behind(self, public_ip: str, excluding: Collection[str]) -> float | None:
        """When a user not in ``excluding`` last probed through ``public_ip``."""
        ...


class Elsewhere(Protocol):
    """Users bound on other instances of a cluster (``server/cluster/``); None on one instance."""

    def connection_of(self, user_id: str) -> SignalingConnection | None:
        """A stand-in for the user's connection on the instance that holds it, or None."""
        ...

    def prediction_of(self, conn: SignalingConnection) -> Prediction | None:
        """For a stand-in: the prediction its instance made from the user's probes, if it sent one."""
        ...


class RelayDecider(Protocol):
    """The opt-in TURN relay (``server/relay.py``'s RelayGate) as the calls use it."""

    def decide(self, caller: str, callee: str, unjoinable: str,
               pair_failures: int) -> Deferred[dict[str, RelayOffer]] | None:
        """None: no relay for this call; else fires with user -> offer ({} when not allowed), never fails."""
        ...


@dataclass(frozen=True)
class CallSettings:
    """How long calls wait, linger, and how often one user may call."""

    #: seconds the callee has for a final response to the forwarded INVITE
    answer_timeout: float = 15.0
    #: seconds after the dial moment within which the outcome must be reported
    outcome_timeout: float = 30.0
    #: ``100 Trying`` goes to the caller only if the call has no other answer this many seconds
    #: after its INVITE (RFC 3261 17.2.1): most calls are answered sooner, and save the message
    trying_delay: float = 0.2
    #: seconds an ended call stays in the table to answer stray requests and responses
    linger: float = 32.0
    #: INVITEs per second one caller may send, and the burst allowed above it
    invite_rate: float = 5.0
    invite_burst: float = 20.0
    #: seconds between the dial moments of two calls through one sequential, address-dependent
    #: NAT, so that their SYNs take its ports in the order the predictions assumed (lanes.py)
    nat_dial_gap: float = 0.1
    #: seconds a sequential NAT must have shown no new probe before a call's turn there goes on
    nat_quiet: float = 0.1
    #: a caller waiting for its turn at a NAT hears ``182 Queued`` this often (seconds)
    queued_notice: float = 10.0
    #: seconds a caller's success waits for the callee's own report before it is recorded
    report_grace: float = 2.0
    #: the server's own addresses: never forwarded as a candidate (wire/candidates.py)
    server_addresses: frozenset[str] = frozenset()
