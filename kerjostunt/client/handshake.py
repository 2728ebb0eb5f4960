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
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory
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


class HandshakeProtocol(Protocol):
    """
    Runs the handshake, then forwards everything to the application protocol.

    States: ``await_hello`` (responder), ``await_r`` (initiator),
    ``await_i`` (responder), ``done``, ``failed``.  ``handshake_done`` fires
    with the application protocol, or fails with HandshakeFailed.
    """

    factory: HandshakeFactory

    def __init__(self, factory: HandshakeFactory, addr: IAddress) -> None:
        self.factory = factory
        self.addr = addr
        self._outcome: Any = None
        self._observers: list[Deferred] = []
        self.app: Protocol | None = None
        self.state = "await_hello" if factory.role == "responder" else "await_r"
        self._buffer = b""
        self._timer: Any = None
        self._nonce_i = b""
        self._nonce_r = b""

    @property
    def handshake_done(self) -> Deferred:
        """
        A new Deferred per access: the application protocol, or HandshakeFailed.

        Observers rather than one shared Deferred, so a failure nobody asked
        about (a listener dropping a stranger) is logged once, not reported as
        an unhandled error.
        """
        d: Deferred = Deferred()
        if self._outcome is None:
            self._observers.append(d)
        elif isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)
        return d

    def _resolve(self, outcome: Any) -> None:
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
        if self.state == "done":
            assert self.app is not None
            self.app.dataReceived(data)
            return
        if self.state == "failed":
            return
        self._buffer += data
        while self.state not in ("done", "failed"):
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                if len(self._buffer) > MAX_LINE:
                    self._fail("handshake line too long")
                return
            self._buffer = rest
            self._line(line)
        if self.state == "done" and self._buffer:
            rest, self._buffer = self._buffer, b""
            assert self.app is not None
            self.app.dataReceived(rest)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel_timer()
        if self.state == "done":
            assert self.app is not None
            self.app.connectionLost(reason)
            return
        if self.state != "failed":
            self.state = "failed"
            why = reason.getErrorMessage() if reason is not None else "unknown"
            self._resolve(Failure(HandshakeFailed(f"connection lost during handshake: {why}")))

    # The handshake -----------------------------------------------------

    def _line(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) < 2 or parts[0] != MAGIC:
            self._fail("not a kerjostunt handshake")
            return
        handler = {
            "await_hello": self._on_hello,
            "await_r": self._on_responder_proof,
            "await_i": self._on_initiator_proof,
        }[self.state]
        handler(parts[1:])

    def _on_hello(self, words: list[bytes]) -> None:
        if len(words) != 2 or words[0] != b"HELLO" or not _is_hex(words[1], 32):
            self._fail("expected HELLO")
            return
        self._nonce_i = words[1]
        self._nonce_r = self.factory.make_nonce()
        mac = self._mac("responder")
        self.state = "await_i"
        self._send(b"R " + self._nonce_r + b" " + mac)

    def _on_responder_proof(self, words: list[bytes]) -> None:
        if len(words) != 3 or words[0] != b"R" or not _is_hex(words[1], 32):
            self._fail("expected responder proof")
            return
        self._nonce_r = words[1]
        if not hmac.compare_digest(words[2], self._mac("responder")):
            self._fail("responder does not know the call secret")
            return
        if self.factory.chosen is not None:
            self._fail("another connection to the peer was chosen")
            return
        self._send(b"I " + self._mac("initiator"))
        self._succeed()

    def _on_initiator_proof(self, words: list[bytes]) -> None:
        if len(words) != 2 or words[0] != b"I":
            self._fail("expected initiator proof")
            return
        if not hmac.compare_digest(words[1], self._mac("initiator")):
            self._fail("initiator does not know the call secret")
            return
        if self.factory.chosen is not None:
            self._fail("another connection to the peer was chosen")
            return
        self._succeed()

    def _mac(self, role: str) -> bytes:
        f = self.factory
        return compute_mac(f.secret, role, f.call_id, self._nonce_i, self._nonce_r)

    def _send(self, words: bytes) -> None:
        self.transport.write(MAGIC + b" " + words + b"\n")

    def _succeed(self) -> None:
        self._cancel_timer()
        app = self.factory.app_factory.buildProtocol(self.addr)
        if app is None:
            self._fail("application refused the connection")
            return
        self.state = "done"
        self.app = app
        self.factory.chosen = app
        log.debug(
            "handshake done for call {call_id} as {role} with {peer}",
            call_id=self.factory.call_id,
            role=self.factory.role,
            peer=self.addr,
        )
        app.makeConnection(self.transport)
        self._resolve(app)

    def _fail(self, reason: str) -> None:
        if self.state in ("done", "failed"):
            return
        self.state = "failed"
        self._cancel_timer()
        log.info(
            "handshake for call {call_id} with {peer} failed: {reason}",
            call_id=self.factory.call_id,
            peer=self.addr,
            reason=reason,
        )
        self._resolve(Failure(HandshakeFailed(reason)))
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(f"no handshake within {self.factory.timeout} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class HandshakeFactory(Factory):
    """
    Wraps the application's factory for one call.

    At most one connection per factory reaches the application (``chosen``);
    punch() gives every attempt of a call the same factory and counts a
    connection as won only when its ``handshake_done`` fires.
    """

    protocol = HandshakeProtocol  # type: ignore[assignment]

    def __init__(
        self,
        secret: bytes,
        call_id: str,
        role: str,
        app_factory: IProtocolFactory,
        clock: Any,
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
        self.chosen: Protocol | None = None

    def make_nonce(self) -> bytes:
        return os.urandom(16).hex().encode("ascii")

    def buildProtocol(self, addr: IAddress) -> HandshakeProtocol:
        return HandshakeProtocol(self, addr)
