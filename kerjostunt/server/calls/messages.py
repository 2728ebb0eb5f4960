"""The B2BUA's messages: what the server writes in the caller's and the callee's dialog.

The server answers the caller's INVITE in the caller's dialog (its Call-ID,
our ``to_tag``) and starts a second dialog with the callee (our own Call-ID,
``server_tag`` and INVITE branch), so the callee never learns the caller's
Call-ID and two calls never share an identifier. Each function here builds
one message from the identifiers of both dialogs (``DialogIds``, which a
``Call`` has); what a dialog learns later (the callee's tag, the CSeq
numbers) is passed in. Nothing here sends or keeps anything.
"""

from __future__ import annotations

from typing import Protocol

from kerjostunt.wire import kerjo
from kerjostunt.wire.prediction import Prediction
from kerjostunt.wire.sip.headers import parse_name_addr, parse_via
from kerjostunt.wire.sip.message import Headers, Request, Response, make_response

#: headers of a callee's error response that the caller gets too
PASSED_ON = ("Retry-After", "Warning")


def peer_headers(secret: str, role: kerjo.Role, prediction: Prediction, public_ip: str) -> list[tuple[str, str]]:
    """What one side learns about the other: the call's secret, its role, the other's NAT and address."""
    return [
        (kerjo.CALL_SECRET, secret),
        (kerjo.ROLE, role.value),
        (kerjo.NAT, kerjo.format_nat(prediction.nat, prediction.confidence)),
        (kerjo.PEER_PUBLIC, public_ip),
    ]


def tag_of(value: str | None) -> str | None:
    """The tag of a From/To value; None when absent or unparsable."""
    if not value:
        return None
    try:
        return parse_name_addr(value).tag
    except ValueError:
        return None


def top_branch(message: Request | Response) -> str | None:
    """The branch of the topmost Via: which of our transactions a response answers."""
    vias = message.headers.get_all("Via")
    if not vias:
        return None
    try:
        return parse_via(vias[0]).branch
    except ValueError:
        return None


class DialogIds(Protocol):
    """The identifiers of one call's two dialogs (a ``Call`` has them)."""

    @property
    def domain(self) -> str: ...
    @property
    def caller_id(self) -> str: ...
    @property
    def callee_id(self) -> str: ...
    #: the caller's dialog: its Call-ID and From (our To is the caller's From)
    @property
    def caller_call_id(self) -> str: ...
    @property
    def caller_from(self) -> str | None: ...
    #: our tag in the caller's dialog
    @property
    def to_tag(self) -> str: ...
    #: the callee's dialog is ours: its Call-ID, our From tag, the INVITE's branch
    @property
    def server_call_id(self) -> str: ...
    @property
    def server_tag(self) -> str: ...
    @property
    def invite_branch(self) -> str: ...


def uri(domain: str, user_id: str) -> str:
    return f"sips:{user_id}@{domain}"


def _contact(domain: str) -> str:
    return f"<sips:{domain};transport=tls>"


def _callee_headers(ids: DialogIds, branch: str, cseq: str, callee_tag: str | None) -> Headers:
    headers = Headers()
    headers.add("Via", f"SIP/2.0/TLS {ids.domain};branch={branch}")
    headers.add("Max-Forwards", "70")
    headers.add("From", f"<{uri(ids.domain, ids.caller_id)}>;tag={ids.server_tag}")
    headers.add("To", f"<{uri(ids.domain, ids.callee_id)}>" + (f";tag={callee_tag}" if callee_tag else ""))
    headers.add("Call-ID", ids.server_call_id)
    headers.add("CSeq", cseq)
    return headers


# -- the callee's dialog -------------------------------------------------------------


def forwarded_invite(ids: DialogIds, peer: list[tuple[str, str]], sdp: bytes) -> Request:
    """The INVITE to the callee: the caller's augmented SDP and what the callee learns of the caller."""
    headers = _callee_headers(ids, ids.invite_branch, "1 INVITE", None)
    headers.add("Contact", _contact(ids.domain))
    headers.add("Content-Type", "application/sdp")
    for name, value in peer:
        headers.add(name, value)
    return Request("INVITE", uri(ids.domain, ids.callee_id), headers, sdp)


def to_callee(ids: DialogIds, method: str, cseq: int, callee_tag: str | None, dial_in: int | None = None) -> Request:
    """ACK or BYE in the callee's dialog; the ACK of an answer carries the callee's dial moment."""
    headers = _callee_headers(ids, kerjo.new_branch(), f"{cseq} {method}", callee_tag)
    if dial_in is not None:
        headers.add(kerjo.DIAL_IN, kerjo.format_dial_in(dial_in))
    return Request(method, uri(ids.domain, ids.callee_id), headers)


def cancel(ids: DialogIds, forwarded: Request) -> Request:
    """CANCEL of the forwarded INVITE: its branch, From, To and Call-ID (RFC 3261 9.1)."""
    headers = Headers()
    headers.add("Via", f"SIP/2.0/TLS {ids.domain};branch={ids.invite_branch}")
    headers.add("Max-Forwards", "70")
    for name in ("From", "To", "Call-ID"):
        headers.add(name, forwarded.headers.get(name) or "")
    headers.add("CSeq", "1 CANCEL")
    return Request("CANCEL", forwarded.uri, headers)


# -- the caller's dialog -------------------------------------------------------------


def to_caller(ids: DialogIds, method: str, cseq: int) -> Request:
    """A BYE in the caller's dialog, from the callee's address with our tag."""
    headers = Headers()
    headers.add("Via", f"SIP/2.0/TLS {ids.domain};branch={kerjo.new_branch()}")
    headers.add("Max-Forwards", "70")
    headers.add("From", f"<{uri(ids.domain, ids.callee_id)}>;tag={ids.to_tag}")
    headers.add("To", ids.caller_from or f"<{uri(ids.domain, ids.caller_id)}>")
    headers.add("Call-ID", ids.caller_call_id)
    headers.add("CSeq", f"{cseq} {method}")
    return Request(method, uri(ids.domain, ids.caller_id), headers)


def answer(ids: DialogIds, invite: Request, code: int, reason: str | None = None,
           retry_after: int | None = None) -> Response:
    """A response to the caller's INVITE, in the caller's dialog."""
    response = make_response(invite, code, reason, to_tag=ids.to_tag)
    if retry_after is not None:
        response.headers.add("Retry-After", str(retry_after))
    return response


def passed_rejection(ids: DialogIds, invite: Request, rejection: Response) -> Response:
    """The callee's error response as the caller gets it: code, reason and the headers that advise."""
    passed = make_response(invite, rejection.code, rejection.reason, to_tag=ids.to_tag)
    for name in PASSED_ON:
        value = rejection.headers.get(name)
        if value is not None:
            passed.headers.add(name, value)
    return passed


def ok(ids: DialogIds, invite: Request, peer: list[tuple[str, str]], dial_in: int, sdp: bytes) -> Response:
    """The 200 to the caller: the callee's augmented SDP, what the caller learns, its dial moment."""
    response = make_response(invite, 200, to_tag=ids.to_tag)
    response.headers.add("Contact", _contact(ids.domain))
    response.headers.add("Content-Type", "application/sdp")
    for name, value in peer:
        response.headers.add(name, value)
    response.headers.add(kerjo.DIAL_IN, kerjo.format_dial_in(dial_in))
    response.body = sdp
    return response
