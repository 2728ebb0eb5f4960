"""Who is online: user ID -> the signaling connection it registered on.

Pure in-memory state with a clock for expiry.  Requests from the server to a
peer go down the connection that peer registered on (RFC 5923 style), so a
binding holds the connection object itself, not an address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from kerjostunt.wire.sip.message import Request, Response

log = Logger()


class SignalingConnection(TypingProtocol):
    """What the rest of the server may do with a peer's connection."""

    peer: tuple[str, int]
    user_ids: set[str]

    @property
    def rtt(self) -> float | None: ...

    def send(self, message: Request | Response) -> None: ...

    def close(self) -> None: ...

    def bound(self, user_id: str) -> None: ...

    def unbound(self, user_id: str) -> None: ...


@dataclass
class Binding:
    """One registered user: where it is reachable and until when."""

    user_id: str
    connection: SignalingConnection
    contact: str
    expires_at: float
    registered_at: float
    timer: IDelayedCall | None = field(default=None, repr=False)

    #: the other IP family's public address, from a probe over it (``note_address``)
    other_family: tuple[str, int] | None = None
    #: the gateway's mapping of its app port at its public address, as its REGISTER named it
    port_mapping: tuple[str, int] | None = None

    @property
    def public_address(self) -> tuple[str, int]:
        return self.connection.peer

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The signaling connection's address, then the other family's if a probe showed it."""
        return [self.public_address] + ([self.other_family] if self.other_family else [])


class Registrar:
    """Bindings with expiry; replacing, removing, and forgetting lost connections."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._bindings: dict[str, Binding] = {}
        self._listeners: list[Callable[[str, bool], None]] = []

    def subscribe(self, listener: Callable[[str, bool], None]) -> None:
        """``listener(user_id, online)`` on every change (metrics, calls)."""
        self._listeners.append(listener)

    def _notify(self, user_id: str, online: bool) -> None:
        for listener in self._listeners:
            listener(user_id, online)

    def bind(self, user_id: str, connection: SignalingConnection, contact: str, expires: float) -> Binding:
        """Register or refresh; a binding from another connection replaces the old one."""
        now = self._clock.seconds()
        old = self._bindings.get(user_id)
        if old is not None:
            self._cancel(old)
            if old.connection is not connection:
                old.connection.unbound(user_id)
                log.info("{user} moved to a new connection {peer}", user=user_id, peer=connection.peer)
        registered_at = old.registered_at if old and old.connection is connection else now
        binding = Binding(user_id, connection, contact, now + expires, registered_at)
        if old is not None and old.connection is connection:
            binding.other_family = old.other_family
        binding.timer = self._clock.callLater(expires, self._expire, user_id, connection)
        self._bindings[user_id] = binding
        connection.bound(user_id)
        if old is None:
            self._notify(user_id, True)
        return binding

    def unbind(self, user_id: str, connection: SignalingConnection | None = None) -> bool:
        """Remove a binding (only if it is on ``connection``, when one is given)."""
        binding = self._bindings.get(user_id)
        if binding is None or (connection is not None and binding.connection is not connection):
            return False
        del self._bindings[user_id]
        self._cancel(binding)
        binding.connection.unbound(user_id)
        self._notify(user_id, False)
        return True

    def connection_lost(self, connection: SignalingConnection) -> list[str]:
        """Forget every user bound to a connection that went away."""
        gone = [uid for uid in list(connection.user_ids) if self.unbind(uid, connection)]
        return gone

    def note_address(self, user_id: str, ip: str, port: int) -> None:
        """A probe over the family the user did not register from: its address there.

        The first one of a connection's registration stays (a probe token
        pins only its own family's address: a replay from elsewhere cannot
        move an address already shown); a new connection starts afresh.
        """
        binding = self._bindings.get(user_id)
        if binding is None or _family(ip) == _family(binding.public_address[0]):
            return
        if binding.other_family is None:
            binding.other_family = (ip, port)
            log.info("{user} is also at {ip}", user=user_id, ip=ip)

    def lookup(self, user_id: str) -> Binding | None:
        return self._bindings.get(user_id)

    def __len__(self) -> int:
        return len(self._bindings)

    def __iter__(self) -> Iterator[Binding]:
        return iter(list(self._bindings.values()))

    def _expire(self, user_id: str, connection: SignalingConnection) -> None:
        binding = self._bindings.get(user_id)
        if binding is not None and binding.connection is connection:
            binding.timer = None
            log.info("Registration of {user} expired", user=user_id)
            self.unbind(user_id, connection)

    @staticmethod
    def _cancel(binding: Binding) -> None:
        if binding.timer is not None and binding.timer.active():
            binding.timer.cancel()
        binding.timer = None


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4
