"""What both sides speak: SIP, STUN, SDP, port prediction and kerjostunt's own
headers and bodies.

Pure and deterministic: nothing here holds Twisted state, touches a socket or
imports SQL, so the server and the client share one codec and the property
tests can run every parser on its own.
"""
