"""A restartable agent for the manager, made of one-shot ``PeerAgent``s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.failure import Failure

from kerjostunt.client.manager.seams import ManagedAgent

__all__ = ["RestartingAgent"]


class RestartingAgent:
    """Gives the manager an agent it can start again after stopping it.

    ``PeerAgent`` is one-shot (``start`` once, ``stop`` for good), while the
    manager opens and closes signaling many times; each ``start`` here makes
    a fresh agent with ``make_agent()``. Peer connections made by an earlier
    agent outlive it (stopping an agent leaves them up).
    """

    def __init__(self, make_agent: Callable[[], ManagedAgent]) -> None:
        self._make_agent = make_agent
        self.current: ManagedAgent | None = None

    @property
    def signaling_up(self) -> bool:
        return bool(self.current is not None and self.current.signaling_up)

    @property
    def public_ip(self) -> str | None:
        return self.current.public_ip if self.current is not None else None

    def start(self) -> defer.Deferred[Any]:
        self.current = agent = self._make_agent()

        def failed(failure: Failure) -> Failure:
            if self.current is agent:
                self.current = None
            return failure

        started: defer.Deferred[Any] = defer.maybeDeferred(agent.start)
        return started.addErrback(failed)

    def stop(self) -> defer.Deferred[None]:
        agent, self.current = self.current, None
        if agent is None:
            return defer.succeed(None)
        return defer.maybeDeferred(agent.stop)

    def connect(
        self, peer_id: str, protocol_factory: IProtocolFactory, *, timeout: float = 20.0, prefer_stunt: bool = False
    ) -> defer.Deferred[Any]:
        if self.current is None:
            return defer.fail(RuntimeError("signaling is closed"))
        return self.current.connect(peer_id, protocol_factory, timeout=timeout, prefer_stunt=prefer_stunt)
