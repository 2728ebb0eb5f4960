"""Routes each signaling request to the code that knows its method.

Before it does, the checks RFC 3261 puts on every request a UAS takes
(8.2.2.1, 8.2.2.3) and the hop count of the ones the server passes on to
a peer (16.3 step 3, RFC 7332): answered here, once, so no handler can
forget them.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.logger import Logger

from kerjostunt.server.register import RegisterHandler, answer
from kerjostunt.server.registrar import Registrar, SignalingConnection
from kerjostunt.wire.sip.message import Request, Response

log = Logger()

CALL_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "INFO"})
ALLOWED = ("REGISTER", "OPTIONS", "INVITE", "ACK", "CANCEL", "BYE", "INFO")
# Methods SIP defines that this server deliberately does not serve: 405, not 501.
KNOWN_ELSEWHERE = frozenset({"SUBSCRIBE", "NOTIFY", "MESSAGE", "PUBLISH", "REFER", "UPDATE", "PRACK"})
#: option tags a Require may name (OPTIONS answers ``Supported: outbound``: CRLF keepalives)
SUPPORTED = frozenset({"outbound"})
#: requests the server passes on to the other peer: ``Max-Forwards: 0`` stops them (483)
FORWARDED = frozenset({"INVITE", "BYE", "INFO"})


class CallHandler(TypingProtocol):
    def handle_request(self, conn: SignalingConnection, request: Request) -> None: ...

    def handle_response(self, conn: SignalingConnection, response: Response) -> None: ...

    def connection_lost(self, conn: SignalingConnection) -> None: ...


class SignalingRouter:
    """REGISTER to the registration handler, call methods to the call manager."""

    def __init__(self, registrar: Registrar, register: RegisterHandler, calls: CallHandler | None = None) -> None:
        self.registrar = registrar
        self.register = register
        self.calls = calls

    def handle_request(self, conn: SignalingConnection, request: Request) -> None:
        method = request.method
        refusal = None if method == "ACK" else refuse(request)
        if refusal is not None:
            log.info("Refusing {method} from {peer}: {code} {reason}",
                     method=method, peer=conn.peer, code=refusal.code, reason=refusal.reason)
            conn.send(refusal)
        elif method == "REGISTER":
            self.register.handle(conn, request)
        elif method == "OPTIONS":
            conn.send(self._options(request))
        elif method in CALL_METHODS and self.calls is not None:
            self.calls.handle_request(conn, request)
        elif method == "ACK":
            return  # never answered
        elif method in KNOWN_ELSEWHERE or method in CALL_METHODS:
            response = answer(request, 405)
            response.headers.add("Allow", ", ".join(ALLOWED))
            conn.send(response)
        else:
            conn.send(answer(request, 501))

    def handle_response(self, conn: SignalingConnection, response: Response) -> None:
        if self.calls is not None:
            self.calls.handle_response(conn, response)
        else:
            log.debug("Dropping stray response {code} from {peer}", code=response.code, peer=conn.peer)

    def connection_lost(self, conn: SignalingConnection) -> None:
        self.registrar.connection_lost(conn)
        if self.calls is not None:
            self.calls.connection_lost(conn)

    @staticmethod
    def _options(request: Request) -> Response:
        response = answer(request, 200)
        response.headers.add("Allow", ", ".join(ALLOWED))
        response.headers.add("Accept", "application/sdp")
        response.headers.add("Supported", "outbound")
        return response


def refuse(request: Request) -> Response | None:
    """The answer a request gets before any handler sees it, or None.

    In RFC 3261 8.2's order: a Request-URI scheme other than SIP's (416),
    an extension it requires that we lack (420; not for CANCEL, which may
    not carry Require), a Max-Forwards that is not a number 0-255 (400)
    or is 0 on a request we would forward (483; REGISTER and OPTIONS end
    here, so their count does not matter, 16.3 step 2).
    """
    scheme = request.uri.partition(":")[0].lower()
    if scheme not in ("sip", "sips"):
        return answer(request, 416)
    if request.method != "CANCEL":
        unknown = [tag for tag in request.headers.get_all("Require") if tag and tag.lower() not in SUPPORTED]
        if unknown:
            response = answer(request, 420)
            response.headers.add("Unsupported", ", ".join(unknown))
            return response
    hops = request.headers.get("Max-Forwards")
    if hops is None:
        return None
    if not (hops.isdigit() and hops.isascii() and int(hops) <= 255):
        return answer(request, 400, "Bad Request: Max-Forwards is not a number 0-255")
    if int(hops) == 0 and request.method in FORWARDED:
        return answer(request, 483)
    return None
