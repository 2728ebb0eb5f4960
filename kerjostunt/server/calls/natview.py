"""What the server knows of the NATs behind a call's two sides, from every probe it has seen.

One host's own probes are not always conclusive: behind a sequential NAT
the other hosts' connections take ports between them, and in a crowded
preserving NAT one host's probe now and then collides with another's.  So
a side's NAT is read from its own probes and, where those are not
conclusive, from all the probes through its public address (one NAT).
From that come the predictions the other side dials, which sides take a
turn at a NAT lane (lanes.py), and whether any technique joins the pair.
"""

from __future__ import annotations

from kerjostunt.server.calls.dialing import predict_for, preserved, shifted
from kerjostunt.server.calls.lanes import NATLanes, lane_of
from kerjostunt.server.calls.machine import CALLEE, CALLER
from kerjostunt.server.calls.seams import Observations
from kerjostunt.wire.prediction import (
    AD,
    APD,
    PRESERVING,
    SEQUENTIAL,
    NATDescription,
    Prediction,
    classify,
    no_technique,
)
from kerjostunt.wire.sdp import SessionDescription

__all__ = ["NATView", "Sides"]

#: (the caller's NAT, the callee's NAT); None: that side has not probed
Sides = tuple[NATDescription | None, ...]


class NATView:
    """The NATs of the calls' sides as all their hosts' probes describe them."""

    def __init__(self, observations: Observations, lanes: NATLanes) -> None:
        self.observations = observations
        self.lanes = lanes

    def prediction_for(self, user_id: str, sdp: SessionDescription, public_ip: str) -> Prediction:
        """From the probes of exactly the SDP's punch port; else the signaling address, low confidence.

        Behind a sequential, address-dependent NAT it counts from the NAT's
        newest port, whichever of its hosts probed last, plus the mappings
        the calls that dialed there since were going to open (lanes.py).
        """
        prediction = predict_for(user_id, sdp, self.observations.samples(user_id), public_ip)
        nat = self.nat_behind(prediction.nat, public_ip)
        if nat.allocation == PRESERVING and prediction.nat.allocation != PRESERVING:
            return preserved(prediction, nat, sdp)
        key = lane_of(nat, public_ip)
        if key is None or nat.delta is None:
            return prediction
        latest = self.observations.behind(key)[-1]
        prediction = Prediction(prediction.ip, prediction.ports, prediction.confidence, nat)
        return shifted(prediction, latest.mapped_port, self.lanes.shift(key, latest.time))

    def probes_needed(self, public_ip: str) -> int | None:
        """How many probe endpoints a callee at ``public_ip`` probes during a turn (``X-Kerjo-Probes``).

        One, once its NAT is known from earlier probes (all its hosts'):
        behind a sequential, address-dependent NAT the prediction counts
        from the NAT's newest port plus the mappings the calls since were
        going to open (``prediction_for``), behind a preserving one from the
        punch port itself, so the callee's probe has only to make that port
        fresh.  Three probes took four round trips to the server, and the
        NAT lane is held meanwhile (NAT lab group: 3 x 41 ms of a 220 ms
        turn).  None, so the NAT shows itself, while it is not known; none at
        all without a NAT (the punch port is the public endpoint).
        """
        samples = self.observations.behind(public_ip)
        if not samples:
            return None
        nat = classify(samples)
        if not nat.behind_nat:
            return 0
        sequential = nat.allocation == SEQUENTIAL and bool(nat.delta) and nat.mapping in (AD, APD)
        return 1 if sequential or nat.allocation == PRESERVING else None

    def nat_behind(self, own: NATDescription, public_ip: str) -> NATDescription:
        """The NAT as all its hosts' probes show it, where one host's own are not conclusive.

        Between one host's probes the others' connections take ports: its
        own steps look random (seen in the NAT lab's group) where all of
        them together step by the NAT's delta.  And in a crowded preserving
        NAT one host's probe now and then collides with another's and gets
        some other port: its own few mappings look random, all the hosts'
        together keep their ports (the lab's 20-host site).
        """
        if not own.behind_nat or own.allocation in (SEQUENTIAL, PRESERVING):
            return own
        ip = own.public_ip or public_ip
        samples = self.observations.behind(ip)
        if not samples:
            return own
        nat = classify(samples)
        if nat.allocation == PRESERVING:
            return NATDescription(True, nat.mapping, PRESERVING, None, ip)
        if nat.allocation != SEQUENTIAL or own.mapping not in (AD, APD):
            return own
        return NATDescription(True, own.mapping, SEQUENTIAL, nat.delta, ip)

    def sides(self, caller: tuple[str, str], callee: tuple[str, str]) -> Sides:
        """Both sides' NATs, each side given as (user, public address); None: no probes."""
        found: list[NATDescription | None] = []
        for user, ip in (caller, callee):
            samples = self.observations.samples(user)
            found.append(self.nat_behind(classify(samples), ip) if samples else None)
        return found[0], found[1]

    @staticmethod
    def lanes_of(caller_ip: str, callee_ip: str, nats: Sides) -> dict[str, str]:
        """side -> the NAT lane (public address) it dials through, for sides whose calls interfere."""
        if caller_ip == callee_ip:
            return {}  # one LAN: host candidates, no punch, no NAT port taken
        lanes: dict[str, str] = {}
        for side, nat, ip in ((CALLER, nats[0], caller_ip), (CALLEE, nats[1], callee_ip)):
            key = lane_of(nat, ip)
            if key is not None:
                lanes[side] = key
        return lanes

    @staticmethod
    def why_unjoinable(caller_ip: str, callee_ip: str, nats: Sides) -> str:
        """Why no technique can join the two NATs, or "": peers behind one public address are
        on one LAN (host candidates join them, whatever their NAT does outside)."""
        return "" if caller_ip == callee_ip else no_technique(*nats)
