"""
One call, both directions: "connect me to user X" and "user Y wants us".

The flows follow docs/protocol.rst ("Calls"):

- outgoing (``outgoing.py``): bind a fresh reusable punch port, probe from
  it, INVITE with our SDP, wait for the 200 OK, ACK, then dial at
  ``X-Kerjo-Dial-In``;
- incoming (``incoming.py``): on the server's INVITE bind a punch port,
  probe, answer 200 OK with our SDP, and dial when the server's ACK says so.

Dialing (``race.py``, the ``Dialer``) runs every technique at once -- the
peer's host candidates on a shared LAN, its passive candidates, the punch,
the birthday search -- and the first connection that passes the per-call
handshake wins.  Each side then reports the outcome in an INFO.

``setup.py`` reads what the server told us and writes our offer;
``appport.py`` names a call on the shared application port; ``base.py``
holds what both directions share.  The modules import one way only:
setup -> appport -> race -> base -> outgoing, incoming.
"""

from kerjostunt.client.calls.appport import (
    PREAMBLE,
    PREAMBLE_MAX,
    AppPortFactory,
    AppPortProtocol,
    CallHandshakeFactory,
    call_tag,
)
from kerjostunt.client.calls.base import CallAgent, CallBase
from kerjostunt.client.calls.incoming import ACK_TIMEOUT, IncomingCall
from kerjostunt.client.calls.outgoing import OutgoingCall
from kerjostunt.client.calls.race import RETRY_JITTER, Dialer, DialerConfig, DialResult
from kerjostunt.client.calls.setup import (
    CallSetup,
    ConnectFailed,
    PeerConnection,
    build_offer,
    dial_in_seconds,
    outcome_body,
    read_setup,
    tag_of,
    user_of,
)

__all__ = [
    "ACK_TIMEOUT",
    "PREAMBLE",
    "PREAMBLE_MAX",
    "RETRY_JITTER",
    "AppPortFactory",
    "AppPortProtocol",
    "CallAgent",
    "CallBase",
    "CallHandshakeFactory",
    "CallSetup",
    "ConnectFailed",
    "DialResult",
    "Dialer",
    "DialerConfig",
    "IncomingCall",
    "OutgoingCall",
    "PeerConnection",
    "build_offer",
    "call_tag",
    "dial_in_seconds",
    "outcome_body",
    "read_setup",
    "tag_of",
    "user_of",
]
