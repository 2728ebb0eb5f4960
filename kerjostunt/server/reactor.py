"""The reactor the server runs on, as one typing-only interface."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorCore, IReactorTCP

from kerjostunt.store.api import IStoreReactor

__all__ = ["IServerReactor"]


class IServerReactor(IStoreReactor, IReactorCore, IReactorTCP):
    """Timers, threads, start-up hooks, TCP: what ``StuntServer`` asks of its reactor.

    A combination of Twisted's interfaces for typing only (like Twisted's own
    ``_IReactorCommon``): every real reactor provides them all, nothing
    declares this one. Tests pass a ``MemoryReactorClock`` or the real reactor.
    """
