"""Routes each signaling request to the code that knows its method."""

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
        if method == "REGISTER":
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
