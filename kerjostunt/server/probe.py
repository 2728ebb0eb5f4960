"""The probe service: STUN Binding over TCP, recording what each peer's NAT does.

One :class:`ProbeFactory` listens on each probe port (default 3478 and 3479,
optionally on a second address too).  Any STUN client gets its mapped
address back; a request authenticated with a probe token (short-term
credential handed out in REGISTER's 200 OK) is also recorded as an
:class:`Observation` for that user, which the server turns into a NAT
description and a port prediction (``kerjostunt.wire.prediction``).

Wire details, credentials and errors: docs/probes.rst.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from automat import TypeMachineBuilder
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.machines import indexed
from kerjostunt.server.connectback import Connector
from kerjostunt.server.limits import PerSourceCap
from kerjostunt.server.observations import (
    Observation,
    ObservationLog,
    ProbeTokens,
    ip_family,
    nat_not_stored,
    plain_ip,
)
from kerjostunt.tcp import host_port
from kerjostunt.wire import stun

__all__ = ["AlternateAddresses", "ProbeTokens", "Observation", "ObservationLog", "ProbeLife", "ProbeProtocol",
           "ProbeFactory", "nat_not_stored"]

_log = Logger(namespace="kerjostunt.server.probe")

#: comprehension-required attributes this server understands (RFC 8489 15)
_KNOWN_REQUIRED = {t for t in stun.ATTRIBUTE_NAMES if t < 0x8000}


class _Reject(Exception):
    def __init__(self, code: int, reason: str, unknown: list[int] | None = None) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.unknown = code, reason, unknown or []


class ProbeLife(TypingProtocol):
    """The inputs of one probe connection's life.

    waiting (built, not yet connected) -> serving (STUN requests answered in
    order; the deadline moves on with every whole request answered, never
    with bytes alone, and never past ``max_lifetime``) -> closing (we asked
    the transport to go: over the request limit, unframeable input, or past
    the deadline) -> closed (the transport is gone). Nothing is read once
    serving is over.
    """

    def connected(self) -> None:
        """TCP is up: the idle timer starts."""

    def received(self) -> bool:
        """Bytes arrived: True while serving, else False. The deadline stays: one byte
        every few seconds used to keep a connection open for ever (issue 13)."""

    def answered(self) -> None:
        """A whole request was answered: the next one has ``idle_timeout`` again."""

    def serving(self) -> bool:
        """Is the connection still answering? (A query: no transition.)"""

    def idle(self) -> None:
        """No whole request for ``idle_timeout`` seconds (or ``max_lifetime`` reached): abort."""

    def finish(self) -> None:
        """Over the request limit or unframeable: close after what is written."""

    def lost(self) -> None:
        """The transport is gone."""


class ProbeProtocol(Protocol):
    """One TCP connection: STUN messages back to back, answered in order.

    Its life is the ``ProbeLife`` machine at the end of this module.
    """

    factory: ProbeFactory
    transport: ITCPTransport | None  # a TCP connection (StringTransport in tests)

    def __init__(self) -> None:
        self._decoder = stun.StunStreamDecoder(stun.MAX_MESSAGE_SIZE)
        self._timer: IDelayedCall | None = None
        self._requests = 0
        self._opened_at: float | None = None
        self.source: str | None = None  # admitted by the factory's per-IP cap; released when lost
        self._connected_back = False
        self._life = _ProbeLifeMachine(self)

    # -- Twisted callbacks

    def connectionMade(self) -> None:
        self._life.connected()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._life.lost()

    def dataReceived(self, data: bytes) -> None:
        if not self._life.received():
            return
        try:
            frames = self._decoder.feed_frames(data)
        except stun.STUNError as e:
            _log.info("closing probe connection from {peer}: {why}", peer=self._peer(), why=str(e))
            self._life.finish()
            return
        for frame in frames:
            if not self._life.serving():
                return
            self._requests += 1
            if self._requests > self.factory.max_requests:
                _log.info("probe connection from {peer} exceeded {n} requests",
                          peer=self._peer(), n=self.factory.max_requests)
                self._life.finish()
                return
            self._handle(frame)
            self._life.answered()

    # -- what the life's transitions do

    def arm(self) -> None:
        """(Re)start the deadline: ``idle_timeout`` from now, at most ``max_lifetime`` after opening."""
        self.disarm()
        now = self.factory.clock.seconds()
        if self._opened_at is None:
            self._opened_at = now
        delay = min(self.factory.idle_timeout, self._opened_at + self.factory.max_lifetime - now)
        self._timer = self.factory.clock.callLater(max(0.0, delay), self._idle)

    def release(self) -> None:
        """Gone: its slot in the per-IP table is free again."""
        self.disarm()
        source, self.source = self.source, None
        if source is not None and self.factory.per_ip is not None:
            self.factory.per_ip.release(source)

    def disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def abort(self) -> None:
        """Past the deadline: drop the connection without waiting for buffered writes."""
        _log.debug("probe connection past its deadline, closing {peer}", peer=self._peer())
        self.disarm()
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        """Close once what is written has gone out."""
        self.disarm()
        if self.transport is not None:
            self.transport.loseConnection()

    def _idle(self) -> None:
        self._timer = None
        self._life.idle()

    def _peer(self) -> str:
        """For the log: the peer's address as the transport has it."""
        peer = self.transport.getPeer() if self.transport is not None else None
        if isinstance(peer, (IPv4Address, IPv6Address)):
            return f"{peer.host}:{peer.port}"
        return "?:?"

    def _addresses(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(peer, host) of the connection, IPv4-mapped IPv6 read as IPv4."""
        if self.transport is None:
            return ("?", 0), ("?", 0)
        (peer_ip, peer_port), (host_ip, host_port_) = (
            host_port(self.transport.getPeer()), host_port(self.transport.getHost())
        )
        return (plain_ip(peer_ip), peer_port), (plain_ip(host_ip), host_port_)

    # -- input

    def _handle(self, frame: bytes) -> None:
        msg_type, _, tid = stun.peek_header(frame)
        try:
            msg = stun.decode(frame)
        except stun.STUNError as e:
            if (msg_type & 0x0110) == 0:  # only requests get an answer
                self._error(msg_type, tid, 400, "Bad Request")
            _log.debug("malformed STUN from {peer}: {why}", peer=self._peer(), why=str(e))
            return
        if not stun.is_request(msg):
            return  # indications and stray responses are ignored (RFC 8489 6.3)
        try:
            if msg.method != 1:
                raise _Reject(400, "Bad Request")
            unknown = [t for t, _ in msg.attributes if t < 0x8000 and t not in _KNOWN_REQUIRED]
            if unknown:
                raise _Reject(420, "Unknown Attribute", unknown)
            _check_change_request(msg)
            key = self._authenticate(msg, frame)
        except _Reject as r:
            self._error(msg.msg_type, tid, r.code, r.reason, r.unknown)
            return
        if msg.has(stun.KERJO_CONNECT_BACK):
            self._connect_back(msg, key)
            return
        self._answer(msg, key)

    def _connect_back(self, msg: stun.StunMessage, key: tuple[bytes, bool] | None) -> None:
        """Dial the prober back (server/connectback.py), then answer with how that went.

        Once per connection; the answer comes when the connect ends, so it
        may follow the answers to later requests on the connection (STUN
        matches responses by transaction ID).
        """
        connector = self.factory.connect_back
        if connector is None or self._connected_back:
            self._answer(msg, key, [(stun.KERJO_CONNECT_BACK_RESULT, b"unsupported" if connector is None
                                     else b"busy")])
            return
        self._connected_back = True
        d = connector.attempt(self._addresses()[0], msg.transaction_id)
        d.addCallback(lambda word: self._answer(msg, key, [(stun.KERJO_CONNECT_BACK_RESULT, word.encode())]))
        d.addErrback(lambda f: _log.failure("connect-back answer failed", f))

    def _authenticate(self, msg: stun.StunMessage, frame: bytes) -> tuple[bytes, bool] | None:
        """(key, use SHA256) for an authenticated request, None for a plain one."""
        username = msg.get(stun.USERNAME)
        has_mi = msg.has(stun.MESSAGE_INTEGRITY) or msg.has(stun.MESSAGE_INTEGRITY_SHA256)
        if username is None and not has_mi:
            return None
        if username is None or not has_mi:
            raise _Reject(400, "Bad Request")
        try:
            token = username.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject(401, "Unauthorized") from None
        found = self.factory.tokens.lookup(token, self._addresses()[0][0])
        if found is None:
            _log.info("probe with an unknown, expired or foreign token from {peer}", peer=self._peer())
            raise _Reject(401, "Unauthorized")
        user_id, password = found
        key = stun.short_term_key(password)
        if not stun.check_integrity(frame, key):
            _log.warn("probe with bad integrity for {user_id} from {peer}",
                      user_id=user_id, peer=self._peer())
            raise _Reject(401, "Unauthorized")
        self._record(user_id, msg)
        sha256 = not msg.has(stun.MESSAGE_INTEGRITY)
        return key, sha256

    def _record(self, user_id: str, msg: stun.StunMessage) -> None:
        local_port = None
        value = msg.get(stun.KERJO_LOCAL_PORT)
        if value is not None:
            try:
                local_port = stun.decode_local_port(value)
            except stun.STUNError:
                local_port = None
        (mapped_ip, mapped_port), (server_ip, server_port) = self._addresses()
        obs = Observation(user_id=user_id, local_port=local_port,
                          mapped_ip=mapped_ip, mapped_port=mapped_port,
                          server_ip=server_ip, server_port=server_port,
                          time=self.factory.clock.seconds())
        _log.debug("probe observation {obs!r}", obs=obs)
        registered = self.factory.tokens.registered_ip(user_id)
        if registered is not None and ip_family(registered) != ip_family(mapped_ip):
            self.factory.log.add_other_family(obs)
        else:
            self.factory.log.add(obs)

    # -- output

    def _answer(self, msg: stun.StunMessage, key: tuple[bytes, bool] | None,
                extra: list[tuple[int, bytes]] | None = None) -> None:
        mapped, origin = self._addresses()
        tid = msg.transaction_id
        attrs = [(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(mapped, tid)),
                 (stun.MAPPED_ADDRESS, stun.encode_address(mapped))]
        other = self.factory.other_of(origin)
        if other is not None:
            attrs.append((stun.RESPONSE_ORIGIN,
                          stun.encode_address(origin)))
            attrs.append((stun.OTHER_ADDRESS, stun.encode_address(other)))
        attrs.extend(extra or [])
        if msg.has(stun.KERJO_PROBE_IPS) and self.factory.ips:
            attrs.append((stun.KERJO_PROBE_IPS, ", ".join(self.factory.ips).encode("ascii")))
        attrs.append((stun.SOFTWARE, self.factory.software.encode("utf-8")))
        self._write(stun.encode(
            stun.BINDING_SUCCESS, tid, attrs,
            integrity_key=key[0] if key else None,
            integrity_sha256=key[1] if key else False))

    def _error(self, msg_type: int, tid: bytes, code: int, reason: str,
               unknown: list[int] | None = None) -> None:
        error_type = (msg_type & 0x3EEF) | 0x0110
        attrs = [(stun.ERROR_CODE, stun.encode_error_code(code, reason))]
        if unknown:
            attrs.append((stun.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown)))
        attrs.append((stun.SOFTWARE, self.factory.software.encode("utf-8")))
        self._write(stun.encode(error_type, tid, attrs))

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


def _check_change_request(msg: stun.StunMessage) -> None:
    """CHANGE-REQUEST (RFC 5780 7.2): no flags is a plain request, as stuntman's server reads it.

    stuntman's ``stunclient`` sends the attribute, empty, in every request.
    A change of IP or port cannot be answered on a TCP connection (the
    answer must come on it, from the address the client connected to), so
    it gets 400, as stuntman's server answers over TCP; RFC 5780 clients
    test the mapping over TCP by connecting to OTHER-ADDRESS instead.
    """
    value = msg.get(stun.CHANGE_REQUEST)
    if value is None:
        return
    try:
        change_ip, change_port = stun.decode_change_request(value)
    except stun.STUNError:
        raise _Reject(400, "Bad Request") from None
    if change_ip or change_port:
        raise _Reject(400, "Bad Request: no change of address over TCP")


@dataclass(frozen=True)
class AlternateAddresses:
    """RFC 5780's two IPs by two ports, for OTHER-ADDRESS.

    The other address of a request is the other IP and the other port than
    those it arrived at (RFC 5780 7.4), so a client that connects there and
    compares the mapped addresses learns the NAT's mapping behaviour.
    ``primary_ip`` is None behind a wildcard listener: a request that
    arrived at the alternate IP then gets no OTHER-ADDRESS (the primary is
    not known), one that arrived anywhere else gets the alternate.
    ``ports`` is read at each request (the service's list: listeners on
    port 0 learn theirs after listening); its first two are the pair.
    """

    alt_ip: str
    ports: Sequence[int]
    primary_ip: str | None = None

    def other(self, local: tuple[str, int]) -> tuple[str, int] | None:
        ip, port = local
        first, second = self.ports[0], self.ports[1]
        if port not in (first, second):
            return None
        other_port = second if port == first else first
        if ip == self.alt_ip:
            return (self.primary_ip, other_port) if self.primary_ip else None
        return (self.alt_ip, other_port)


class ProbeFactory(Factory):
    """One per listening probe port."""
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    protocol = ProbeProtocol  # type: ignore[assignment]  # the stub wants a factory function
    #: the server's probe addresses, both families, for a request that asks (KERJO-PROBE-IPS):
    #: set by the service (``--interface``'s addresses)
    ips: Sequence[str] = ()

    def __init__(self, clock: IReactorTime, tokens: ProbeTokens, log: ObservationLog, *,
                 other_address: tuple[str, int] | AlternateAddresses | None = None, idle_timeout: float = 10.0,
                 max_requests: int = 16, software: str = "kerjostunt", per_ip: PerSourceCap | None = None,
                 max_lifetime: float = 30.0, connect_back: Connector | None = None) -> None:
        self.clock = clock
        #: dials probers back on request (None: answered "unsupported")
        self.connect_back = connect_back
        self.tokens = tokens
        self.log = log
        self.other_address = other_address
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.software = software
        #: open connections per source address, shared by every probe port (None: unbounded)
        self.per_ip = per_ip
        self.max_lifetime = max_lifetime

    def buildProtocol(self, addr: IAddress | None) -> ProbeProtocol | None:  # type: ignore[override]
        """A connection over the per-IP cap is closed at once (logged in aggregate)."""
        source = plain_ip(host_port(addr)[0])
        if self.per_ip is not None and not self.per_ip.admit(source):
            return None
        protocol = ProbeProtocol()
        protocol.factory = self
        protocol.source = source if self.per_ip is not None else None
        return protocol

    def doStop(self) -> None:
        if self.per_ip is not None:
            self.per_ip.stop()  # the refusal summary now, and no timer left behind
        super().doStop()  # type: ignore[no-untyped-call]

    def other_of(self, local: tuple[str, int]) -> tuple[str, int] | None:
        """OTHER-ADDRESS for a request that arrived at ``local``; None: no second address."""
        if isinstance(self.other_address, AlternateAddresses):
            return self.other_address.other(local)
        return self.other_address


# -- a probe connection's life -------------------------------------------------

_life = TypeMachineBuilder(ProbeLife, ProbeProtocol)
_waiting = _life.state("waiting")
_serving = _life.state("serving")
_closing = _life.state("closing")
_closed = _life.state("closed")


@_waiting.upon(ProbeLife.connected).to(_serving)
def _start(life: ProbeLife, probe: ProbeProtocol) -> None:
    probe.arm()


@_waiting.upon(ProbeLife.received).to(_serving)
def _first_read(life: ProbeLife, probe: ProbeProtocol) -> bool:
    probe.arm()
    return True


_serving.upon(ProbeLife.received).loop().returns(True)


@_serving.upon(ProbeLife.answered).loop()
def _answered(life: ProbeLife, probe: ProbeProtocol) -> None:
    probe.arm()


@_serving.upon(ProbeLife.idle).to(_closing)
def _abort(life: ProbeLife, probe: ProbeProtocol) -> None:
    probe.abort()


@_serving.upon(ProbeLife.finish).to(_closing)
def _close(life: ProbeLife, probe: ProbeProtocol) -> None:
    probe.close()


@_waiting.upon(ProbeLife.lost).to(_closed)
@_serving.upon(ProbeLife.lost).to(_closed)
@_closing.upon(ProbeLife.lost).to(_closed)
@_closed.upon(ProbeLife.lost).loop()
def _gone(life: ProbeLife, probe: ProbeProtocol) -> None:
    probe.release()


_waiting.upon(ProbeLife.serving).loop().returns(False)
_serving.upon(ProbeLife.serving).loop().returns(True)
for _over in (_closing, _closed):
    _over.upon(ProbeLife.received).loop().returns(False)
    _over.upon(ProbeLife.serving).loop().returns(False)
    _over.upon(ProbeLife.connected).loop().returns(None)
    _over.upon(ProbeLife.idle).loop().returns(None)
    _over.upon(ProbeLife.answered).loop().returns(None)
    _over.upon(ProbeLife.finish).loop().returns(None)

_ProbeLifeMachine = indexed(_life.build())
