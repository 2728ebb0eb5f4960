"""The reactor the server runs on, as one typing-only interface."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorCore, IReactorSocket, IReactorTCP

from kerjostunt.store.api import IStoreReactor
from kerjostunt.store.channels import IChannelsReactor

__all__ = ["IServerReactor"]


class IServerReactor(IStoreReactor, IChannelsReactor, IReactorCore, IReactorTCP, IReactorSocket):
    """Timers, threads, start-up hooks, TCP, descriptors (the cluster bus): what ``StuntServer`` asks.

    A combination of Twisted's interfaces for typing only (like Twisted's own
    ``_IReactorCommon``): every real reactor provides them all, nothing
    declares this one. Tests pass a ``MemoryReactorClock`` or the real reactor.
    """
