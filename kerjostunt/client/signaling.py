"""The peer's side of the signaling connection: a small SIP user agent over TLS.

It registers with digest authentication, answers the server's keepalive
pings (RFC 5626: CRLFCRLF in, CRLF out) so the server can measure our RTT,
sends requests and matches their final responses, and hands requests from the
server (INVITE, CANCEL, BYE, INFO) to the application.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kerjostunt.client import reasons
from kerjostunt.tcp import no_delay
from kerjostunt.wire import kerjo
from kerjostunt.wire.kerjo import ProbeOffer, format_endpoint, new_branch, new_tag
from kerjostunt.wire.sip.digest import authorization
from kerjostunt.wire.sip.headers import parse_auth, parse_via
from kerjostunt.wire.sip.message import Headers, Request, Response, make_response
from kerjostunt.wire.sip.parser import KeepAlivePing, KeepAlivePong, SIPParseError, StreamParser

log = Logger()

_T = TypeVar("_T")

TRANSACTION_TIMEOUT = 32.0  # RFC 3261 Timer B
#: the server holds the request on purpose (a call waiting for its turn at a NAT)
QUEUED = 182
#: our REGISTERs ask for the SHA-256 challenge (the server offers MD5 alone to other clients)
DIGEST_WANTED = (kerjo.DIGEST, kerjo.format_digest(("SHA-256",)))


class SignalingError(Exception):
    """The server refused something; ``response`` says what."""

    def __init__(self, message: str, response: Response | None = None) -> None:
        super().__init__(message)
        self.response = response


class RegistrationFailed(SignalingError):
    """Wrong password, unknown user, or a server that would not register us."""


def probe_offer(response: Response) -> ProbeOffer | None:
    """What REGISTER's 200 OK says about probing (``X-Kerjo-Probe``), None if nothing usable."""
    value = response.headers.get(kerjo.PROBE)
    if not value:
        return None
    try:
        return kerjo.parse_probe_offer(value, response.headers.get(kerjo.PROBE_ALT_IP),
                                       response.headers.get(kerjo.PROBE_IPS))
    except ValueError:
        log.warn("Unusable X-Kerjo-Probe header: {value}", value=value)
        return None


@dataclass(frozen=True)
class Registration:
    """What registering taught us: our public address and the probe credentials."""

    user_id: str
    public_ip: str | None
    public_port: int | None
    expires: int
    probe: ProbeOffer | None


@dataclass
class _Transaction:
    request: Request
    result: defer.Deferred[Response]
    timer: IDelayedCall | None = field(default=None, repr=False)
    timeout: float = TRANSACTION_TIMEOUT
    on_provisional: Callable[[Response], None] | None = field(default=None, repr=False)


@implementer(IHandshakeListener)
class SignalingClientProtocol(Protocol):
    """One registered peer's signaling connection."""

    def __init__(
        self,
        clock: IReactorTime,
        user_id: str,
        password: str,
        domain: str,
        on_request: Callable[[SignalingClientProtocol, Request], None] | None = None,
    ) -> None:
        self.clock = clock
        self.user_id = user_id
        self._password = password
        self.domain = domain
        self.on_request = on_request
        self._parser = StreamParser()
        # RFC 3261 17.1.3: a client transaction is its branch plus the CSeq
        # method (a CANCEL shares its INVITE's branch).
        self._transactions: dict[tuple[str, str], _Transaction] = {}
        self._cseq = 0
        self._register_call_id = secrets.token_hex(12) + "@kerjostunt"
        self._from_tag = new_tag()
        self._ping_sent_at: float | None = None
        self._pong_waiters: list[defer.Deferred[float]] = []
        self.rtt: float | None = None
        self.registration: Registration | None = None
        self.secured: defer.Deferred[SignalingClientProtocol] = defer.Deferred()
        self.disconnected: defer.Deferred[None] = defer.Deferred()
        self.local: tuple[str, int] = ("0.0.0.0", 0)
        #: why the connection closed (a failed TLS handshake says why here)
        self.lost_reason: BaseException | None = None

    # -- Twisted ----------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)  # requests right after another one must not wait for its ACK
        self.local = _ip_and_port(self._transport().getHost())

    def handshakeCompleted(self) -> None:
        if not self.secured.called:
            self.secured.callback(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost_reason = reason.value
        for tx in list(self._transactions.values()):
            self._finish(tx, Failure(SignalingError(f"connection lost: {reason.getErrorMessage()}")))
        for waiter in self._pong_waiters:
            waiter.errback(SignalingError("connection lost"))
        self._pong_waiters = []
        if not self.disconnected.called:
            self.disconnected.callback(None)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except SIPParseError as exc:
            log.warn("Server sent unparsable data ({reason}); closing", reason=exc.reason)
            self.hang_up()
            return
        for event in events:
            if isinstance(event, KeepAlivePing):
                self._transport().write(b"\r\n")
            elif isinstance(event, KeepAlivePong):
                self._pong()
            elif isinstance(event, Response):
                self._response(event)
            else:
                self._request(event)

    # -- the connection ---------------------------------------------------------

    def _transport(self) -> ITCPTransport:
        """TLS over TCP, from ``connectionMade`` on (a TLS wrapper provides what its TCP transport does)."""
        assert self.transport is not None, "not connected"
        return cast(ITCPTransport, self.transport)

    def hang_up(self) -> None:
        """Close the connection cleanly (TLS close_notify, then FIN)."""
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (a silent, dead server)."""
        self._transport().abortConnection()

    @property
    def local_ip(self) -> str:
        """Our address on this connection: the interface the punch ports bind to."""
        return _ip_and_port(self._transport().getHost())[0]

    @property
    def server_ip(self) -> str:
        """The server's address as we reach it: its probe ports are there too."""
        return _ip_and_port(self._transport().getPeer())[0]

    # -- requests we send -------------------------------------------------------

    def uri_of(self, user_id: str) -> str:
        return f"sips:{user_id}@{self.domain}"

    def build_request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        call_id: str | None = None,
        cseq: int | None = None,
        from_tag: str | None = None,
        to_tag: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Request:
        if cseq is None:
            self._cseq += 1
            cseq = self._cseq
        h = Headers()
        h.add("Via", f"SIP/2.0/TLS {format_endpoint(self.local)};branch={new_branch()};rport")
        h.add("Max-Forwards", "70")
        h.add("From", f"<{self.uri_of(self.user_id)}>;tag={from_tag or self._from_tag}")
        to_value = f"<{to or uri}>" + (f";tag={to_tag}" if to_tag else "")
        h.add("To", to_value)
        h.add("Call-ID", call_id or secrets.token_hex(12) + "@kerjostunt")
        h.add("CSeq", f"{cseq} {method}")
        for name, value in headers:
            h.add(name, value)
        return Request(method, uri, h, body)

    def send_request(self, request: Request, timeout: float = TRANSACTION_TIMEOUT,
                     on_provisional: Callable[[Response], None] | None = None) -> defer.Deferred[Response]:
        """Send; the Deferred fires with the final response (ACK: fires at once, with None).

        ``on_provisional`` hears every 1xx; a ``182 Queued`` also restarts
        the ``timeout`` (the server holds the request on purpose).
        """
        self._transport().write(request.to_bytes())
        if request.method == "ACK":
            return defer.succeed(None)  # type: ignore[arg-type]  # an ACK has no response; callers ignore it
        key = _transaction_key(request)
        tx = _Transaction(request, defer.Deferred(), timeout=timeout, on_provisional=on_provisional)
        tx.timer = self.clock.callLater(timeout, self._timeout, key)
        self._transactions[key] = tx
        return tx.result

    def request(self, method: str, uri: str, **kwargs: Any) -> defer.Deferred[Response]:
        timeout = kwargs.pop("timeout", TRANSACTION_TIMEOUT)
        return self.send_request(self.build_request(method, uri, **kwargs), timeout)

    def respond(
        self,
        request: Request,
        code: int,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        to_tag: str | None = None,
    ) -> None:
        response = make_response(request, code, to_tag=to_tag)
        for name, value in headers:
            response.headers.add(name, value)
        response.body = body
        self._transport().write(response.to_bytes())

    # -- registration -----------------------------------------------------------

    @defer.inlineCallbacks
    def register(self, expires: int = 3600,
                 mapping: tuple[str, int] | None = None) -> Generator[defer.Deferred[Response], Response, Registration]:
        """REGISTER, answering one digest challenge; fires with a Registration.

        ``mapping``: our gateway's mapping of our app port, so that the server
        can tell a caller whose NAT no technique joins with ours that we are
        reachable there after all (``X-Kerjo-Port-Mapping``).
        """
        uri = f"sips:{self.domain}"
        contact = [("Contact", f"<sips:{self.user_id}@{format_endpoint(self.local)};transport=tls>;expires={expires}")]
        if mapping is not None:
            contact.append((kerjo.PORT_MAPPING, format_endpoint(mapping)))
        response = yield self.request(
            "REGISTER", uri, to=self.uri_of(self.user_id), call_id=self._register_call_id,
            headers=[*contact, DIGEST_WANTED],
        )
        if response.code in (401, 407):
            auth = self._authorization(response, "REGISTER", uri)
            response = yield self.request(
                "REGISTER", uri, to=self.uri_of(self.user_id), call_id=self._register_call_id,
                headers=[*contact, ("Authorization", auth)],
            )
        if response.code != 200:
            why = reasons.registration_failure(response.code, response.reason, self.user_id,
                                               response.headers.get("Retry-After"))
            raise RegistrationFailed(why, response)
        self.registration = self._registration(response, expires)
        return self.registration

    def unregister(self) -> defer.Deferred[Response]:
        self.registration = None
        uri = f"sips:{self.domain}"
        remove = [("Contact", "*"), ("Expires", "0")]
        d = self.request("REGISTER", uri, to=self.uri_of(self.user_id), call_id=self._register_call_id,
                         headers=[*remove, DIGEST_WANTED])

        def challenged(response: Response) -> Response | defer.Deferred[Response]:
            if response.code in (401, 407):
                return self.request(
                    "REGISTER", uri, to=self.uri_of(self.user_id), call_id=self._register_call_id,
                    headers=[*remove, ("Authorization", self._authorization(response, "REGISTER", uri))],
                )
            return response

        return d.addCallback(challenged)

    def _authorization(self, response: Response, method: str, uri: str) -> str:
        challenges = [parse_auth(v) for v in response.headers.get_all("WWW-Authenticate")]
        usable = [params for scheme, params in challenges if scheme.lower() == "digest"]
        if not usable:
            raise RegistrationFailed("no digest challenge", response)
        # SHA-256 whenever offered, whatever the order (servers often list MD5 first).
        preference = {"SHA-256": 0, "MD5": 1}
        params = min(usable, key=lambda p: preference.get(p.get("algorithm", "MD5").upper(), 2))
        return authorization(params, self.user_id, self._password, method, uri, secrets.token_hex(8))

    def _registration(self, response: Response, expires: int) -> Registration:
        public_ip: str | None = None
        public_port: int | None = None
        vias = response.headers.get_all("Via")
        if vias:
            via = parse_via(vias[0])
            public_ip = via.params.get("received") or None
            rport = via.params.get("rport")
            public_port = int(rport) if rport and rport.isdigit() else None
        granted = response.headers.get("Expires")
        return Registration(
            self.user_id, public_ip, public_port,
            int(granted) if granted and granted.isdigit() else expires,
            probe_offer(response),
        )

    # -- keepalive --------------------------------------------------------------

    def ping(self) -> defer.Deferred[float]:
        """Send a CRLFCRLF keepalive; fires with the round trip in seconds."""
        d: defer.Deferred[float] = defer.Deferred()
        self._pong_waiters.append(d)
        if self._ping_sent_at is None:
            self._ping_sent_at = self.clock.seconds()
            self._transport().write(b"\r\n\r\n")
        return d

    def _pong(self) -> None:
        if self._ping_sent_at is None:
            return
        rtt = self.rtt = self.clock.seconds() - self._ping_sent_at
        self._ping_sent_at = None
        waiters, self._pong_waiters = self._pong_waiters, []
        for waiter in waiters:
            waiter.callback(rtt)

    # -- what arrives -----------------------------------------------------------

    def _response(self, response: Response) -> None:
        try:
            key = _transaction_key(response)
        except ValueError:
            return
        tx = self._transactions.get(key)
        if tx is None:
            return
        if response.code < 200:
            self._provisional(key, tx, response)
            return
        self._finish(tx, response)

    def _provisional(self, key: tuple[str, str], tx: _Transaction, response: Response) -> None:
        if response.code == QUEUED and tx.timer is not None and tx.timer.active():
            tx.timer.cancel()
            tx.timer = self.clock.callLater(tx.timeout, self._timeout, key)
        if tx.on_provisional is not None:
            try:
                tx.on_provisional(response)
            except Exception:
                log.failure("Handling {code} to {method} failed", code=response.code, method=tx.request.method)

    def _finish(self, tx: _Transaction, result: Response | Failure) -> None:
        self._transactions.pop(_transaction_key(tx.request), None)
        if tx.timer is not None and tx.timer.active():
            tx.timer.cancel()
        if not tx.result.called:
            if isinstance(result, Failure):
                tx.result.errback(result)
            else:
                tx.result.callback(result)

    def _timeout(self, key: tuple[str, str]) -> None:
        tx = self._transactions.get(key)
        if tx is not None:
            tx.timer = None
            self._finish(tx, Failure(defer.TimeoutError(f"no final response to {tx.request.method}")))

    def _request(self, request: Request) -> None:
        if self.on_request is None:
            if request.method != "ACK":
                self.respond(request, 501)
            return
        try:
            self.on_request(self, request)
        except Exception:
            log.failure("Handling {method} from the server failed", method=request.method)
            if request.method != "ACK":
                self.respond(request, 500)


def _ip_and_port(address: IAddress) -> tuple[str, int]:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    raise TypeError(f"signaling runs over TCP/IP, not {address!r}")


def _transaction_key(message: Request | Response) -> tuple[str, str]:
    """(top Via branch, CSeq method); ValueError when either is missing."""
    vias = message.headers.get_all("Via")
    cseq = message.cseq
    if not vias or cseq is None:
        raise ValueError("no Via or CSeq")
    return parse_via(vias[0]).branch or "", cseq[1]


class ConnectSignaling(TypingProtocol):
    """``connect_signaling``'s shape, for whoever replaces it (tests, a relay)."""

    def __call__(
        self,
        reactor: IReactorTime,
        host: str,
        port: int,
        tls_options: IOpenSSLClientConnectionCreator,
        protocol_factory: Callable[[], SignalingClientProtocol],
        *,
        timeout: float = ...,
        expected_name: str | None = ...,
    ) -> defer.Deferred[SignalingClientProtocol]: ...


def connect_signaling(
    reactor: IReactorTime,
    host: str,
    port: int,
    tls_options: IOpenSSLClientConnectionCreator,
    protocol_factory: Callable[[], SignalingClientProtocol],
    *,
    timeout: float = 10.0,
    bind_address: tuple[str, int] | None = None,
    expected_name: str | None = None,
) -> defer.Deferred[SignalingClientProtocol]:
    """Connect over TLS; fires once the handshake verified the server's certificate.

    ``timeout`` bounds the TCP connect, and then the TLS handshake again (a
    port that accepts and stays silent). Failures are ``SignalingError``s
    whose message names the cause (client/reasons.py).
    """
    tcp = HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind_address)
    endpoint = wrapClientTLS(tls_options, tcp)
    proto = protocol_factory()
    name = expected_name or host

    def connected(_: object) -> defer.Deferred[SignalingClientProtocol]:
        def silent() -> None:
            if not proto.secured.called:
                proto.secured.errback(SignalingError(reasons.silent_server(host, port, timeout)))
                if proto.transport is not None:
                    proto._transport().abortConnection()

        timer = reactor.callLater(timeout, silent)

        def unsecured(_: None) -> None:
            if not proto.secured.called:
                proto.secured.errback(SignalingError(reasons.tls_failure(proto.lost_reason, name)))

        def done(result: _T) -> _T:
            if timer.active():
                timer.cancel()
            return result

        proto.disconnected.addCallback(unsecured)
        return proto.secured.addBoth(done)

    def not_connected(failure: Failure) -> Failure:
        why = reasons.connect_failure(failure.value, host, port, timeout) if failure.value is not None else None
        return Failure(SignalingError(why)) if why is not None else failure

    return endpoint.connect(Factory.forProtocol(lambda: proto)).addCallbacks(connected, not_connected)
