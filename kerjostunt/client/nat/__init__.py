"""The NAT techniques of the client: sockets bound to shared ports, probing,
the ready punch port, simultaneous open and the birthday search, and the
``Contest`` bookkeeping every race shares (contest.py).

Each technique takes a plan and returns a Deferred of a connected transport;
none knows about SIP, calls or the peer manager.
"""
