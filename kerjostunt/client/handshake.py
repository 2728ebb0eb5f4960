"""
The peer-to-peer handshake run on every freshly punched TCP connection.

A TCP connection that completes is not proof that it reached the peer: a
stale NAT mapping or a predicted port can lead to another device that
happens to accept.  Both sides therefore prove knowledge of the per-call
secret before the application sees a byte.  Wire format (ASCII lines, each at
most 200 bytes, all hex lower case):

    initiator -> responder   KJ1 HELLO <nonce_i: 32 hex>\\n
    responder -> initiator   KJ1 R <nonce_r: 32 hex> <mac_r: 64 hex>\\n
    initiator -> responder   KJ1 I <mac_i: 64 hex>\\n

    mac_x = HMAC-SHA256(secret, b"kerjostunt-1 " + role_x + b"\\0" + call_id
                                 + b"\\0" + nonce_i + b"\\0" + nonce_r)

with role_x ``responder`` or ``initiator`` and the nonces as sent (hex).
Fresh nonces on both sides mean a recorded MAC is worthless on another
connection.  The responder only answers a well-formed HELLO and only learns
the initiator is genuine from the third line; the initiator never sends its
MAC to a host that failed to prove itself.

The third line doubles as the choice of connection: a punch can produce more
than one connection to the peer (accepted and dialed, several candidates).
A HandshakeFactory hands at most one connection to the application; the
initiator sends its MAC only on the first connection it verified, so both
sides settle on the same one.  Every other connection is dropped.

The initiator commits when it sends the third line, without hearing back
(waiting would add a round trip to every connect).  So the responder's
``KJ1 R`` is a promise: from then on it drops the connection only for the
handshake's own reasons (a bad third line, the connection lost, no third
line ``proof_wait`` seconds after its R), never because its search ran out
(``handshake_in_flight``, which a ``Contest`` reads at a deadline).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Protocol as TypingProtocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MAGIC = b"KJ1"
MAX_LINE = 200
ROLES = ("initiator", "responder")


class HandshakeFailed(Exception):
    """The connection did not prove knowledge of the call's secret in time."""


def compute_mac(
    secret: bytes, role: str, call_id: str, nonce_i: bytes, nonce_r: bytes
) -> bytes:
    """The hex MAC a side with ``role`` sends; nonces as on the wire (hex)."""
    message = b"\0".join(
        [b"kerjostunt-1 " + role.encode("ascii"), call_id.encode("utf-8"), nonce_i, nonce_r]
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


def _is_hex(value: bytes, length: int) -> bool:
    return len(value) == length and all(c in b"0123456789abcdef" for c in value)


class _Steps(TypingProtocol):
    """The handshake machine's inputs (every one returns None, so each may come from another's output)."""

    def received(self, data: bytes) -> None:
        """Bytes from the transport."""

    def line(self, line: bytes) -> None:
        """One complete handshake line (without its newline)."""

    def answered(self) -> None:
        """The responder sent its proof; now it waits for the initiator's."""

    def proved(self, app: IProtocol) -> None:
        """The other side proved itself and this connection is the chosen one; ``app`` takes it over."""

    def fail(self, reason: str) -> None:
        """Give up on this connection (bad line, wrong MAC, another one chosen, timeout)."""

    def in_flight(self) -> bool:
        """Is a line of ours out that the peer may act on (HELLO awaiting R, R awaiting I)?"""

    def lost(self, reason: Failure | None) -> None:
        """The transport closed."""


class HandshakeProtocol(Protocol):
    """
    Runs the handshake, then forwards everything to the application protocol.

    States (the machine below): ``await_hello`` (responder), ``await_r``
    (initiator), ``await_i`` (responder), ``done``, ``failed``.
    ``handshake_done`` fires with the application protocol, or fails with
    HandshakeFailed.  ``handshake_in_flight`` is true in ``await_r`` and
    ``await_i``.
    """

    factory: HandshakeFactory

    def __init__(self, factory: HandshakeFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.addr = addr
        self._outcome: IProtocol | Failure | None = None
        self._observers: list[Deferred[IProtocol]] = []
        self.app: IProtocol | None = None
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._nonce_i = b""
        self._nonce_r = b""
        machine = _RESPONDER if factory.role == "responder" else _INITIATOR
        self._steps: _Steps = machine(self)

    @property
    def handshake_done(self) -> Deferred[IProtocol]:
        """
        A new Deferred per access: the application protocol, or HandshakeFailed.

        Observers rather than one shared Deferred, so a failure nobody asked
        about (a listener dropping a stranger) is logged once, not reported as
        an unhandled error.
        """
        d: Deferred[IProtocol] = Deferred()
        if self._outcome is None:
            self._observers.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    @property
    def handshake_in_flight(self) -> bool:
        """
        A line of ours is out that the peer may act on: the initiator's HELLO
        (awaiting R), the responder's R (awaiting I; the initiator may have
        committed already).  A race whose deadline passes keeps such a
        connection until the handshake ends (``contest.Contest.expire``).
        """
        return self._steps.in_flight()

    def _resolve(self, outcome: IProtocol | Failure) -> None:
        self._outcome = outcome
        observers, self._observers = self._observers, []
        for d in observers:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    # Twisted callbacks -------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)
        if self.factory.role == "initiator":
            self._nonce_i = self.factory.make_nonce()
            self._send(b"HELLO " + self._nonce_i)

    def dataReceived(self, data: bytes) -> None:
        self._steps.received(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        self._steps.lost(reason)

    # What the machine does ---------------------------------------------

    def _take(self, data: bytes) -> None:
        self._buffer += data
        self._next_line()

    def _next_line(self) -> None:
        """Hand the machine the next complete line, if any (it handles it after the current step)."""
        line, sep, rest = self._buffer.partition(b"\n")
        if not sep:
            if len(self._buffer) > MAX_LINE:
                self._steps.fail("handshake line too long")
            return
        self._buffer = rest
        self._steps.line(line)

    def _words(self, line: bytes) -> list[bytes] | None:
        parts = line.split(b" ")
        if len(parts) < 2 or parts[0] != MAGIC:
            self._steps.fail("not a kerjostunt handshake")
            return None
        return parts[1:]

    def _on_hello(self, line: bytes) -> None:
        words = self._words(line)
        if words is None:
            return
        if len(words) != 2 or words[0] != b"HELLO" or not _is_hex(words[1], 32):
            self._steps.fail("expected HELLO")
            return
        self._nonce_i = words[1]
        self._nonce_r = self.factory.make_nonce()
        self._steps.answered()

    def _send_proof(self) -> None:
        self._send(b"R " + self._nonce_r + b" " + self._mac("responder"))
        # The initiator commits when its I leaves: give I ``proof_wait`` from here, so
        # that a HELLO that came late (or an R and an I held up on a congested path)
        # cannot make us drop a connection the initiator already counts as won.
        self._cancel_timer()
        self._timer = self.factory.clock.callLater(self.factory.proof_wait, self._timed_out)
        self._next_line()

    def _on_responder_proof(self, line: bytes) -> None:
        words = self._words(line)
        if words is None:
            return
        if len(words) != 3 or words[0] != b"R" or not _is_hex(words[1], 32):
            self._steps.fail("expected responder proof")
            return
        self._nonce_r = words[1]
        if not hmac.compare_digest(words[2], self._mac("responder")):
            self._steps.fail("responder does not know the call secret")
            return
        if self.factory.chosen is not None:
            self._steps.fail("another connection to the peer was chosen")
            return
        self._send(b"I " + self._mac("initiator"))
        self._choose()

    def _on_initiator_proof(self, line: bytes) -> None:
        words = self._words(line)
        if words is None:
            return
        if len(words) != 2 or words[0] != b"I":
            self._steps.fail("expected initiator proof")
            return
        if not hmac.compare_digest(words[1], self._mac("initiator")):
            self._steps.fail("initiator does not know the call secret")
            return
        if self.factory.chosen is not None:
            self._steps.fail("another connection to the peer was chosen")
            return
        self._choose()

    def _mac(self, role: str) -> bytes:
        f = self.factory
        return compute_mac(f.secret, role, f.call_id, self._nonce_i, self._nonce_r)

    def _send(self, words: bytes) -> None:
        assert self.transport is not None
        self.transport.write(MAGIC + b" " + words + b"\n")

    def _choose(self) -> None:
        self._cancel_timer()
        app = self.factory.app_factory.buildProtocol(self.addr)  # type: ignore[arg-type]  # None only in tests
        if app is None:
            self._steps.fail("application refused the connection")
            return
        self.factory.chosen = app
        self._steps.proved(app)

    def _hand_over(self, app: IProtocol) -> None:
        """Done: ``app`` gets the transport, then whatever arrived after the last handshake line."""
        self.app = app
        log.debug(
            "handshake done for call {call_id} as {role} with {peer}",
            call_id=self.factory.call_id,
            role=self.factory.role,
            peer=self.addr,
        )
        assert self.transport is not None
        app.makeConnection(self.transport)
        self._resolve(app)
        if self._buffer:
            rest, self._buffer = self._buffer, b""
            app.dataReceived(rest)

    def _give_up(self, reason: str) -> None:
        self._cancel_timer()
        log.info(
            "handshake for call {call_id} with {peer} failed: {reason}",
            call_id=self.factory.call_id,
            peer=self.addr,
            reason=reason,
        )
        self._resolve(Failure(HandshakeFailed(reason)))
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport, not ITransport

    def _lost_early(self, reason: Failure | None) -> None:
        why = reason.getErrorMessage() if reason is not None else "unknown"
        self._resolve(Failure(HandshakeFailed(f"connection lost during handshake: {why}")))

    def _timed_out(self) -> None:
        proof = self._steps.in_flight() and self.factory.role == "responder"
        limit = f"no initiator proof within {self.factory.proof_wait} s of ours" if proof else \
            f"no handshake within {self.factory.timeout} s"
        self._timer = None
        self._steps.fail(limit)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _build(first: str) -> Callable[[HandshakeProtocol], _Steps]:
    """The machine for one role: the responder starts in ``await_hello``, the initiator in ``await_r``."""
    builder = TypeMachineBuilder(_Steps, HandshakeProtocol)
    if first == "await_hello":
        await_hello = builder.state("await_hello")
        await_r = builder.state("await_r")
    else:
        await_r = builder.state("await_r")
        await_hello = builder.state("await_hello")
    await_i = builder.state("await_i")
    done = builder.state("done")
    failed = builder.state("failed")
    waiting = (await_hello, await_r, await_i)

    for state in waiting:
        state.upon(_Steps.received).loop()(lambda steps, p, data: p._take(data))
        state.upon(_Steps.fail).to(failed)(lambda steps, p, reason: p._give_up(reason))
        state.upon(_Steps.lost).to(failed)(lambda steps, p, reason: p._lost_early(reason))
    await_hello.upon(_Steps.line).loop()(lambda steps, p, line: p._on_hello(line))
    await_r.upon(_Steps.line).loop()(lambda steps, p, line: p._on_responder_proof(line))
    await_i.upon(_Steps.line).loop()(lambda steps, p, line: p._on_initiator_proof(line))
    await_hello.upon(_Steps.answered).to(await_i)(lambda steps, p: p._send_proof())
    for state in (await_r, await_i):
        state.upon(_Steps.proved).to(done)(lambda steps, p, app: p._hand_over(app))

    @done.upon(_Steps.received).loop()
    def forward(steps: _Steps, p: HandshakeProtocol, data: bytes) -> None:
        assert p.app is not None
        p.app.dataReceived(data)

    @done.upon(_Steps.lost).loop()
    def app_lost(steps: _Steps, p: HandshakeProtocol, reason: Failure | None) -> None:
        assert p.app is not None
        p.app.connectionLost(reason)  # type: ignore[arg-type]

    for state, out in ((await_hello, False), (await_r, True), (await_i, True), (done, False), (failed, False)):
        state.upon(_Steps.in_flight).loop().returns(out)
    for state in (done, failed):
        state.upon(_Steps.fail).loop()(lambda steps, p, reason: None)
        state.upon(_Steps.line).loop()(lambda steps, p, line: None)
    failed.upon(_Steps.received).loop()(lambda steps, p, data: None)
    failed.upon(_Steps.lost).loop()(lambda steps, p, reason: None)
    return builder.build()


class HandshakeFactory(Factory[HandshakeProtocol]):
    """
    Wraps the application's factory for one call.

    At most one connection per factory reaches the application (``chosen``);
    punch() gives every attempt of a call the same factory and counts a
    connection as won only when its ``handshake_done`` fires.
    """
    noisy = False  # no 'Starting factory <...>' line per listen or connect

    def __init__(
        self,
        secret: bytes,
        call_id: str,
        role: str,
        app_factory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float = 5.0,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if not secret:
            raise ValueError("an empty secret proves nothing")
        self.secret = secret
        self.call_id = call_id
        self.role = role
        self.app_factory = app_factory
        self.clock = clock
        self.timeout = timeout
        #: how long the responder waits for the initiator's proof after its own: the
        #: initiator counts the connection as won the moment its proof leaves, and gives
        #: up (with an RST that takes the same path) only before; twice ``timeout``, since
        #: a congested path (the NAT lab's 40-peer group, one-way delays of seconds on two
        #: loaded cores) held R and I up for more than 5 s
        self.proof_wait = 2 * timeout
        self.chosen: IProtocol | None = None

    def make_nonce(self) -> bytes:
        return os.urandom(16).hex().encode("ascii")

    def buildProtocol(self, addr: IAddress | None) -> HandshakeProtocol:
        return HandshakeProtocol(self, addr)


_RESPONDER = _build("await_hello")
_INITIATOR = _build("await_r")
