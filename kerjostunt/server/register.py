"""REGISTER: digest authentication, bindings, and what the peer learns back.

The 200 OK is where a peer learns its public address (``received``/``rport``
on the Via, RFC 3581) and gets a probe token for the STUN-over-TCP probes, so
everything the traversal needs starts here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from kerjostunt.server.auth import (
    AuthGuard,
    NonceManager,
    Replayed,
    SIPDigestCredentials,
    Throttled,
    challenge_params,
    sip_uri_matches,
)
from kerjostunt.server.deadline import STORE_DEADLINE, within
from kerjostunt.server.registrar import Registrar, SignalingConnection
from kerjostunt.server.throttle import GuessThrottle
from kerjostunt.store import StoreError, UnknownUser
from kerjostunt.store.api import UsageRecorder
from kerjostunt.wire import kerjo
from kerjostunt.wire.sip.headers import format_auth, parse_auth, parse_name_addr, parse_via
from kerjostunt.wire.sip.message import Request, Response, make_response

log = Logger()

# MD5 first: RFC 8760 prefers SHA-256 first, but widely used SIP tools answer
# only the first challenge and only MD5 (sipp 3.6), or give up when any
# challenge is one they cannot compute (baresip 1.0: "Function not
# implemented"). So the first algorithm is offered to every client and the
# others only to clients that name them (``offered_algorithms``); ours name
# SHA-256 and pick it. ``--digest-algorithms`` changes the list.
CHALLENGE_ALGORITHMS = ("MD5", "SHA-256")


def offered_algorithms(configured: Sequence[str], request: Request) -> list[str]:
    """The challenges a REGISTER gets: the first configured, and those the client asked for.

    A client asks in ``X-Kerjo-Digest`` or by having answered with the
    algorithm before (a stale re-challenge); MD5 counts as asked for by
    every client (RFC 2617's default, which all digest clients compute).
    """
    wanted = {"MD5", *kerjo.parse_digest(request.headers.get(kerjo.DIGEST))}
    for value in request.headers.get_all("Authorization"):
        try:
            _, params = parse_auth(value)
        except ValueError:
            continue
        wanted.add(params.get("algorithm", "MD5").upper())
    return [a for i, a in enumerate(configured) if i == 0 or a in wanted]

DEFAULT_EXPIRES = 3600
MAX_EXPIRES = 7200
MIN_EXPIRES = 60
#: seconds a peer is told to wait when the user database cannot answer
STORE_RETRY_AFTER = 5
#: seconds between two log lines about REGISTERs the database could not answer
STORE_LOG_INTERVAL = 10.0


class ISIPUser(Interface):
    """Avatar interface: an authenticated user ID."""


class ProbeTokenKeeper(Protocol):
    """What REGISTER tells the probe tokens (``probe.ProbeTokens``)."""

    def registered_from(self, user_id: str, ip: str) -> None:
        """``user_id`` registers from ``ip``: tokens issued next accept probes from there only."""

    def revoke_user(self, user_id: str) -> None:
        """``user_id`` unregistered: its tokens stop working."""


@dataclass(frozen=True)
class Protection:
    """REGISTER's defences beyond the digest itself.

    ``throttle`` is the server's one ``GuessThrottle`` (shared with the
    web); None gives the handler one of its own. ``explain`` names a cause
    the operator can fix (a password set for another realm) in the log. ``tokens``, when given, are
    bound to the address each user registers from and revoked when it
    unregisters (docs/probes.rst). ``store_deadline``: seconds the
    credentials may take before the answer is 503 with Retry-After (a
    locked or hung database, docs/security.rst).
    """

    throttle: GuessThrottle | None = None
    tokens: ProbeTokenKeeper | None = None
    store_deadline: float = STORE_DEADLINE
    #: after a wrong answer: why this user's logins fail, when the cause is known
    #: (its password was set for another realm), for the log line
    explain: Callable[[str], Deferred[str | None]] | None = None


class RequestError(Exception):
    """A request we answer with ``code`` and ``reason`` and otherwise ignore."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


def local_tag(request: Request) -> str:
    """A To tag that is the same for retransmissions of one request (RFC 3261 8.2.6.2)."""
    seed = f"{request.call_id}|{request.headers.get('From')}|{request.cseq}"
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


def answer(request: Request, code: int, reason: str | None = None) -> Response:
    """A response from the server acting as a UAS: To gets our tag."""
    return make_response(request, code, reason, to_tag=local_tag(request) if code > 100 else None)


def user_of(header_value: str | None, domain: str) -> str:
    """The user ID of a To/From header, or RequestError."""
    if not header_value:
        raise RequestError(400, "Bad Request: missing To/From")
    try:
        addr = parse_name_addr(header_value)
    except ValueError:
        raise RequestError(400, "Bad Request: unparsable To/From") from None
    # The host part is not checked: one server serves one user namespace, and
    # SIP tools often put the server's IP there instead of the domain.
    if not addr.uri.user:
        raise RequestError(400, "Bad Request: no user in To/From")
    return addr.uri.user


def via_with_received(request: Request, peer: tuple[str, int]) -> list[str]:
    """The request's Vias with the top one stamped received/rport (RFC 3581)."""
    vias = request.headers.get_all("Via")
    if not vias:
        return vias
    try:
        top = parse_via(vias[0])
    except ValueError:
        return vias
    top.params["received"] = peer[0]
    top.params["rport"] = str(peer[1])
    return [str(top), *vias[1:]]


def set_vias(response: Response, vias: list[str]) -> None:
    if not vias:
        return
    response.headers.set("Via", vias[0])
    for via in vias[1:]:
        response.headers.add("Via", via)


class RegisterHandler:
    """Authenticates REGISTERs and keeps the registrar's bindings."""

    def __init__(
        self,
        clock: IReactorTime,
        domain: str,
        registrar: Registrar,
        portal: Portal,
        nonces: NonceManager,
        seen: UsageRecorder,
        extra_headers: Callable[[str], list[tuple[str, str]]] = lambda user_id: [],
        *,
        counter: Callable[[str], None] = lambda what: None,
        challenge_algorithms: Sequence[str] = CHALLENGE_ALGORITHMS,
        protection: Protection = Protection(),
    ) -> None:
        self._algorithms = tuple(challenge_algorithms)
        self._clock = clock
        self._domain = domain
        self._registrar = registrar
        self._nonces = nonces
        self._seen = seen
        self._extra_headers = extra_headers
        self._count = counter
        self.throttle = protection.throttle or GuessThrottle(clock, count=counter)
        self.guard = AuthGuard(portal, self.throttle, "sip")
        self._tokens = protection.tokens
        self._store_deadline = protection.store_deadline
        self._store_failures = 0  # REGISTERs answered 503 since the last log line about them
        self._store_logged = float("-inf")
        self._explain = protection.explain

    def handle(self, conn: SignalingConnection, request: Request) -> None:
        try:
            user_id = user_of(request.headers.get("To"), self._domain)
            if user_of(request.headers.get("From"), self._domain) != user_id:
                raise RequestError(403, "Forbidden: third-party registration")
            creds = self._credentials(request)
        except RequestError as exc:
            conn.send(answer(request, exc.code, exc.reason))
            return
        if creds is None:
            self._challenge(conn, request)
            return
        if creds.username != user_id:
            conn.send(answer(request, 403, "Forbidden: credentials for another user"))
            return
        if not sip_uri_matches(creds.uri, request.uri):
            conn.send(answer(request, 400, "Bad Request: digest uri is not the Request-URI"))
            return
        nonce_state = self._nonces.check(creds.nonce, conn.peer[0])
        if nonce_state != "ok":
            self._challenge(conn, request, stale=nonce_state == "stale")
            return
        d = within(self._clock, self._store_deadline, self.guard.login(creds, conn.peer[0], ISIPUser))
        d.addCallbacks(
            lambda result: self._authenticated(conn, request, result[1]),
            lambda failure: self._refused(conn, request, user_id, failure),
        )
        d.addErrback(lambda f: log.failure("REGISTER handling failed", f))

    def _credentials(self, request: Request) -> SIPDigestCredentials | None:
        """Our realm's digest answer, None when there is none (so: challenge)."""
        for value in request.headers.get_all("Authorization"):
            try:
                scheme, params = parse_auth(value)
            except ValueError:
                raise RequestError(400, "Bad Request: unparsable Authorization") from None
            if scheme.lower() != "digest" or params.get("realm") != self._domain:
                continue
            try:
                return SIPDigestCredentials.from_params("REGISTER", params)
            except ValueError as exc:
                raise RequestError(400, f"Bad Request: {exc}") from None
        return None

    def _challenge(self, conn: SignalingConnection, request: Request, stale: bool = False) -> None:
        response = answer(request, 401)
        nonce = self._nonces.issue(conn.peer[0])
        for algorithm in offered_algorithms(self._algorithms, request):
            params = challenge_params(self._domain, nonce, algorithm, stale)
            response.headers.add("WWW-Authenticate", format_auth("Digest", params, challenge=True))
        self._count("challenges")
        # The normal first answer to every REGISTER: debug, not info.
        log.debug("REGISTER from {ip}:{port}: 401 challenge{stale}", ip=conn.peer[0], port=conn.peer[1],
                  stale=" (stale nonce)" if stale else "")
        conn.send(response)

    def _refused(self, conn: SignalingConnection, request: Request, user_id: str, failure: Failure) -> None:
        if failure.check(Replayed):
            self._count("digest_replays")
            self._challenge(conn, request, stale=True)
            return
        if isinstance(failure.value, Throttled):
            refusal = answer(request, 403, "Forbidden: too many failed attempts")
            refusal.headers.add("Retry-After", str(max(1, round(failure.value.retry_after))))
            conn.send(refusal)
            return
        if failure.check(UnauthorizedLogin):
            # Logged by the throttle, in aggregate (one line per source per interval),
            # and here when the cause is one the operator can fix.
            self._count("auth_failures")
            conn.send(answer(request, 403, "Forbidden: wrong credentials"))
            if self._explain is not None:
                self._explain(user_id).addCallback(self._log_problem, user_id, conn.peer)
            return
        if failure.check(StoreError):
            self._store_unavailable(failure)
        else:
            log.failure("Cannot check credentials of {user}", failure, user=user_id)
        response = answer(request, 503, "Service Unavailable: user database")
        response.headers.add("Retry-After", str(STORE_RETRY_AFTER))
        conn.send(response)

    def _store_unavailable(self, failure: Failure) -> None:
        """Counted, and one warning per ``STORE_LOG_INTERVAL`` (not one per REGISTER)."""
        self._count("register_store_unavailable")
        self._store_failures += 1
        now = self._clock.seconds()
        if now - self._store_logged >= STORE_LOG_INTERVAL:
            log.warn("Answered {n} REGISTER(s) 503, the user database failed: {why}",
                     n=self._store_failures, why=failure.getErrorMessage())
            self._store_failures, self._store_logged = 0, now

    @staticmethod
    def _log_problem(problem: str | None, user_id: str, peer: tuple[str, int]) -> None:
        if problem is not None:
            log.warn("REGISTER {user} from {ip}:{port} refused (403): {problem}",
                     user=user_id, ip=peer[0], port=peer[1], problem=problem)

    def _authenticated(self, conn: SignalingConnection, request: Request, user_id: str) -> None:
        try:
            contact, expires = self._requested_binding(request)
        except RequestError as exc:
            refusal = answer(request, exc.code, exc.reason)
            if exc.code == 423:
                refusal.headers.add("Min-Expires", str(MIN_EXPIRES))
            conn.send(refusal)
            return
        response = answer(request, 200)
        set_vias(response, via_with_received(request, conn.peer))
        if expires == 0:
            self._registrar.unbind(user_id)
            if self._tokens is not None:
                self._tokens.revoke_user(user_id)
            response.headers.add("Expires", "0")
            conn.send(response)
            log.info("REGISTER {user} from {ip}:{port}: unregistered", user=user_id, ip=conn.peer[0], port=conn.peer[1])
            return
        if contact is None:  # a query: report what is bound
            binding = self._registrar.lookup(user_id)
            if binding is not None:
                remaining = max(0, int(binding.expires_at - self._clock.seconds()))
                response.headers.add("Contact", f"{binding.contact};expires={remaining}")
            conn.send(response)
            return
        binding = self._registrar.bind(user_id, conn, contact, expires)
        binding.port_mapping = port_mapping_of(request, conn.peer[0])
        if self._tokens is not None:
            self._tokens.registered_from(user_id, conn.peer[0])
        response.headers.add("Contact", f"{contact};expires={expires}")
        response.headers.add("Expires", str(expires))
        for name, value in self._extra_headers(user_id):
            response.headers.add(name, value)
        self._count("registrations")
        conn.send(response)
        log.info("REGISTER {user} from {ip}:{port}: registered for {expires} s", user=user_id,
                 ip=conn.peer[0], port=conn.peer[1], expires=expires)
        now = self._clock.seconds()
        self._seen.record_seen(user_id, conn.peer[0], conn.peer[1], now).addErrback(self._not_seen, user_id)

    def _not_seen(self, failure: Failure, user_id: str) -> None:
        """``record_seen`` failed: a user deleted meanwhile (``kerjostunt user del``) loses its binding."""
        if failure.check(UnknownUser):
            log.info("{user} was deleted while registering: binding and probe tokens dropped", user=user_id)
            self._registrar.unbind(user_id)
            if self._tokens is not None:
                self._tokens.revoke_user(user_id)
            return
        log.failure("Could not record {user} as seen", failure, user=user_id)

    def _requested_binding(self, request: Request) -> tuple[str | None, int]:
        """(contact URI or None for a query, expires seconds) from Contact/Expires."""
        contacts = request.headers.get_all("Contact")
        expires_header = request.headers.get("Expires")
        default = DEFAULT_EXPIRES
        if expires_header is not None:
            default = _seconds(expires_header)
        if not contacts:
            return None, default
        if contacts[0].strip() == "*":
            if default != 0 or len(contacts) > 1:
                raise RequestError(400, "Bad Request: '*' needs Expires: 0")
            return None, 0
        try:
            addr = parse_name_addr(contacts[0])
        except ValueError:
            raise RequestError(400, "Bad Request: unparsable Contact") from None
        expires = default
        if addr.params.get("expires") is not None:
            expires = _seconds(addr.params["expires"] or "")
        if 0 < expires < MIN_EXPIRES:
            raise RequestError(423, "Interval Too Brief")
        return f"<{addr.uri}>", min(expires, MAX_EXPIRES)


def _seconds(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise RequestError(400, "Bad Request: bad expires value") from None
    if value < 0 or value > 2**32 - 1:
        raise RequestError(400, "Bad Request: bad expires value")
    return value


def port_mapping_of(request: Request, public_ip: str) -> tuple[str, int] | None:
    """``X-Kerjo-Port-Mapping`` when it names the public address the server sees the user at (a
    mapping elsewhere, behind a second NAT, or anyone else's address is not passed on)."""
    value = (request.headers.get(kerjo.PORT_MAPPING) or "").strip()
    try:
        ip, port = kerjo.parse_endpoint(value)
    except ValueError:
        return None
    return (ip, port) if ip == public_ip else None
