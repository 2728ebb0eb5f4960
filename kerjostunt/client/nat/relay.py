"""
The relay technique of one call: a TURN TCP allocation on each side, joined by coturn (docs/relay.rst).

The flow, with one TURN server both sides can reach:

1. the callee, handed ``X-Kerjo-Relay`` in the forwarded INVITE, allocates
   before it answers, permits the IPs the caller's data may come from (the
   relays' addresses, and the caller's public one) and offers its relayed
   address as a ``typ relay`` candidate in the 200 OK;
2. the caller allocates too and sends Connect to that relayed address: coturn
   opens a TCP connection from the caller's relayed address to the callee's,
   which the callee's allocation reports as a ConnectionAttempt;
3. each side binds a data connection (ConnectionBind) and hands it to the
   call's handshake, which proves the peer holds the call's secret: coturn
   carries the bytes but cannot stand in for the peer.

Why the caller allocates instead of connecting to the callee's relayed
address straight from its own host: its NAT (random, say) would show coturn
an address the callee could only permit by IP, and two relayed addresses on
one relay need no permission guessing at all.  Nothing here knows SIP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.logger import Logger

from kerjostunt.client.nat.sockets import Endpoint, SocketReactor
from kerjostunt.client.nat.turn import Allocation, TurnError, TurnServer, allocate
from kerjostunt.wire import turn

__all__ = ["RelayPlan", "RelayFailed", "allocate_any", "offer_side", "dial_side"]

log = Logger()


class RelayFailed(Exception):
    """The relay technique failed; ``reason`` is what the call reports after ``relay: ``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RelayPlan:
    """Where this side may allocate (in order) and with what credential."""

    servers: tuple[Endpoint, ...]
    credentials: turn.Credentials
    local_ip: str = "0.0.0.0"


async def allocate_any(reactor: SocketReactor, plan: RelayPlan) -> Allocation:
    """An allocation on the first server that grants one; RelayFailed naming the last refusal."""
    last = "no relay server"
    for address in plan.servers:
        try:
            return await allocate(reactor, TurnServer(address, plan.credentials), plan.local_ip)
        except TurnError as e:
            last = e.reason
            log.info("relay: {ip}:{port}: {why}", ip=address[0], port=address[1], why=e.reason)
    raise RelayFailed(last)


async def offer_side(reactor: SocketReactor, plan: RelayPlan, peer_ips: Sequence[str]) -> Allocation:
    """The callee's allocation, with permissions for ``peer_ips`` and every relay's own IP.

    The CreatePermission is sent, not awaited: the answer can go out a round
    trip sooner, and the caller's Connect, which needs the permission, comes
    at least two signaling legs and two relay round trips later, after it on
    the same server.  A refusal is logged; the caller's Connect then fails
    with a reason.
    """
    allocation = await allocate_any(reactor, plan)
    ips = [allocation.relayed[0], *(ip for ip, _ in plan.servers), *peer_ips]
    family = ":" in allocation.relayed[0]  # a permission is for the relayed address's family
    d = allocation.permit([ip for ip in dict.fromkeys(ips) if (":" in ip) == family])
    d.addErrback(lambda f: log.info("relay: permission refused: {why}", why=f.getErrorMessage()))
    return allocation


def accept_side(allocation: Allocation, factory: IProtocolFactory,
                accepted: Callable[[IProtocol, Endpoint], None],
                failed: Callable[[str], None]) -> None:
    """Bind the first ConnectionAttempt's data connection and give it to ``accepted``.

    One connection per call: later attempts are ignored (a second Connect
    to our relayed address is someone else's, and coturn drops it after
    30 s unbound).
    """
    state = {"taken": False}

    def attempt(peer: Endpoint, connection_id: bytes) -> None:
        if state["taken"]:
            return
        state["taken"] = True
        d = defer.Deferred.fromCoroutine(allocation.bind(connection_id, peer, factory))
        d.addCallbacks(lambda protocol: accepted(protocol, peer),
                       lambda f: failed(f.value.reason if isinstance(f.value, TurnError) else f.getErrorMessage()))

    allocation.on_attempt = attempt


async def dial_side(reactor: SocketReactor, plan: RelayPlan, peers: Sequence[Endpoint],
                    factory: IProtocolFactory) -> tuple[Any, Allocation, Endpoint]:
    """The caller: allocate, Connect to the first of the peer's relayed addresses that answers."""
    # Our own allocation first: a refused credential says more than the peer's missing address.
    allocation = await allocate_any(reactor, plan)
    last = "the peer offered no relayed address"
    try:
        for peer in peers:
            try:
                protocol = await allocation.connect(peer, factory)
                return protocol, allocation, peer
            except TurnError as e:
                last = e.reason
    except BaseException:  # cancelled (another technique won): free the allocation now
        allocation.close()
        raise
    allocation.close()
    raise RelayFailed(last)
