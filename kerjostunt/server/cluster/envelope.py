"""What instances say to each other over NOTIFY: one JSON object per notification.

Kinds (``k``), each with the sender's instance ID (``f``) and a sequence
number (``s``, so PostgreSQL never folds two equal notifications into one):

``to``     deliver SIP message ``m`` down user ``u``'s connection (to the instance holding it)
``from``   user ``u`` sent SIP message ``m`` in a call the recipient runs; an INVITE's 2xx
           carries ``u``'s prediction (``p``) and its connection's RTT (``r``): the
           instance that has ``u``'s probes predicts for it
``lost``   user ``u``'s connection is gone (to the instances running its calls)
``bound``  broadcast: users bound here, ``b`` = [[user, ip, port, bound_at], ...]
``gone``   broadcast: users no longer bound here, ``u`` = [user, ...]
``ping``   to oneself, ``t`` = when sent: measures the bus's round trip

A payload over ``COMPRESS_OVER`` characters is sent deflated and base64'd
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
    message: str = ""
    users: list[str] = field(default_factory=list)
    bindings: list[tuple[str, str, int, float]] = field(default_factory=list)
    prediction: Prediction | None = None
    rtt: float | None = None
    sent_at: float | None = None


def encode(envelope: Envelope) -> str:
    data: dict[str, Any] = {"k": envelope.kind, "f": envelope.sender, "s": envelope.seq}
    if envelope.user:
        data["u"] = envelope.user
    if envelope.message:
        data["m"] = envelope.message
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
    return text


def decode(payload: str) -> Envelope:
    try:
        if payload.startswith("z:"):
            payload = zlib.decompress(base64.b64decode(payload[2:])).decode()
        data = json.loads(payload)
        users = data.get("u", "")
        envelope = Envelope(str(data["k"]), str(data["f"]), int(data.get("s", 0)),
                            user=users if isinstance(users, str) else "",
                            message=str(data.get("m", "")),
                            users=[str(u) for u in users] if isinstance(users, list) else [],
                            bindings=[(str(u), str(ip), int(port), float(at)) for u, ip, port, at in data.get("b", [])],
                            rtt=None if data.get("r") is None else float(data["r"]),
                            sent_at=None if data.get("t") is None else float(data["t"]))
        if "p" in data:
            p = data["p"]
            envelope.prediction = Prediction(str(p["ip"]), tuple(int(x) for x in p["ports"]), float(p["c"]),
                                             NATDescription.from_dict(p["nat"]))
        return envelope
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise EnvelopeError(f"unreadable notification: {exc}") from None
