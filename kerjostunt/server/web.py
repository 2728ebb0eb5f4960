"""The HTTPS service: the trusted peers list, ``/status``, ``/metrics`` and ``/health``.

One leaf resource dispatches on the path, so every answer (errors
included) is a small JSON or text body we chose, never a Twisted error page
or a traceback. The database is reached only through the ``Store``
Deferreds; a store failure or a store that does not answer in time is a
503. Users authenticate with the same credentials as for REGISTER, through
twisted.cred: HTTP Digest (RFC 7616, SHA-256 and MD5, checked against the
stored HA1 exactly as REGISTER is) or Basic, which TLS makes acceptable and
which is checked by computing the HA1 of the given password. Which
connections live (parsing limits, timeouts, counts, bounded output) is
``webchannel.py``'s business. Docs: docs/web.rst.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from twisted.cred import error as cred_error
from twisted.cred import portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import Interface, implementer

from kerjostunt import tls
from kerjostunt.server import metrics as metrics_module
from kerjostunt.server import statuspage
from kerjostunt.server.auth import AuthGuard, NonceManager, SIPDigestCredentials, StoreDigestChecker, challenge_params
from kerjostunt.server.deadline import StoreTimeout, within
from kerjostunt.server.limits import WebLimits
from kerjostunt.server.registrar import Registrar
from kerjostunt.server.signaling import AdmittingTLSFactory
from kerjostunt.server.status import Peer, StatusStore, summarise
from kerjostunt.server.throttle import GuessThrottle
from kerjostunt.server.webchannel import (
    IDLE_TIMEOUT,
    MAX_BODY,
    MAX_CONNECTIONS_PER_IP,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    LimitedChannel,
    WebSite,
)
from kerjostunt.store import (
    NAME_RE,
    PairOutcome,
    StoreBusy,
    StoreError,
    StoreReadOnly,
    UnknownGroup,
    UserRecord,
    pair_flag,
)
from kerjostunt.store.api import Store
from kerjostunt.tcp import host_port
from kerjostunt.wire.sip.digest import ALGORITHMS, ha1
from kerjostunt.wire.sip.headers import format_auth, parse_auth

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kerjostunt.server.service import StuntServer

log = Logger()
_P = ParamSpec("_P")
_T = TypeVar("_T")

STORE_TIMEOUT = 10.0  # a store call slower than this is answered 503
HEALTH_TIMEOUT = 0.8  # /health's read; with the rest it answers within 1 s

JSON = b"application/json; charset=utf-8"
TEXT = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"
#: the calls /status sums up: the last hour
STATUS_WINDOW = 3600.0
#: /status loads nothing and runs nothing: inline CSS and SVG only
STATUS_CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:"


# -- authentication through twisted.cred ----------------------------------


class IWebUser(Interface):
    """An authenticated user of the web service."""


@implementer(IWebUser)
@dataclass(frozen=True)
class WebUser:
    user_id: str


@implementer(portal.IRealm)
class WebRealm:
    """Avatars are user IDs: what a user may see is decided per request (group membership)."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, WebUser, Callable[[], None]]:
        if IWebUser not in interfaces:
            raise NotImplementedError("only IWebUser avatars")
        return IWebUser, WebUser(avatarId), lambda: None


@implementer(ICredentialsChecker)
class StoreHA1PasswordChecker:
    """Basic auth: H(user:realm:password) of the given password against the stored HA1.

    The store keeps no passwords, only HA1 values, so this is the only way
    to check one; SHA-256 is preferred, MD5 is used for users imported with
    an MD5 HA1 only.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, get_ha1: Callable[[str, str], defer.Deferred[str | None]], realm: str) -> None:
        self._get_ha1 = get_ha1
        self._realm = realm

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials: IUsernamePassword) -> Generator[defer.Deferred[Any], Any, Any]:
        # Any: ICredentialsChecker declares bytes avatar IDs; ours are str user IDs.
        user_id = _text(credentials.username)
        password = _text(credentials.password)
        for algorithm in ALGORITHMS:
            stored: str | None = yield self._get_ha1(user_id, algorithm)
            if stored:
                mine = ha1(user_id, self._realm, password, algorithm)
                if hmac.compare_digest(mine.encode(), stored.encode()):
                    return user_id
                break
        raise cred_error.UnauthorizedLogin("bad credentials")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def make_web_portal(get_ha1: Callable[[str, str], defer.Deferred[str | None]], realm: str) -> portal.Portal:
    """Digest and Basic checkers over ``get_ha1`` (``AsyncStore.get_ha1`` with a time limit)."""
    return portal.Portal(WebRealm(), [StoreDigestChecker(get_ha1), StoreHA1PasswordChecker(get_ha1, realm)])


class BadRequest(Exception):
    """The request is malformed in a way worth a 400 and a message."""


class Unauthorized(Exception):
    """No usable credentials: answer 401 with fresh challenges."""

    def __init__(self, reason: str, stale: bool = False) -> None:
        super().__init__(reason)
        self.stale = stale


def parse_credentials(request: server.Request, realm: str, nonces: NonceManager, source: str = "") -> ICredentials:
    """The request's Authorization header as twisted.cred credentials.

    Raises ``Unauthorized`` when there is nothing usable, ``BadRequest`` for
    a Digest answer about another URI (RFC 7616 3.4.6).
    """
    header = request.getHeader(b"authorization")
    if header is None:
        raise Unauthorized("no credentials")
    try:
        text = header.decode("ascii") if isinstance(header, bytes) else header
        scheme, _, rest = text.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
            username, colon, password = decoded.partition(":")
            if not colon or not username:
                raise ValueError("no user:password")
            return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        if scheme == "digest":
            _, params = parse_auth(text)
            creds = SIPDigestCredentials.from_params(request.method.decode("ascii"), params)
        else:
            raise Unauthorized(f"unsupported scheme {scheme!r}")
    except (ValueError, UnicodeError, binascii.Error) as e:
        raise Unauthorized(f"unusable credentials: {e}") from None
    if creds.realm != realm:
        raise Unauthorized("wrong realm")
    if creds.uri != request.uri.decode("ascii", "replace"):
        raise BadRequest("digest uri does not match the request")
    verdict = nonces.check(creds.nonce, source)
    if verdict != "ok":
        raise Unauthorized(f"{verdict} nonce", stale=verdict == "stale")
    return creds


#: the web's Digest challenges, in the order offered (``challenges``)
WEB_ALGORITHMS = ("MD5", "SHA-256")


def challenges(realm: str, nonces: NonceManager, stale: bool = False, source: str = "") -> list[str]:
    """WWW-Authenticate values: Digest MD5, Digest SHA-256 (one nonce), then Basic.

    MD5 first, against RFC 7616's order of preference: Python's urllib
    answers only the first challenge and cannot compute SHA-256, and curl
    takes the first Digest header; browsers, requests and our client pick
    SHA-256. One nonce for both, because requests folds the headers into
    one and takes the last value of each field.
    """
    nonce = nonces.issue(source)
    values = [format_auth("Digest", challenge_params(realm, nonce, a, stale)) for a in WEB_ALGORITHMS]
    values.append(format_auth("Basic", {"realm": realm, "charset": "UTF-8"}))
    return values


# -- the resource ----------------------------------------------------------


@dataclass
class Reply:
    code: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_reply(code: int, document: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return Reply(code, json.dumps(document, indent=1, sort_keys=False).encode("utf-8") + b"\n", JSON, headers)


def error_reply(code: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return json_reply(code, {"error": message}, headers)


def peer_document(record: UserRecord, registrar: Registrar, pair: PairOutcome | None = None,
                  asker: str | None = None) -> dict[str, Any]:
    """One list entry. A peer online now is shown at the address of its live
    signaling connection; otherwise at the last public address stored.

    ``use_stunt`` is the flag as the asking member's pair with the peer
    shows it (``store.pair_flag``); ``pair`` is that pair's record:
    ``{"latest": outcome, "failures": failed calls since its last
    success}``, or None when they never called (issue 12).
    """
    binding = registrar.lookup(record.user_id)
    ip, port = record.public_ip, record.public_port
    addresses = [format_address(ip, port)] if ip and port is not None else []
    if binding is not None:
        ip, port = binding.public_address
        addresses = [format_address(*a) for a in binding.addresses]
    own = record.user_id == asker
    return {
        "user_id": record.user_id,
        "use_stunt": record.stunt_state if own else pair_flag(record.stunt_state, pair),
        "pair": None if pair is None else {"latest": pair.latest, "failures": pair.failures},
        "ip": ip,
        "port": port,
        "addresses": addresses,
        "nat": record.nat,
        "online": binding is not None,
        "last_seen": record.last_seen,
    }


def format_address(ip: str | None, port: int | None) -> str:
    if not ip or port is None:
        return "-"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def peers_text(group: str, peers: list[dict[str, Any]]) -> str:
    """The trusted peers file: a comment line, then ``USER_ID IP:PORT FLAG [IP:PORT]`` lines.

    The fourth field, the other IP family's address when a probe over it
    showed one, comes after the flag: readers ignore fields after the third
    (docs/web.rst), so older ones keep working.
    """
    lines = [f"# kerjostunt trusted peers of group {group}: user_id ip:port use_stunt [other-family ip:port]"]
    lines += [" ".join([p["user_id"], format_address(p["ip"], p["port"]), p["use_stunt"], *p["addresses"][1:]])
              for p in peers]
    return "\n".join(lines) + "\n"


class WebResource(resource.Resource):
    """Everything under ``/``: dispatch on the path, answer asynchronously."""

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def __init__(
        self,
        *,
        store: Store,
        registrar: Registrar,
        metrics: CollectorRegistry,
        domain: str,
        clock: IReactorTime,
        count: Callable[[str], None] | None = None,
        throttle: GuessThrottle | None = None,
        status: StatusStore | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.store = store
        #: the /status page's store calls (None: no /status)
        self.status_store = status
        self.registrar = registrar
        self.metrics = metrics
        self.realm = domain
        self.clock = clock
        self.nonces = NonceManager(clock)
        self.portal = make_web_portal(lambda user_id, algorithm: self._store(store.get_ha1, user_id, algorithm), domain)
        self._count = count or (lambda what: None)
        self.guard = AuthGuard(self.portal, throttle or GuessThrottle(clock, count=self._count), "web")

    def render(self, request: server.Request) -> int:
        if request.method not in self.allowedMethods:
            reply = error_reply(405, "only GET and HEAD", ((b"allow", b"GET, HEAD"),))
            self._send(reply, request, [])
            return server.NOT_DONE_YET
        return self.render_GET(request)

    def render_GET(self, request: server.Request) -> int:
        self._count("web_requests")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.maybeDeferred(self.dispatch, request)
        d.addErrback(self._failed, request)
        d.addCallback(self._send, request, gone)
        d.addErrback(lambda f: log.failure("web: could not answer {uri}", f, uri=request.uri))
        return server.NOT_DONE_YET

    def dispatch(self, request: server.Request) -> defer.Deferred[Reply]:
        segments = list(request.postpath or ())
        if segments and segments[-1] == b"":
            segments.pop()  # a trailing slash
        if segments == [b"health"]:
            return self.health()
        if segments == [b"status"] and self.status_store is not None:
            return self.status(request, self.status_store)
        if segments == [b"metrics"]:
            return defer.succeed(Reply(200, metrics_module.render(self.metrics), metrics_module.CONTENT_TYPE.encode()))
        if len(segments) == 4 and segments[:2] == [b"v1", b"groups"] and segments[3] == b"peers":
            return self.peers(request, segments[2].decode("utf-8", "replace"))
        return defer.succeed(error_reply(404, "no such resource"))

    # -- /health

    @defer.inlineCallbacks
    def health(self) -> Generator[defer.Deferred[Any], Any, Reply]:
        """``ok``, or ``degraded`` with a reason: 200 while only writes fail (REGISTERs
        still work, records wait), 503 when the database does not answer a read
        within ``HEALTH_TIMEOUT`` (so /health itself answers within a second)."""
        document: dict[str, Any] = {"status": "ok", "registered": len(self.registrar), "store": "ok"}
        state = self.store.health()
        document["waiting_records"] = state.waiting
        try:
            # The cheapest real query there is: proves the pool and the database answer.
            yield within(self.clock, HEALTH_TIMEOUT, defer.maybeDeferred(self.store.get_ha1, "-health-", "MD5"))
        except Exception as e:
            why = _describe(e)
            document.update(status="degraded", store=why, reason=f"the database does not answer: {why}")
            return json_reply(503, document, ((b"retry-after", b"10"),))
        if not state.writing:
            document.update(status="degraded", store="writes failing",
                            reason=f"writes failing for {state.failing_for:.0f} s: {state.reason}")
            return json_reply(200, document)
        try:
            # A no-op write: a database that became read-only answers reads but loses every
            # seen, NAT and call outcome (issue 14).
            yield within(self.clock, HEALTH_TIMEOUT,
                         defer.maybeDeferred(self.store.claim_realm, self.realm, self.realm))
        except (StoreTimeout, StoreBusy) as e:
            if isinstance(e, StoreReadOnly):
                return self._writes_refused(document, e)
            # A lock held elsewhere: writes are held back (and retried), as above, not refused.
            document.update(status="degraded", store="writes failing", reason=f"writes wait: {_describe(e)}")
        except Exception as e:
            return self._writes_refused(document, e)
        return json_reply(200, document)

    @staticmethod
    def _writes_refused(document: dict[str, Any], error: BaseException) -> Reply:
        """503: the database refuses writes (read-only, or an error no retry mends)."""
        why = _describe(error)
        document.update(status="degraded", store=f"writes fail: {why}", reason=f"writes fail: {why}")
        return json_reply(503, document, ((b"retry-after", b"10"),))

    # -- /v1/groups/GROUP/peers

    @defer.inlineCallbacks
    def authenticate(self, request: server.Request) -> Generator[defer.Deferred[Any], Any, WebUser | Reply]:
        """The request's user, or the 401/400 to answer with."""
        source = host_port(request.getClientAddress())[0]  # type: ignore[no-untyped-call]  # twisted.web
        try:
            credentials = parse_credentials(request, self.realm, self.nonces, source)
            _, user, _ = yield self.guard.login(credentials, source, IWebUser)
        except (Unauthorized, cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials) as e:
            self._count("web_auth_failures")
            stale = isinstance(e, Unauthorized) and e.stale
            # Debug only: wrong passwords are logged by the throttle, one line per source per interval.
            log.debug("web: 401 for {uri} ({why})", uri=request.uri, why=str(e))
            values = challenges(self.realm, self.nonces, stale, source)
            headers = tuple((b"www-authenticate", v.encode()) for v in values)
            return error_reply(401, "authentication required", headers)
        except BadRequest as e:
            return error_reply(400, str(e))
        assert isinstance(user, WebUser)
        return user

    @defer.inlineCallbacks
    def peers(self, request: server.Request, group: str) -> Generator[defer.Deferred[Any], Any, Reply]:
        fmt = request.args.get(b"format", [b"json"])[-1]
        if fmt not in (b"json", b"text"):
            return error_reply(400, "format must be json or text")
        user = yield self.authenticate(request)
        if isinstance(user, Reply):
            return user
        if not NAME_RE.match(group):
            return error_reply(404, f"unknown group {group!r}")
        try:
            member = yield self._store(self.store.is_member, group, user.user_id)
            if not member:
                return error_reply(403, f"{user.user_id} is not a member of group {group}")
            records = yield self._store(self.store.group_members, group)
        except UnknownGroup:
            return error_reply(404, f"unknown group {group!r}")
        # The pair's record as far back as its last 500 calls go: a failure stays until a call succeeds.
        pairs = yield self._store(self.store.pair_outcomes, user.user_id, 0.0)
        documents = [peer_document(r, self.registrar, pairs.get(r.user_id), user.user_id) for r in records]
        if fmt == b"text":
            return Reply(200, peers_text(group, documents).encode("utf-8"), TEXT)
        return json_reply(200, {"group": group, "peers": documents})

    # -- /status (operators)

    @defer.inlineCallbacks
    def status(self, request: server.Request, store: StatusStore) -> Generator[defer.Deferred[Any], Any, Reply]:
        """The operators' page (docs/web.rst): who is registered, the last hour of calls, drawn."""
        user = yield self.authenticate(request)
        if isinstance(user, Reply):
            return user
        allowed = yield self._store(store.is_operator, user.user_id)
        if not allowed:
            return error_reply(403, f"{user.user_id} is not an operator (kerjostunt operator add {user.user_id})")
        now = self.clock.seconds()
        attempts = yield self._store(store.attempts_since, now - STATUS_WINDOW)
        peers = [Peer(b.user_id, format_address(*b.public_address), b.registered_at) for b in self.registrar]
        page = statuspage.render(summarise(attempts, peers, now, STATUS_WINDOW), self.realm)
        return Reply(200, page, HTML, ((b"content-security-policy", STATUS_CSP),))

    # -- plumbing

    def _store(
        self, method: Callable[_P, defer.Deferred[_T]], *args: _P.args, **kwargs: _P.kwargs
    ) -> defer.Deferred[_T]:
        """A store call whose answer fails with ``StoreTimeout`` after STORE_TIMEOUT (``deadline.within``)."""
        return within(self.clock, STORE_TIMEOUT, defer.maybeDeferred(method, *args, **kwargs))

    def _failed(self, failure: Failure, request: server.Request) -> Reply:
        if failure.check(StoreError):
            log.warn("web: store unavailable for {uri}: {why}", uri=request.uri, why=_describe(failure.value))
            return error_reply(503, "the user database is unavailable, try again later", ((b"retry-after", b"10"),))
        log.failure("web: error handling {uri}", failure, uri=request.uri)
        self._count("internal_errors")
        return error_reply(500, "internal error")

    def _send(self, reply: Reply, request: server.Request, gone: list[bool]) -> None:
        if gone:
            return  # the client left; there is nobody to answer
        request.setResponseCode(reply.code)
        headers = request.responseHeaders  # what Request.setHeader sets, typed
        headers.setRawHeaders(b"content-type", [reply.content_type])
        headers.setRawHeaders(b"cache-control", [b"no-store"])
        headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])
        for name, value in reply.headers:
            headers.addRawHeader(name, value)
        headers.setRawHeaders(b"content-length", [str(len(reply.body)).encode()])
        request.write(reply.body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]


def _describe(error: BaseException | None) -> str:
    return str(error) or type(error).__name__


def make_site(
    *,
    store: Store,
    registrar: Registrar,
    metrics: CollectorRegistry,
    domain: str,
    clock: IReactorTime,
    count: Callable[[str], None] | None = None,
    limits: WebLimits = WebLimits(),
    throttle: GuessThrottle | None = None,
    status: StatusStore | None = None,
) -> WebSite:
    """The plain-HTTP site; ``tls_factory`` puts TLS around it."""
    root = WebResource(store=store, registrar=registrar, metrics=metrics, domain=domain, clock=clock, count=count,
                       throttle=throttle, status=status)
    return WebSite(root, clock, limits.max_per_ip, limits=limits, count=count)


def registry_for(server: StuntServer) -> CollectorRegistry:
    return metrics_module.make_registry(
        server.counters,
        registered=lambda: len(server.registrar),
        connections=lambda: len(server.signaling.connections),
        store_waiting=lambda: server.store.health().waiting,
    )


def tls_factory(server: StuntServer) -> AdmittingTLSFactory:
    """What ``StuntServer`` listens with on ``web_endpoint``: TLS with the signaling certificate."""
    site = make_site(
        store=server.store,
        registrar=server.registrar,
        metrics=registry_for(server),
        domain=server.settings.domain,
        clock=server.reactor,
        count=server.count,
        limits=server.settings.web_limits,
        throttle=server.register.throttle,  # one throttle: SIP and web failures add up
        status=server.store,
    )
    return AdmittingTLSFactory(tls.server_options(server.certificates), False, site)


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_BODY",
    "MAX_CONNECTIONS_PER_IP",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_LINE",
    "LimitedChannel",
    "WebResource",
    "WebSite",
    "challenges",
    "make_site",
    "parse_credentials",
    "peers_text",
    "registry_for",
    "tls_factory",
]
