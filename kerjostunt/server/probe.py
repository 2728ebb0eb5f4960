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

import ipaddress
import secrets
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from automat import TypeMachineBuilder
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.store import UnknownUser
from kerjostunt.tcp import host_port
from kerjostunt.wire import stun
from kerjostunt.wire.prediction import Sample

__all__ = ["ProbeTokens", "Observation", "ObservationLog", "ProbeLife", "ProbeProtocol", "ProbeFactory",
           "nat_not_stored"]

_log = Logger(namespace="kerjostunt.server.probe")

#: comprehension-required attributes this server understands (RFC 8489 15)
_KNOWN_REQUIRED = {t for t in stun.ATTRIBUTE_NAMES if t < 0x8000}


class ProbeTokens:
    """Short-lived probe credentials handed out in REGISTER's 200 OK.

    In memory only: they live for minutes, and a restarted server makes the
    peers re-register anyway.

    A token is bound to the public IP its user registered from (REGISTER
    calls ``registered_from`` before the token is issued): a probe with it
    from any other address is refused, so a captured probe replayed from
    elsewhere is not recorded against the user. Registering from a new
    address revokes the tokens bound to the old one; unregistering revokes
    them all (docs/probes.rst).
    """

    #: tokens kept per user; re-registering does not revoke the previous one
    #: (a probe may be in flight), but they cannot pile up either
    per_user = 4

    def __init__(self, clock: IReactorTime, lifetime: float = 300.0) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._tokens: dict[str, tuple[str, str, float, str | None]] = {}
        self._by_user: dict[str, deque[str]] = {}
        self._registered: dict[str, str] = {}

    def registered_from(self, user_id: str, ip: str) -> None:
        """Bind the user's next tokens to ``ip``; drop those bound elsewhere."""
        previous = self._registered.get(user_id)
        self._registered[user_id] = _plain_ip(ip)
        if previous is not None and previous != _plain_ip(ip):
            self.revoke_user(user_id)
            self._registered[user_id] = _plain_ip(ip)

    def issue(self, user_id: str) -> tuple[str, str]:
        """(token used as STUN USERNAME, password whose UTF-8 bytes are the key)."""
        self._prune()
        token = secrets.token_urlsafe(18)
        password = secrets.token_urlsafe(24)
        bound = self._registered.get(user_id)
        self._tokens[token] = (user_id, password, self._clock.seconds() + self.lifetime, bound)
        mine = self._by_user.setdefault(user_id, deque())
        mine.append(token)
        while len(mine) > self.per_user:
            self._tokens.pop(mine.popleft(), None)
        return token, password

    def lookup(self, token: str, source_ip: str | None = None) -> tuple[str, str] | None:
        """(user, password) of a live token usable from ``source_ip``, else None.

        A token issued without a binding (no ``registered_from``) works
        from anywhere; ``source_ip`` None skips the check (tests of the
        credentials alone).
        """
        entry = self._tokens.get(token)
        if entry is None:
            return None
        user_id, password, expires, bound = entry
        if self._clock.seconds() >= expires:
            self._drop(token)
            return None
        if bound is not None and source_ip is not None and not _may_probe_from(_plain_ip(source_ip), bound):
            return None
        return user_id, password

    def registered_ip(self, user_id: str) -> str | None:
        """The address the user's tokens are bound to (its signaling connection's)."""
        return self._registered.get(user_id)

    def revoke_user(self, user_id: str) -> None:
        """Every token of ``user_id`` stops working (unregistered, or deleted)."""
        self._registered.pop(user_id, None)
        for token in self._by_user.pop(user_id, ()):
            self._tokens.pop(token, None)

    def _drop(self, token: str) -> None:
        entry = self._tokens.pop(token, None)
        if entry is not None:
            mine = self._by_user.get(entry[0])
            if mine is not None:
                try:
                    mine.remove(token)
                except ValueError:
                    pass
                if not mine:
                    del self._by_user[entry[0]]

    def _prune(self) -> None:
        """Drop expired tokens, oldest first.

        Every token lives ``lifetime`` from its issue, so the dict's insertion
        order is expiry order: stop at the first live one.  (Scanning every
        token on every REGISTER made registering N peers cost O(N**2).)
        ``lookup`` still checks each token's own expiry.
        """
        now = self._clock.seconds()
        expired = []
        for token, (_, _, exp, _) in self._tokens.items():
            if now < exp:
                break
            expired.append(token)
        for token in expired:
            self._drop(token)

    def __len__(self) -> int:
        return len(self._tokens)


@dataclass(frozen=True)
class Observation:
    user_id: str
    local_port: int | None
    mapped_ip: str
    mapped_port: int
    server_ip: str
    server_port: int
    time: float


class ObservationLog:
    """Recent observations per user, bounded (oldest dropped), in memory.

    Listeners are told of each new one; the server uses that to run the
    prediction and persist the NAT description.  A failing listener is
    logged and does not stop the others.
    """

    def __init__(self, per_user: int = 32) -> None:
        self.per_user = per_user
        self._by_user: dict[str, deque[Observation]] = {}
        # The observations seen through each public address: with a
        # sequential NAT every host behind it moves one port counter, so the
        # calls' scheduling (calls/lanes.py) reads the NAT's allocation and
        # latest port from all of them, not only from the caller's own.
        self._by_ip: dict[str, deque[Observation]] = {}
        self._listeners: list[Callable[[Observation], None]] = []
        self._address_listeners: list[Callable[[str, str, int], None]] = []

    def subscribe_addresses(self, listener: Callable[[str, str, int], None]) -> None:
        """``listener(user_id, ip, port)`` for each probe from the family a user did not register from."""
        self._address_listeners.append(listener)

    def add_other_family(self, obs: Observation) -> None:
        """A probe over the other IP family: it names an address, not a NAT's behaviour,
        so it stays out of the samples prediction reads."""
        for listener in list(self._address_listeners):
            try:
                listener(obs.user_id, obs.mapped_ip, obs.mapped_port)
            except Exception:
                _log.failure("address listener failed for {user_id}", user_id=obs.user_id)

    def add(self, obs: Observation) -> None:
        self._by_user.setdefault(obs.user_id, deque(maxlen=self.per_user)).append(obs)
        if obs.local_port is not None:
            self._by_ip.setdefault(obs.mapped_ip, deque(maxlen=2 * self.per_user)).append(obs)
        for listener in list(self._listeners):
            try:
                listener(obs)
            except Exception:
                _log.failure("observation listener failed for {user_id}", user_id=obs.user_id)

    def for_user(self, user_id: str) -> list[Observation]:
        return list(self._by_user.get(user_id, ()))

    def forget(self, user_id: str) -> None:
        self._by_user.pop(user_id, None)

    def behind(self, public_ip: str) -> list[Sample]:
        """The recent samples of every user seen at ``public_ip`` (one NAT), oldest first."""
        return [Sample(o.local_port, o.mapped_ip, o.mapped_port, o.server_ip, o.server_port, o.time)
                for o in self._by_ip.get(public_ip, ()) if o.local_port is not None]

    def last_probe_behind(self, public_ip: str, excluding: Collection[str]) -> float | None:
        """When a user not in ``excluding`` last probed through ``public_ip`` (None: not lately)."""
        times = [o.time for o in self._by_ip.get(public_ip, ()) if o.user_id not in excluding]
        return max(times) if times else None

    def subscribe(self, callback: Callable[[Observation], None]) -> None:
        self._listeners.append(callback)

    def samples(self, user_id: str) -> list[Sample]:
        """Converted for prediction.py; observations without a reported local port are left out
        (they cannot show how a local port was mapped)."""
        return [Sample(o.local_port, o.mapped_ip, o.mapped_port, o.server_ip, o.server_port,
                       o.time)
                for o in self.for_user(user_id) if o.local_port is not None]


def ip_family(host: str) -> int:
    """4 or 6 (a textual IPv6 address has a colon, an IPv4 one none)."""
    return 6 if ":" in host else 4


def _may_probe_from(source_ip: str, bound: str) -> bool:
    """The bound address itself, or any address of the other family.

    A peer registered over IPv4 probes over IPv6 too (and the other way
    round) so the server learns both of its public addresses; the token
    pins the family it registered from, where a replay from elsewhere is
    refused. The other family's address is only recorded (the first one of
    a registration: ``Registrar.note_address``), never used to predict.
    """
    return source_ip == bound or ip_family(source_ip) != ip_family(bound)


def _plain_ip(host: str) -> str:
    """IPv4-mapped IPv6 (a dual-stack listener) reads as the IPv4 address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class _Reject(Exception):
    def __init__(self, code: int, reason: str, unknown: list[int] | None = None) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.unknown = code, reason, unknown or []


class ProbeLife(TypingProtocol):
    """The inputs of one probe connection's life.

    waiting (built, not yet connected) -> serving (STUN requests answered in
    order; the idle timer restarts with every read) -> closing (we asked the
    transport to go: over the request limit, unframeable input, or idle) ->
    closed (the transport is gone). Nothing is read once serving is over.
    """

    def connected(self) -> None:
        """TCP is up: the idle timer starts."""

    def received(self) -> bool:
        """Bytes arrived: True while serving (the idle timer restarts), else False."""

    def serving(self) -> bool:
        """Is the connection still answering? (A query: no transition.)"""

    def idle(self) -> None:
        """No byte for ``idle_timeout`` seconds: abort the connection."""

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

    # -- what the life's transitions do

    def arm(self) -> None:
        """(Re)start the idle timer."""
        self.disarm()
        self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle)

    def disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def abort(self) -> None:
        """Idle: drop the connection without waiting for buffered writes."""
        _log.debug("probe connection idle, closing {peer}", peer=self._peer())
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
        return (_plain_ip(peer_ip), peer_port), (_plain_ip(host_ip), host_port_)

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
            key = self._authenticate(msg, frame)
        except _Reject as r:
            self._error(msg.msg_type, tid, r.code, r.reason, r.unknown)
            return
        self._answer(msg, key)

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

    def _answer(self, msg: stun.StunMessage, key: tuple[bytes, bool] | None) -> None:
        mapped, origin = self._addresses()
        tid = msg.transaction_id
        attrs = [(stun.XOR_MAPPED_ADDRESS, stun.encode_xor_address(mapped, tid)),
                 (stun.MAPPED_ADDRESS, stun.encode_address(mapped))]
        if self.factory.other_address is not None:
            attrs.append((stun.RESPONSE_ORIGIN,
                          stun.encode_address(origin)))
            attrs.append((stun.OTHER_ADDRESS, stun.encode_address(self.factory.other_address)))
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


class ProbeFactory(Factory):
    """One per listening probe port."""

    protocol = ProbeProtocol  # type: ignore[assignment]  # the stub wants a factory function

    def __init__(self, clock: IReactorTime, tokens: ProbeTokens, log: ObservationLog, *,
                 other_address: tuple[str, int] | None = None, idle_timeout: float = 10.0,
                 max_requests: int = 16, software: str = "kerjostunt") -> None:
        self.clock = clock
        self.tokens = tokens
        self.log = log
        self.other_address = other_address
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.software = software


def nat_not_stored(failure: Failure, user_id: str, tokens: ProbeTokens, observations: ObservationLog) -> None:
    """The errback of storing what a probe showed (``store.record_nat``).

    The user may have been deleted since its token was issued (``kerjostunt
    user del`` runs in another process, so the server learns it here):
    its tokens are revoked and its observations forgotten, in one log line
    and no traceback. Anything else is a real failure and logged as one.
    """
    if failure.check(UnknownUser):
        _log.info("probe for deleted user {user_id}: its probe tokens are revoked", user_id=user_id)
        tokens.revoke_user(user_id)
        observations.forget(user_id)
        return
    _log.failure("Could not store NAT of {user}", failure, user=user_id)


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
@_serving.upon(ProbeLife.received).loop()
def _read(life: ProbeLife, probe: ProbeProtocol) -> bool:
    probe.arm()
    return True


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
    probe.disarm()


_waiting.upon(ProbeLife.serving).loop().returns(False)
_serving.upon(ProbeLife.serving).loop().returns(True)
for _over in (_closing, _closed):
    _over.upon(ProbeLife.received).loop().returns(False)
    _over.upon(ProbeLife.serving).loop().returns(False)
    _over.upon(ProbeLife.connected).loop().returns(None)
    _over.upon(ProbeLife.idle).loop().returns(None)
    _over.upon(ProbeLife.finish).loop().returns(None)

_ProbeLifeMachine = _life.build()
