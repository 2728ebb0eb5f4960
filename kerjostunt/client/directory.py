"""Fetch a group's trusted peers list from the server's HTTPS service.

Plain ``twisted.web.client.Agent``: the server certificate is verified
against the CA file given (the server's generated ``ca.pem`` or a real CA)
with service_identity, through ``kerjostunt.tls.client_options``. The
password never crosses the wire: the first request is answered 401 with
Digest challenges and the second carries a Digest answer (SHA-256
preferred); Basic is used only if the server offers nothing else. Every
failure comes out as a ``DirectoryError`` subclass with a message fit for a
user. This module imports no server code.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from kerjostunt import tls
from kerjostunt.client import reasons
from kerjostunt.wire.sip.digest import authorization, choose_challenge
from kerjostunt.wire.sip.headers import parse_auth

__all__ = [
    "CertificateNotTrusted",
    "DirectoryError",
    "NotAMember",
    "PeerEntry",
    "ServerUnavailable",
    "UnknownGroup",
    "WrongPassword",
    "fetch_peers",
    "fetch_peers_text",
    "peers_path",
]

MAX_BODY = 16 * 1024 * 1024  # a big group's list is a few MB at most
TIMEOUT = 30.0


class DirectoryError(Exception):
    """Fetching the peers list failed; ``str()`` is a one-line message."""


class WrongPassword(DirectoryError):
    pass


class NotAMember(DirectoryError):
    pass


class UnknownGroup(DirectoryError):
    pass


class CertificateNotTrusted(DirectoryError):
    pass


class ServerUnavailable(DirectoryError):
    pass


@dataclass(frozen=True)
class PeerEntry:
    """One member of the group as the server sees it."""

    user_id: str
    use_stunt: str  # unknown | direct | stunt | unreachable
    ip: str | None
    port: int | None
    nat: dict[str, Any] | None
    online: bool
    last_seen: float | None = None
    #: ``ip:port`` texts, the signaling address first, then the other IP family's (docs/web.rst)
    addresses: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> PeerEntry:
        return cls(
            user_id=str(item["user_id"]),
            use_stunt=str(item["use_stunt"]),
            ip=item.get("ip"),
            port=item.get("port"),
            nat=item.get("nat"),
            online=bool(item.get("online")),
            last_seen=item.get("last_seen"),
            addresses=tuple(str(a) for a in item.get("addresses") or ()),
        )


@implementer(IPolicyForHTTPS)
class CAFilePolicy:
    """Trust exactly the CA in one file, and check the host name in the URL."""

    def __init__(self, ca_path: Path | str) -> None:
        self._ca_path = Path(ca_path)
        if not self._ca_path.is_file():
            raise DirectoryError(f"CA file {self._ca_path} does not exist")
        try:
            tls.client_options(self._ca_path, "localhost")
        except Exception as e:
            raise DirectoryError(f"CA file {self._ca_path} is not a PEM certificate: {e}") from None

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator: IOpenSSLClientConnectionCreator = tls.client_options(self._ca_path, hostname.decode("ascii"))
        return creator


def peers_path(group: str, fmt: str = "json") -> str:
    """The request target (path and query) of a group's list."""
    path = f"/v1/groups/{quote(group, safe='')}/peers"
    return path if fmt == "json" else f"{path}?format={fmt}"


def fetch_peers(
    reactor: IReactorTime,
    base_url: str,
    group: str,
    user_id: str,
    password: str,
    ca_path: Path | str,
    *,
    timeout: float = TIMEOUT,
) -> defer.Deferred[list[PeerEntry]]:
    """The group's members, for a member of that group."""
    d = _fetch(reactor, base_url, peers_path(group), group, user_id, password, ca_path, timeout)
    return d.addCallback(_parse_json)


def fetch_peers_text(
    reactor: IReactorTime,
    base_url: str,
    group: str,
    user_id: str,
    password: str,
    ca_path: Path | str,
    *,
    timeout: float = TIMEOUT,
) -> defer.Deferred[str]:
    """The trusted peers file exactly as the server writes it (docs/web.rst)."""
    d = _fetch(reactor, base_url, peers_path(group, "text"), group, user_id, password, ca_path, timeout)
    return d.addCallback(lambda body: body.decode("utf-8"))


def _parse_json(body: bytes) -> list[PeerEntry]:
    try:
        document = json.loads(body)
        return [PeerEntry.from_json(item) for item in document["peers"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DirectoryError(f"the server sent an unusable peers list: {e}") from None


@defer.inlineCallbacks
def _fetch(
    reactor: IReactorTime,
    base_url: str,
    target: str,
    group: str,
    user_id: str,
    password: str,
    ca_path: Path | str,
    timeout: float,
) -> Generator[defer.Deferred[Any], Any, bytes]:
    base = base_url.rstrip("/")
    if urlsplit(base).scheme != "https":
        raise DirectoryError(f"the server URL must be https://, not {base_url!r}")
    # One persistent connection for both requests, closed before returning,
    # so nothing is left open behind the caller.
    # twisted.web.client is not annotated: its calls are untyped.
    pool = web_client.HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    agent = web_client.Agent(  # type: ignore[no-untyped-call]
        reactor, CAFilePolicy(ca_path), connectTimeout=timeout, pool=pool
    )
    url = (base + target).encode("ascii")
    try:
        response, body = yield _request(reactor, agent, url, None, timeout)
        if response.code == 401:
            header = _answer(response, user_id, password, target)
            response, body = yield _request(reactor, agent, url, header, timeout)
            if response.code == 401:
                raise WrongPassword(f"the server refused user {user_id!r}: wrong user ID or password")
    except DirectoryError:
        raise
    except Exception as e:
        raise _transport_error(Failure(e), base, timeout) from None
    finally:
        yield pool.closeCachedConnections()  # type: ignore[no-untyped-call]
    if response.code == 200:
        return bytes(body)
    raise _status_error(response.code, body, group, user_id)


def _answer(response: IResponse, user_id: str, password: str, target: str) -> bytes:
    """An Authorization value for the server's challenges."""
    values = [v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])]
    try:
        challenge = choose_challenge(values)
    except ValueError:
        schemes = set()
        for value in values:
            try:
                schemes.add(parse_auth(value)[0].lower())
            except ValueError:
                continue
        if "basic" not in schemes:
            raise DirectoryError("the server asked for an authentication scheme this client does not know") from None
        token = base64.b64encode(f"{user_id}:{password}".encode()).decode("ascii")
        return f"Basic {token}".encode("ascii")
    value = authorization(challenge, user_id, password, "GET", target, secrets.token_hex(8))
    return value.encode("utf-8")


@defer.inlineCallbacks
def _request(
    reactor: IReactorTime, agent: web_client.Agent, url: bytes, auth: bytes | None, timeout: float
) -> Generator[defer.Deferred[Any], Any, tuple[IResponse, bytes]]:
    headers = Headers({b"user-agent": [b"kerjostunt-client"]})
    if auth is not None:
        headers.addRawHeader(b"authorization", auth)
    d = agent.request(b"GET", url, headers)
    d.addTimeout(timeout, reactor)
    response = yield d
    body = yield _read_body(response).addTimeout(timeout, reactor)
    return response, body


class _BoundedBody(Protocol):
    def __init__(self, finished: defer.Deferred[bytes], limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            cast(IPushProducer, self.transport).stopProducing()  # the body's producer
            if not self._finished.called:
                self._finished.errback(DirectoryError("the server's answer is too large"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._finished.called:
            return
        if reason.check(web_client.ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


def _read_body(response: IResponse) -> defer.Deferred[bytes]:
    finished: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_BoundedBody(finished, MAX_BODY))  # type: ignore[no-untyped-call]  # unannotated in iweb
    return finished


def _server_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


def _status_error(code: int, body: bytes, group: str, user_id: str) -> DirectoryError:
    if code == 403:
        return NotAMember(f"user {user_id!r} is not a member of group {group!r}")
    if code == 404:
        return UnknownGroup(f"unknown group {group!r}")
    if code in (502, 503, 504):
        return ServerUnavailable(f"the server is unavailable ({code}): {_server_message(body)}")
    return DirectoryError(f"the server answered {code}: {_server_message(body)}")


#: the Agent's failures that carry the failures underneath in ``reasons``
_WRAPPERS = (
    web_client.ResponseFailed,
    web_client.RequestTransmissionFailed,
    web_client.RequestGenerationFailed,
    web_client.ResponseNeverReceived,
)


def _causes(failure: Failure) -> list[BaseException]:
    """The exceptions inside Agent's wrapped failures (``reasons``), innermost ones, in order."""
    value = failure.value
    if isinstance(value, _WRAPPERS) and value.reasons:
        return [cause for inner in value.reasons for cause in _causes(inner)]
    return [value] if value is not None else []


def _transport_error(failure: Failure, base: str, timeout: float = 30.0) -> DirectoryError:
    """One sentence for a failed request: the cause inside Agent's wrappers, never a Failure repr."""
    parts = urlsplit(base)
    host, port = parts.hostname or base, parts.port or 443
    causes = _causes(failure)
    for cause in causes:
        if isinstance(cause, SSL.Error) or type(cause).__name__ == "VerificationError":
            return CertificateNotTrusted(reasons.tls_failure(cause, host))
    for cause in causes:
        why = reasons.connect_failure(cause, host, port, timeout)
        if why is not None:
            return ServerUnavailable(why)
    if any(isinstance(c, (defer.TimeoutError, defer.CancelledError, net_error.TimeoutError)) for c in causes):
        return ServerUnavailable(f"{base} did not answer within {timeout:g} s")
    detail = "; ".join(dict.fromkeys(reasons.plain(c) for c in causes)) or "no answer"
    return DirectoryError(f"request to {base} failed: {detail}")


