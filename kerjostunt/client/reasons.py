"""Why something failed, in the words a user can act on.

A failed connection to the server has four usual causes, and each wants a
different fix: nothing listens (refused), something listens but does not
speak TLS (silent), the certificate is not signed by ``--ca`` (untrusted),
or it is signed but made for another name (host-name mismatch). A refused
call has three: no such user (404), not online (480), no answer (408).
Twisted's exceptions name none of that plainly (``Failure`` reprs,
``CancelledError``), so the client turns them into one sentence here, and
every command prints that sentence (docs/client.rst, "Error messages").
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as net_error

__all__ = ["connect_failure", "tls_failure", "silent_server", "call_failure", "registration_failure", "plain"]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_failure(value: BaseException, host: str, port: int, timeout: float) -> str | None:
    """The TCP connection to the server failed: why; None if ``value`` is not a connect failure."""
    where = _address(host, port)
    if isinstance(value, net_error.ConnectionRefusedError):
        return f"{where} refused the connection: is the server running, and on this port?"
    if isinstance(value, net_error.DNSLookupError):
        return f"cannot resolve {host}: is the --server name right?"
    if isinstance(value, net_error.TimeoutError) or "timed out" in str(value).lower():
        return f"no answer from {where} within {timeout:g} s: is the server up, or does a firewall drop it?"
    if isinstance(value, (net_error.NoRouteError, net_error.ConnectError)):
        return f"cannot connect to {where}: {plain(value)}"
    return None


def silent_server(host: str, port: int, timeout: float) -> str:
    return (f"{_address(host, port)} accepted the connection but did not complete TLS within {timeout:g} s: "
            "is it a kerjostunt signaling port (--port of the server)?")


def tls_failure(value: Any, expected_name: str) -> str:
    """The TLS handshake failed: an untrusted CA, or a certificate made for another name."""
    if type(value).__name__ == "VerificationError":  # service_identity: the name did not match
        return (f"the server's certificate is not valid for {expected_name}: give the name it was made for "
                "with --tls-hostname, or add this one to the server's --cert-host")
    text = str(value)
    if "certificate verify failed" in text:
        return ("the server's certificate is not signed by the --ca certificate: give the server's own "
                "certs/ca.pem")
    return f"TLS handshake with the server failed: {plain(value)}"


def call_failure(code: int | None, peer: str, answer_timeout: float) -> str | None:
    """A call the server ended with ``code``: what it means for ``peer``; None for other codes."""
    if code == 404:
        return f"no user {peer} on this server"
    if code == 480:
        return f"{peer} is not online"
    if code == 408:
        return f"{peer} did not answer within {answer_timeout:.0f} s"
    if code == 403:
        return f"{peer} is not in any of your groups (403)"
    return None


def plain(value: Any) -> str:
    """One line for any exception or Failure: its message, never its repr."""
    inner = getattr(value, "value", value)  # a Failure's exception
    if isinstance(inner, net_error.ConnectionRefusedError):
        return "connection refused"
    wrapped = getattr(inner, "reasons", None)  # twisted.web's wrappers hold a list of Failures
    if isinstance(wrapped, list) and wrapped:
        return "; ".join(dict.fromkeys(plain(f) for f in wrapped))
    message = " ".join(str(inner).split())
    if not message or message.startswith("<"):
        return type(inner).__name__
    return message


def registration_failure(code: int, reason: str, user: str, retry_after: str | None = None) -> str:
    """The server answered our REGISTER with an error: what to do about it."""
    if code == 403 and "too many" in reason.lower():
        wait = f" (retry in {retry_after} s)" if retry_after else ""
        return f"the server refuses {user} for now: too many failed logins{wait}"
    if code == 403 and "wrong credentials" in reason.lower():
        return (f"the server refused {user}'s password (403): check --user and the password "
                "(an operator sets it with 'kerjostunt user passwd')")
    return f"REGISTER answered {code} {reason}"
