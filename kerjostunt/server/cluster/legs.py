"""The two ends of a call leg that crosses instances.

The instance that got the INVITE runs the whole call, as on one instance
(its ``CallManager`` is the B2BUA of both dialogs). For the callee bound on
another instance it holds a ``RemoteLeg``: a ``SignalingConnection`` whose
``send`` is a ``to`` notification to that instance. The holding instance
keeps a ``Relays`` entry per such call: the messages it delivered down the
callee's connection name the call, and what the callee sends back in that
call goes to the instance running it as ``from`` notifications, never to the
holding instance's own call table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kerjostunt.server.calls.seams import Clock
from kerjostunt.server.registrar import SignalingConnection
from kerjostunt.wire.prediction import Prediction
from kerjostunt.wire.sip.message import Request, Response

#: seconds a relay outlives the last message of its call (the calls' own linger is 32 s)
RELAY_LINGER = 64.0


class RemoteLeg:
    """A user's signaling connection on another instance, as the call table sees it.

    ``peer`` is the user's public address from its binding; ``rtt`` the RTT
    its instance reported with the answer plus the bus's own round trip (the
    ACK with the dial moment travels both); ``prediction`` what its instance
    predicted from the user's probes.
    """

    def __init__(self, instance_id: str, user_id: str, peer: tuple[str, int],
                 send: Callable[[RemoteLeg, Request | Response], None]) -> None:
        self.instance_id = instance_id
        self.user_id = user_id
        self.peer = peer
        self.user_ids = {user_id}
        self._send = send
        self.reported_rtt: float | None = None
        self.bus_rtt = 0.0
        self.prediction: Prediction | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(instance, user): how the node finds its stand-ins."""
        return self.instance_id, self.user_id

    @property
    def rtt(self) -> float | None:
        if self.reported_rtt is None:
            return None
        return self.reported_rtt + self.bus_rtt

    def send(self, message: Request | Response) -> None:
        self._send(self, message)

    def close(self) -> None:
        """Nothing to close here: the connection is the other instance's."""

    def bound(self, user_id: str) -> None:
        """Bindings of a remote user are its instance's."""

    def unbound(self, user_id: str) -> None:
        """Bindings of a remote user are its instance's."""

    def __repr__(self) -> str:
        return f"<RemoteLeg {self.user_id} on {self.instance_id}>"


@dataclass
class Relay:
    """A call run by instance ``origin`` with a leg down this instance's ``conn`` (user ``user_id``)."""

    origin: str
    user_id: str
    conn: SignalingConnection
    last: float


class Relays:
    """The calls other instances run through this instance's connections, by Call-ID."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._by_call: dict[str, Relay] = {}
        self._by_conn: dict[SignalingConnection, set[str]] = {}

    def __len__(self) -> int:
        return len(self._by_call)

    def delivered(self, call_id: str, origin: str, user_id: str, conn: SignalingConnection) -> None:
        """A message of ``origin``'s call went down ``conn``: its answers go back there."""
        relay = self._by_call.get(call_id)
        if relay is not None and relay.conn is not conn:
            self._forget(call_id)
            relay = None
        if relay is None:
            self._by_call[call_id] = Relay(origin, user_id, conn, self._clock.seconds())
            self._by_conn.setdefault(conn, set()).add(call_id)
        else:
            relay.last = self._clock.seconds()

    def of(self, conn: SignalingConnection, call_id: str) -> Relay | None:
        """The relay a message from ``conn`` in ``call_id`` belongs to, if any."""
        relay = self._by_call.get(call_id)
        if relay is None or relay.conn is not conn:
            return None
        relay.last = self._clock.seconds()
        return relay

    def lost(self, conn: SignalingConnection) -> list[Relay]:
        """``conn`` is gone: the relays through it (the origins must hear of it)."""
        relays = [self._by_call.pop(call_id) for call_id in self._by_conn.pop(conn, set())
                  if call_id in self._by_call]
        return relays

    def sweep(self) -> None:
        """Forget relays idle for ``RELAY_LINGER`` (their calls have ended)."""
        old = self._clock.seconds() - RELAY_LINGER
        for call_id in [c for c, r in self._by_call.items() if r.last < old]:
            self._forget(call_id)

    def _forget(self, call_id: str) -> None:
        relay = self._by_call.pop(call_id)
        calls = self._by_conn.get(relay.conn)
        if calls is not None:
            calls.discard(call_id)
            if not calls:
                del self._by_conn[relay.conn]
