"""twistd plugin: ``twistd kerjostunt`` runs the STUNT server (see kerjostunt.tap)."""
from twisted.application.service import ServiceMaker

kerjostunt = ServiceMaker(
    "kerjostunt",
    "kerjostunt.tap",
    "STUNT server: SIP-over-TLS signaling, STUN-over-TCP probes, trusted peers",
    "kerjostunt",
)
