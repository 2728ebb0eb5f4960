"""What instances say to each other over NOTIFY: the sender's ID, a space, one JSON object.

The sender comes first, outside the JSON, so that an instance skips its own
broadcasts without decoding them (``sender_of``). Several payloads share one
notification (``store/outbox.py``); a payload never holds a newline. Kinds
(``k``), each with a sequence number (``s``, so PostgreSQL never folds two
equal notifications into one):

``to``     deliver SIP message ``m`` down user ``u``'s connection (to the instance holding it)
``from``   user ``u`` sent SIP message ``m`` in a call the recipient runs; an INVITE's 2xx
           carries ``u``'s prediction (``p``) and its connection's RTT (``r``): the
           instance that has ``u``'s probes predicts for it
``lost``   user ``u``'s connection is gone (to the instances running its calls)
``bound``  broadcast: users bound here, ``b`` = [[user, ip, port, bound_at], ...]
``gone``   broadcast: users no longer bound here, ``u`` = [user, ...]
``ping``   to oneself, ``t`` = when sent: measures the bus's round trip

A SIP message travels as its parts, not its text: ``["Q", method, uri,
headers, body]`` or ``["R", code, reason, headers, body]``, headers as
``[[name, value], ...]`` in canonical form and the body as latin-1 text.
Both instances work on message objects (the sender made it or parsed it
from its peer), and rebuilding one from its parts costs a fifth of parsing
its text again; values with CR, LF or NUL are refused, as ``Headers.add``
refuses them.

A JSON object over ``COMPRESS_OVER`` characters is sent deflated and base64'd
behind a ``z:`` prefix (SIP text shrinks about threefold), which keeps an
INVITE with many candidates under NOTIFY's 8000 bytes.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from kerjostunt.wire.prediction import NATDescription, Prediction
from kerjostunt.wire.sip.message import Headers, Request, Response

COMPRESS_OVER = 3000
BROADCAST = "kerjostunt_cluster"


def channel_of(instance_id: str) -> str:
    """The channel an instance LISTENs on for messages to it alone."""
    return f"kerjostunt_{instance_id}"


class EnvelopeError(ValueError):
    """A notification we cannot read (logged and dropped)."""


@dataclass
class Envelope:
    kind: str
    sender: str
    seq: int = 0
    user: str = ""
    message: Request | Response | None = None
    users: list[str] = field(default_factory=list)
    bindings: list[tuple[str, str, int, float]] = field(default_factory=list)
    prediction: Prediction | None = None
    rtt: float | None = None
    sent_at: float | None = None


def encode(envelope: Envelope) -> str:
    data: dict[str, Any] = {"k": envelope.kind, "s": envelope.seq}
    if envelope.user:
        data["u"] = envelope.user
    if envelope.message is not None:
        data["m"] = _parts(envelope.message)
    if envelope.users:
        data["u"] = envelope.users
    if envelope.bindings:
        data["b"] = [list(b) for b in envelope.bindings]
    if envelope.prediction is not None:
        p = envelope.prediction
        data["p"] = {"ip": p.ip, "ports": list(p.ports), "c": p.confidence, "nat": p.nat.to_dict()}
    if envelope.rtt is not None:
        data["r"] = envelope.rtt
    if envelope.sent_at is not None:
        data["t"] = envelope.sent_at
    text = json.dumps(data, separators=(",", ":"))
    if len(text) > COMPRESS_OVER:
        text = "z:" + base64.b64encode(zlib.compress(text.encode(), 6)).decode()
    return f"{envelope.sender} {text}"


def sender_of(payload: str) -> str:
    """Who sent a payload, without decoding the rest ("" if it names nobody)."""
    sender, space, _ = payload.partition(" ")
    return sender if space else ""


def decode(payload: str) -> Envelope:
    try:
        sender, space, body = payload.partition(" ")
        if not space or not sender:
            raise ValueError("no sender")
        if body.startswith("z:"):
            body = zlib.decompress(base64.b64decode(body[2:])).decode()
        data = json.loads(body)
        users = data.get("u", "")
        envelope = Envelope(str(data["k"]), sender, int(data.get("s", 0)),
                            user=users if isinstance(users, str) else "",
                            message=_message(data["m"]) if "m" in data else None,
                            users=[str(u) for u in users] if isinstance(users, list) else [],
                            bindings=[(str(u), str(ip), int(port), float(at)) for u, ip, port, at in data.get("b", [])],
                            rtt=None if data.get("r") is None else float(data["r"]),
                            sent_at=None if data.get("t") is None else float(data["t"]))
        if "p" in data:
            p = data["p"]
            envelope.prediction = Prediction(str(p["ip"]), tuple(int(x) for x in p["ports"]), float(p["c"]),
                                             NATDescription.from_dict(p["nat"]))
        return envelope
    except (ValueError, KeyError, TypeError, IndexError, zlib.error) as exc:
        raise EnvelopeError(f"unreadable notification: {exc}") from None


def _parts(message: Request | Response) -> list[Any]:
    body = message.body.decode("latin-1")
    if isinstance(message, Request):
        return ["Q", message.method, message.uri, message.headers.raw_items(), body]
    return ["R", message.code, message.reason, message.headers.raw_items(), body]


def _message(parts: list[Any]) -> Request | Response:
    kind, first, second, fields, body = parts
    items = [(str(name), str(value)) for name, value in fields]
    if any("\r" in text or "\n" in text or "\x00" in text for item in items for text in item):
        raise ValueError("line break or NUL in a header")
    headers = Headers.trusted(items)  # canonical: the other instance's own Headers
    if kind == "Q":
        return Request(str(first), str(second), headers, str(body).encode("latin-1"))
    if kind == "R":
        return Response(int(first), str(second), headers, str(body).encode("latin-1"))
    raise ValueError(f"not a SIP message: {kind!r}")
