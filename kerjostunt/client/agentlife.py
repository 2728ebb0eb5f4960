"""The agent's signaling life as a state machine: idle, starting, up, reconnecting, stopped.

::

    idle --start--> starting --registered--> up --lost--> reconnecting
      ^                |                      ^               |   ^
      +--start_failed--+                      +--registered---+   | retry_failed
                                                                  +--+
    every state --stop--> stopped (for good: a PeerAgent is one-shot)

``start`` fails in every state but idle ("agent already up"); ``start`` does
not retry (a wrong password is reported, not hammered), only a connection
lost once ``up`` is retried, with backoff. A REGISTER that completes after
``stop`` is hung up.

Every input returns None: Automat postpones an input made while another one's
outputs run (a Deferred firing synchronously inside them) and can do that
only for inputs without a result. So ``start``/``stop`` take the Deferred
they fire, and the one thing callers ask of the life (may a call wait for a
registration now?) is kept by the outputs in ``LifeCore.refusal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from automat._typed import TypedState  # automat exports the builder, not its state type

__all__ = ["LifeCore", "LifeHost", "SignalingLife", "build_life"]


class SignalingLife(Protocol):
    """The inputs: what happens to the agent's signaling connection."""

    def start(self, started: defer.Deferred[Any]) -> None:
        """The application asked to start; ``started`` fires with the first registration."""

    def start_failed(self) -> None:
        """The first connect-and-REGISTER failed."""

    def registered(self, sig: Any, registration: Any) -> None:
        """A connect-and-REGISTER succeeded with ``sig``."""

    def lost(self) -> None:
        """The registered signaling connection went away."""

    def retry_due(self) -> None:
        """The reconnect timer fired."""

    def retry_failed(self, failure: Failure) -> None:
        """A reconnect attempt failed."""

    def calls_over(self) -> None:
        """The last call ended."""

    def stop(self, stopped: defer.Deferred[None]) -> None:
        """The application asked to stop; ``stopped`` fires once signaling is closed."""


class LifeHost(Protocol):
    """What the machine has the agent do (PeerAgent implements it)."""

    def begin_start(self, started: defer.Deferred[Any]) -> None:
        """Listen, connect and REGISTER, firing ``started``; ``start_failed`` when it fails."""

    def abandon_start(self) -> None:
        """Undo what ``begin_start`` set up (the app port)."""

    def adopt(self, sig: Any, registration: Any) -> None:
        """Keep ``sig``: keepalives, refresh timer, prepare a punch port, wake waiting calls."""

    def hang_up_stray(self, sig: Any) -> None:
        """Close ``sig``, registered after all, when nobody wants it any more."""

    def reconnect_later(self) -> None:
        """Schedule the next reconnect attempt (backoff)."""

    def reconnect_now(self) -> None:
        """Connect and REGISTER again; ``registered`` or ``retry_failed`` follows."""

    def log_retry_failure(self, failure: Failure) -> None:
        """Say why a reconnect attempt failed."""

    def log_lost(self) -> None:
        """Say that the registered connection was lost."""

    def refill_ready_port(self) -> None:
        """Prepare the next punch port (no call is running)."""

    def shut_down(self, stopped: defer.Deferred[None]) -> None:
        """Stop calls and timers, unregister, close signaling and the app port; fire ``stopped``."""


@dataclass
class LifeCore:
    """The machine's data: the agent, and why calls cannot wait for a registration (None: they can)."""

    host: LifeHost
    refusal: str | None = "the agent is idle, not registered"


def _refusing(why: str | None) -> Callable[[LifeCore], None]:
    def set_refusal(core: LifeCore) -> None:
        core.refusal = why

    return set_refusal


_IDLE = _refusing("the agent is idle, not registered")
_STOPPED = _refusing("the agent is stopped, not registered")
_AVAILABLE = _refusing(None)


_State: TypeAlias = "TypedState[SignalingLife, LifeCore]"


class _StartImpl(Protocol):
    def __call__(self, life: SignalingLife, core: LifeCore, /, started: defer.Deferred[Any]) -> None: ...


def _already(name: str) -> _StartImpl:
    def refuse(life: SignalingLife, core: LifeCore, started: defer.Deferred[Any]) -> None:
        started.errback(RuntimeError(f"agent already {name}"))

    return refuse


def _build() -> Callable[[LifeCore], SignalingLife]:
    builder = TypeMachineBuilder(SignalingLife, LifeCore)
    idle = builder.state("idle")
    starting = builder.state("starting")
    up = builder.state("up")
    reconnecting = builder.state("reconnecting")
    stopped = builder.state("stopped")
    everywhere = (idle, starting, up, reconnecting, stopped)

    @idle.upon(SignalingLife.start).to(starting)
    def begin(life: SignalingLife, core: LifeCore, started: defer.Deferred[Any]) -> None:
        _AVAILABLE(core)
        core.host.begin_start(started)

    for state, name in ((starting, "starting"), (up, "up"), (reconnecting, "reconnecting"), (stopped, "stopped")):
        state.upon(SignalingLife.start).loop()(_already(name))

    @starting.upon(SignalingLife.start_failed).to(idle)
    def start_failed(life: SignalingLife, core: LifeCore) -> None:
        _IDLE(core)
        core.host.abandon_start()

    @starting.upon(SignalingLife.registered).to(up)
    @reconnecting.upon(SignalingLife.registered).to(up)
    def adopt(life: SignalingLife, core: LifeCore, sig: Any, registration: Any) -> None:
        core.host.adopt(sig, registration)

    for state in (idle, up, stopped):

        @state.upon(SignalingLife.registered).loop()
        def stray(life: SignalingLife, core: LifeCore, sig: Any, registration: Any) -> None:
            core.host.hang_up_stray(sig)

    @up.upon(SignalingLife.lost).to(reconnecting)
    def lost(life: SignalingLife, core: LifeCore) -> None:
        core.host.log_lost()
        core.host.reconnect_later()

    @reconnecting.upon(SignalingLife.retry_due).loop()
    def retry(life: SignalingLife, core: LifeCore) -> None:
        core.host.reconnect_now()

    @reconnecting.upon(SignalingLife.retry_failed).loop()
    def retry_failed(life: SignalingLife, core: LifeCore, failure: Failure) -> None:
        core.host.log_retry_failure(failure)
        core.host.reconnect_later()

    @up.upon(SignalingLife.calls_over).loop()
    def refill(life: SignalingLife, core: LifeCore) -> None:
        core.host.refill_ready_port()

    for state in everywhere:

        @state.upon(SignalingLife.stop).to(stopped)
        def stop(life: SignalingLife, core: LifeCore, stopped: defer.Deferred[None]) -> None:
            _STOPPED(core)
            core.host.shut_down(stopped)

    _ignore_the_rest(idle, starting, up, reconnecting, stopped)
    return builder.build()


def _ignore_the_rest(idle: _State, starting: _State, up: _State, reconnecting: _State, stopped: _State) -> None:
    """A late timer, a stale event: nothing happens."""
    ignored: dict[Callable[..., None], tuple[_State, ...]] = {
        SignalingLife.start_failed: (idle, up, reconnecting, stopped),
        SignalingLife.lost: (idle, starting, reconnecting, stopped),
        SignalingLife.retry_due: (idle, starting, up, stopped),
        SignalingLife.retry_failed: (idle, starting, up, stopped),
        SignalingLife.calls_over: (idle, starting, reconnecting, stopped),
    }
    for an_input, states in ignored.items():
        for state in states:
            state.upon(an_input).loop().returns(None)


_LIFE = _build()


def build_life(host: LifeHost) -> tuple[SignalingLife, LifeCore]:
    """A fresh life in ``idle`` for ``host``, and its core (``core.refusal`` is the one query)."""
    core = LifeCore(host)
    return _LIFE(core), core
