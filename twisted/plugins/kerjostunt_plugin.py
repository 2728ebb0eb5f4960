"""twistd plugin: ``twistd kerjostunt`` runs the STUNT server (see kerjostunt.server.tap)."""
from twisted.application.service import ServiceMaker

kerjostunt = ServiceMaker(  # type: ignore[no-untyped-call]
    "kerjostunt",
    "kerjostunt.server.tap",
    "STUNT server: SIP-over-TLS signaling, STUN-over-TCP probes, trusted peers",
    "kerjostunt",
)
