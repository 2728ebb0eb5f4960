"""
A TURN client for TCP allocations (RFC 6062), for peers no direct technique joins.

Written on the project's STUN codec (``wire/stun.py``, ``wire/turn.py``)
rather than a kept library: the Python TURN clients on PyPI (aioice's,
pystun3...) do UDP allocations only, none RFC 6062, and none runs on the
Twisted reactor.  What it speaks, against coturn:

- the *control connection*: Allocate with REQUESTED-TRANSPORT=TCP, answered
  401 with REALM and NONCE, then again with USERNAME, REALM, NONCE and
  MESSAGE-INTEGRITY (the long-term credential; 438 Stale Nonce retries once);
  CreatePermission for the peers' IPs; Connect to a peer (the side that
  dials) or ConnectionAttempt indications (the side that waits); Refresh
  every half lifetime while the allocation is in use;
- one *data connection* per peer connection: a new TCP connection to the
  server carrying one authenticated ConnectionBind with the CONNECTION-ID;
  after its success response the connection is the peer's raw byte stream,
  and is handed to a protocol factory (the per-call handshake) as if it had
  been dialed directly.

Closing the control connection ends the allocation and with it every data
connection (RFC 6062 5.2), so the allocation lives as long as its data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.nat.sockets import Endpoint, SocketReactor, connect_from
from kerjostunt.wire import stun, turn

__all__ = ["TurnError", "TurnServer", "Allocation", "allocate", "REQUEST_TIMEOUT"]

log = Logger()

#: an attribute's value, or how to compute it from the transaction ID
Value = bytes | Callable[[bytes], bytes]

REQUEST_TIMEOUT = 5.0  # seconds a TURN request may wait for its answer
MAX_FRAME = 4096


class TurnError(Exception):
    """The relay refused or failed; ``reason`` is said in the call's ``failed: relay: ...``."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class TurnServer:
    """Where to allocate, and the call's credential there (docs/relay.rst)."""

    address: Endpoint
    credentials: turn.Credentials


@dataclass
class _Auth:
    """The long-term credential's state on one server: realm and nonce once challenged."""

    credentials: turn.Credentials
    realm: str = ""
    nonce: bytes = b""

    @property
    def challenged(self) -> bool:
        return bool(self.realm)

    def attributes(self) -> list[tuple[int, bytes]]:
        return [(stun.USERNAME, self.credentials.username.encode("utf-8")),
                (stun.REALM, self.realm.encode("utf-8")), (stun.NONCE, self.nonce)]

    def key(self) -> bytes:
        return self.credentials.key(self.realm)

    def learn(self, msg: stun.StunMessage) -> bool:
        """Take REALM and NONCE from a 401/438; False when they are missing."""
        realm, nonce = msg.get(stun.REALM), msg.get(stun.NONCE)
        if realm is None or nonce is None:
            return False
        self.realm, self.nonce = realm.decode("utf-8", "replace"), nonce
        return True


def _error_of(msg: stun.StunMessage) -> tuple[int | None, str]:
    value = msg.get(stun.ERROR_CODE)
    if value is None:
        return None, "error response without ERROR-CODE"
    try:
        return stun.decode_error_code(value)
    except stun.STUNError as e:
        return None, str(e)


class TurnConnection(TwistedProtocol):
    """
    One TCP connection to the TURN server, speaking STUN until ``hand_over``.

    Requests are matched to answers by transaction ID; an answer that never
    comes fails its request after ``REQUEST_TIMEOUT``.  Indications go to
    ``on_indication``.  ``hand_over`` makes the rest of the stream (bytes
    already read after the last STUN message included) another protocol's.
    Its life is a state machine: ``stun`` -> ``raw`` (handed over) -> ``gone``.
    """

    def __init__(self, clock: IReactorTime, auth: _Auth) -> None:
        self.clock = clock
        self.auth = auth
        self.on_indication: Callable[[stun.StunMessage], None] = lambda msg: None
        self.on_lost: Callable[[Failure], None] = lambda reason: None
        self.inner: IProtocol | None = None
        self._buffer = b""
        self._pending: dict[bytes, defer.Deferred[tuple[stun.StunMessage, bytes]]] = {}
        self._life: _ConnectionInputs = _ConnectionMachine(self)

    def phase(self) -> str:
        return self._life.phase()

    # -- requests ---------------------------------------------------------------

    async def request(self, method: int, attributes: Sequence[tuple[int, Value]]) -> stun.StunMessage:
        """Send an authenticated request (challenged first when need be); the success response.

        A value may be a function of the transaction ID (an XOR address of
        IPv6, xored with it), computed anew for each retransmission's ID.
        """
        for _ in range(3):
            signed = self.auth.challenged
            tid = stun.new_transaction_id()
            attrs = [(t, v(tid) if callable(v) else v) for t, v in attributes]
            attrs += self.auth.attributes() if signed else []
            wire = stun.encode(turn.message_type(method, turn.REQUEST), tid, attrs,
                               integrity_key=self.auth.key() if signed else None)
            msg, raw = await self._exchange(tid, wire)
            if msg.msg_class == turn.SUCCESS:
                if msg.has(stun.MESSAGE_INTEGRITY) and not stun.check_integrity(raw, self.auth.key()):
                    raise TurnError("the relay's answer failed its integrity check")
                return msg
            code, reason = _error_of(msg)
            retry = (code == 401 and not signed) or code == 438
            if not retry or not self.auth.learn(msg):
                raise TurnError(_refusal(code, reason), code)
        raise TurnError("the relay keeps challenging our credentials", 401)

    def _exchange(self, tid: bytes, wire: bytes) -> defer.Deferred[tuple[stun.StunMessage, bytes]]:
        if self._life.phase() != "stun" or self.transport is None:
            return defer.fail(TurnError("connection to the relay lost"))
        d: defer.Deferred[tuple[stun.StunMessage, bytes]] = defer.Deferred(lambda _: self._forget(tid))
        self._pending[tid] = d
        d.addTimeout(REQUEST_TIMEOUT, self.clock, self._timed_out)
        self.transport.write(wire)
        return d

    def _forget(self, tid: bytes) -> None:
        self._pending.pop(tid, None)

    def _timed_out(self, result: object, timeout: float) -> object:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(TurnError(f"no answer from the relay in {timeout:g} s"))
        return result

    # -- the stream ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        phase = self._life.phase()
        if phase == "raw" and self.inner is not None:
            self.inner.dataReceived(data)
            return
        if phase != "stun":
            return
        self._buffer += data
        while self._life.phase() == "stun" and len(self._buffer) >= stun.HEADER_LENGTH:
            try:
                _, length, _ = stun.peek_header(self._buffer[:stun.HEADER_LENGTH])
                total = stun.HEADER_LENGTH + length
                if total > MAX_FRAME:
                    raise stun.STUNError(f"message of {total} bytes")
                if len(self._buffer) < total:
                    return
                frame, self._buffer = self._buffer[:total], self._buffer[total:]
                self._handle(stun.decode(frame), frame)
            except stun.STUNError as e:
                log.info("relay: dropping the connection: {why}", why=e)
                self._abort()
                return
        # A ConnectionBind success handed the stream over while being handled
        # (its Deferred runs the binding coroutine): the rest is the peer's.
        if self._life.phase() == "raw" and self.inner is not None and self._buffer:
            rest, self._buffer = self._buffer, b""
            self.inner.dataReceived(rest)

    def _handle(self, msg: stun.StunMessage, raw: bytes) -> None:
        if msg.msg_class == turn.INDICATION:
            self.on_indication(msg)
            return
        d = self._pending.pop(msg.transaction_id, None)
        if d is not None and not d.called:
            d.callback((msg, raw))

    def hand_over(self, factory: IProtocolFactory, peer: Endpoint) -> IProtocol | None:
        """From now on the stream is ``factory``'s protocol's (the data connection after ConnectionBind)."""
        return self._life.hand_over(factory, peer)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        # Who is told runs after the transition: their callbacks ask the machine again.
        self._life.lost(reason)()

    # -- outputs of the machine ---------------------------------------------------------

    def _build_inner(self, factory: IProtocolFactory, peer: Endpoint) -> IProtocol | None:
        address = (IPv6Address if ":" in peer[0] else IPv4Address)("TCP", peer[0], peer[1])
        protocol = factory.buildProtocol(address)
        if protocol is None or self.transport is None:
            self._abort()
            return None
        self.inner = protocol
        protocol.makeConnection(self.transport)
        return protocol

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            if not d.called:
                d.errback(TurnError("connection to the relay lost"))

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        if self._life.phase() != "gone":
            self._abort()


class _ConnectionInputs(Protocol):
    """What happens to a connection to the TURN server."""

    def hand_over(self, factory: IProtocolFactory, peer: Endpoint) -> IProtocol | None:
        "ConnectionBind succeeded: the rest of the stream is the peer's."

    def lost(self, reason: Failure) -> Callable[[], None]:
        "The TCP connection ended: returns what to tell whom, to run once the transition is over."

    def phase(self) -> str:
        "The state's name: ``stun``, ``raw`` or ``gone``."


_life = TypeMachineBuilder(_ConnectionInputs, TurnConnection)
_stun = _life.state("stun")
_raw = _life.state("raw")
_gone = _life.state("gone")


@_stun.upon(_ConnectionInputs.hand_over).to(_raw)
def _hand_over(inputs: _ConnectionInputs, conn: TurnConnection, factory: IProtocolFactory,
               peer: Endpoint) -> IProtocol | None:
    return conn._build_inner(factory, peer)


@_stun.upon(_ConnectionInputs.lost).to(_gone)
def _lost_talking(inputs: _ConnectionInputs, conn: TurnConnection, reason: Failure) -> Callable[[], None]:
    def tell() -> None:
        conn._fail_pending()
        conn.on_lost(reason)

    return tell


@_raw.upon(_ConnectionInputs.lost).to(_gone)
def _lost_raw(inputs: _ConnectionInputs, conn: TurnConnection, reason: Failure) -> Callable[[], None]:
    def tell() -> None:
        if conn.inner is not None:
            conn.inner.connectionLost(reason)
        conn.on_lost(reason)

    return tell


def _nothing() -> None:
    pass


_raw.upon(_ConnectionInputs.hand_over).loop().returns(None)
_gone.upon(_ConnectionInputs.hand_over).loop().returns(None)
_gone.upon(_ConnectionInputs.lost).loop().returns(_nothing)
for _state in (_stun, _raw, _gone):
    _state.upon(_ConnectionInputs.phase).loop().returns(_state.name)

_ConnectionMachine = _life.build()


def _refusal(code: int | None, reason: str) -> str:
    """An error response in the words the call's failure reason uses."""
    known = {401: "credentials refused", 403: "forbidden", 437: "allocation mismatch",
             441: "wrong credentials", 442: "unsupported transport", 446: "connection already exists",
             447: "the peer did not accept the connection", 486: "allocation quota reached",
             508: "insufficient capacity"}
    words = known.get(code or 0, "refused")
    return f"{words} ({code} {reason})".strip() if code else f"{words} ({reason})"


class _ConnectionFactory(Factory):
    def __init__(self, clock: IReactorTime, auth: _Auth) -> None:
        self.clock = clock
        self.auth = auth

    def buildProtocol(self, addr: object) -> TurnConnection:
        return TurnConnection(self.clock, self.auth)


class Allocation:
    """
    One TCP allocation: its relayed address, permissions, peers' connections.

    ``on_attempt(peer, connection_id)`` is told of each ConnectionAttempt;
    ``close`` ends the allocation (the control connection) and so every data
    connection: the caller closes it when the connection it carries ends.
    """

    def __init__(self, reactor: SocketReactor, server: TurnServer, control: TurnConnection,
                 local_ip: str) -> None:
        self.reactor = reactor
        self.server = server
        self.control = control
        self.local_ip = local_ip
        self.relayed: Endpoint = ("0.0.0.0", 0)
        self.mapped: Endpoint | None = None
        self.lifetime = 600
        self.on_attempt: Callable[[Endpoint, bytes], None] = lambda peer, cid: None
        self.closed = False
        self._refresh: IDelayedCall | None = None
        control.on_indication = self._indication
        control.on_lost = lambda reason: self._ended()

    async def _allocate(self) -> None:
        attributes = [(turn.REQUESTED_TRANSPORT, turn.encode_transport(turn.TRANSPORT_TCP))]
        if ":" in self.server.address[0]:
            # A relayed address of the family we reach the server in (IPv4 is the default).
            attributes.append((turn.REQUESTED_ADDRESS_FAMILY, turn.encode_family(True)))
        msg = await self.control.request(turn.ALLOCATE, attributes)
        tid = msg.transaction_id
        relayed = msg.get(turn.XOR_RELAYED_ADDRESS)
        if relayed is None:
            raise TurnError("the relay's Allocate answer has no XOR-RELAYED-ADDRESS")
        self.relayed = stun.decode_xor_address(relayed, tid)
        mapped = msg.get(stun.XOR_MAPPED_ADDRESS)
        self.mapped = stun.decode_xor_address(mapped, tid) if mapped else None
        lifetime = msg.get(turn.LIFETIME)
        self.lifetime = turn.decode_lifetime(lifetime) if lifetime else 600
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if not self.closed:
            self._refresh = self.reactor.callLater(max(30.0, self.lifetime / 2), self._do_refresh)

    def _do_refresh(self) -> None:
        self._refresh = None
        d = defer.Deferred.fromCoroutine(self.control.request(turn.REFRESH, [
            (turn.LIFETIME, turn.encode_lifetime(self.lifetime))]))
        d.addCallbacks(lambda _: self._schedule_refresh(),
                       lambda f: log.info("relay: refresh failed: {why}", why=f.getErrorMessage()))

    def permit(self, ips: list[str]) -> defer.Deferred[stun.StunMessage]:
        """CreatePermission for these peer IPs (ports do not matter to permissions)."""
        peers = [(turn.XOR_PEER_ADDRESS, _peer_value(ip, 0)) for ip in dict.fromkeys(ips)]
        return defer.Deferred.fromCoroutine(self.control.request(turn.CREATE_PERMISSION, peers))

    async def connect(self, peer: Endpoint, factory: IProtocolFactory) -> IProtocol:
        """Connect to ``peer`` through the relay, bind a data connection, hand it to ``factory``.

        Pipelined: CreatePermission and Connect leave back to back (the
        server handles them in order) while the data connection's TCP
        handshake runs, so the whole costs two round trips after the
        allocation instead of four.
        """
        value = _peer_value(*peer)
        permit = defer.Deferred.fromCoroutine(self.control.request(turn.CREATE_PERMISSION, [
            (turn.XOR_PEER_ADDRESS, value)]))
        connect = defer.Deferred.fromCoroutine(self.control.request(turn.CONNECT, [
            (turn.XOR_PEER_ADDRESS, value)]))
        opening = defer.Deferred.fromCoroutine(_open(self.reactor, self.server, self.local_ip, self.control.auth))
        try:
            results = await defer.DeferredList([permit, connect], consumeErrors=True)
            answers: list[stun.StunMessage] = []
            for _, result in results:
                if isinstance(result, Failure):
                    result.raiseException()
                answers.append(result)
            cid = answers[1].get(turn.CONNECTION_ID)
            if cid is None:
                raise TurnError("the relay's Connect answer has no CONNECTION-ID")
        except BaseException:
            opening.addCallbacks(lambda data: data.close(), lambda _: None)
            opening.cancel()
            raise
        return await self._bind_on(await opening, turn.decode_connection_id(cid), peer, factory)

    async def bind(self, connection_id: bytes, peer: Endpoint, factory: IProtocolFactory) -> IProtocol:
        """A new TCP connection to the server, ConnectionBind; then the stream is ``factory``'s."""
        data = await _open(self.reactor, self.server, self.local_ip, self.control.auth)
        return await self._bind_on(data, connection_id, peer, factory)

    async def _bind_on(self, data: TurnConnection, connection_id: bytes, peer: Endpoint,
                       factory: IProtocolFactory) -> IProtocol:
        try:
            await data.request(turn.CONNECTION_BIND, [
                (turn.CONNECTION_ID, turn.encode_connection_id(connection_id))])
        except TurnError as e:
            data.close()
            if e.code is None and "lost" in e.reason:
                # coturn ends the data connection when the peer's side dropped the peer connection
                # after its Connect succeeded (no permission there, say).
                raise TurnError("the relay closed the connection before it was bound "
                                "(did the peer refuse it?)") from None
            raise
        except BaseException:
            data.close()
            raise
        protocol = data.hand_over(factory, peer)
        if protocol is None:
            raise TurnError("the data connection closed at once")
        # The allocation exists for this connection: it ends with it.
        data.on_lost = lambda reason: self.close()
        return protocol

    def _indication(self, msg: stun.StunMessage) -> None:
        if msg.method != turn.CONNECTION_ATTEMPT:
            return
        peer, cid = msg.get(turn.XOR_PEER_ADDRESS), msg.get(turn.CONNECTION_ID)
        try:
            if peer is None or cid is None:
                raise stun.STUNError("ConnectionAttempt without peer or CONNECTION-ID")
            endpoint = stun.decode_xor_address(peer, msg.transaction_id)
            connection_id = turn.decode_connection_id(cid)
        except stun.STUNError as e:
            log.info("relay: ignoring a ConnectionAttempt: {why}", why=e)
            return
        self.on_attempt(endpoint, connection_id)

    def _ended(self) -> None:
        self.closed = True
        if self._refresh is not None and self._refresh.active():
            self._refresh.cancel()
        self._refresh = None

    def close(self) -> None:
        """End the allocation: the control connection closes, coturn frees it and its connections."""
        self._ended()
        self.control.close()


def _peer_value(ip: str, port: int) -> Callable[[bytes], bytes]:
    """XOR-PEER-ADDRESS for the request's transaction ID (IPv6 addresses are xored with it)."""
    return lambda tid: stun.encode_xor_address((ip, port), tid)


async def _open(reactor: SocketReactor, server: TurnServer, local_ip: str, auth: _Auth) -> TurnConnection:
    try:
        protocol: TurnConnection = await connect_from(
            reactor, (local_ip, 0), server.address, _ConnectionFactory(reactor, auth), timeout=REQUEST_TIMEOUT)
    except (error.ConnectError, OSError) as e:
        raise TurnError(f"cannot reach the relay {server.address[0]}:{server.address[1]}: "
                        f"{e.__class__.__name__}") from None
    return protocol


async def allocate(reactor: SocketReactor, server: TurnServer, local_ip: str = "0.0.0.0") -> Allocation:
    """A TCP allocation on ``server``; raises TurnError with a reason for the call's outcome."""
    control = await _open(reactor, server, local_ip, _Auth(server.credentials))
    allocation = Allocation(reactor, server, control, local_ip)
    try:
        await allocation._allocate()
    except BaseException:
        allocation.close()
        raise
    return allocation
