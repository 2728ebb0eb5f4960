"""Probes inside a NAT lane's turns (issue 12): the caller's at its turn, the callee's few.

A caller behind a sequential, address-dependent NAT that has not probed its
punch port hears ``183`` with ``X-Kerjo-Probes: 1`` at its turn, and its
INVITE goes on once that probe arrived (or ``PROBE_WAIT`` later); a callee
whose NAT the server knows is asked for one probe (none without a NAT).
The client side: such a caller sends its INVITE unprobed and probes once
when asked; a callee probes as many endpoints as it is told.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.calls import IncomingCall, OutgoingCall
from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.server.calls.lanes import NATLanes
from kerjostunt.server.calls.natview import NATView
from kerjostunt.server.calls.turnprobes import PROBE_WAIT
from kerjostunt.wire import kerjo
from kerjostunt.wire.prediction import Sample
from kerjostunt.wire.sdp import parse_sdp
from kerjostunt.wire.sip.message import make_response
from tests.test_calls import FakeObservations, answer
from tests.test_client_calls import CallTestCase, FakeAgent
from tests.test_lanes import CallManagerLaneTests


class ParseProbesTests(unittest.TestCase):
    def test_a_count_or_none(self) -> None:
        self.assertEqual(kerjo.parse_probes("1"), 1)
        self.assertEqual(kerjo.parse_probes(" 0 "), 0)
        for bad in (None, "", "all", "-1", "123", "1.5"):
            self.assertIsNone(kerjo.parse_probes(bad), bad)


class ProbesNeededTests(unittest.TestCase):
    """How many endpoints a callee probes inside a turn, from what all its NAT's hosts showed."""

    def setUp(self) -> None:
        self.observations = FakeObservations()
        self.view = NATView(self.observations, NATLanes(Clock(), 0.1))

    def probed(self, user: str, rows: list[tuple[int, str, int]], local_ip: str | None = None) -> None:
        self.observations.by_user[user] = [
            Sample(local, ip, mapped, f"198.18.0.1{i % 2}", 3478 + i // 2, 100.0 + i, local_ip)
            for i, (local, ip, mapped) in enumerate(rows)]

    def test_one_behind_a_known_sequential_nat(self) -> None:
        self.probed("b1", [(40001, "198.18.2.2", 20000 + 4 * i) for i in range(4)], "10.2.0.11")
        self.assertEqual(self.view.probes_needed("198.18.2.2"), 1)

    def test_one_behind_a_preserving_nat(self) -> None:
        self.probed("a1", [(40001 + i // 2, "198.18.1.2", 40001 + i // 2) for i in range(4)], "10.1.0.11")
        self.assertEqual(self.view.probes_needed("198.18.1.2"), 1)

    def test_none_without_a_nat(self) -> None:
        self.probed("pub", [(40001 + i // 2, "198.18.100.10", 40001 + i // 2) for i in range(4)], "198.18.100.10")
        self.assertEqual(self.view.probes_needed("198.18.100.10"), 0)

    def test_all_while_the_nat_is_unknown_or_random(self) -> None:
        self.assertIsNone(self.view.probes_needed("198.18.4.2"))
        self.probed("d1", [(40001, "198.18.4.2", p) for p in (43797, 11165, 55521, 2020)], "10.4.0.11")
        self.assertIsNone(self.view.probes_needed("198.18.4.2"))


class CallerProbesAtItsTurnTests(unittest.SynchronousTestCase):
    """The lane tests' table (two hosts behind one sequential NAT, a's), with b1's punch port unprobed."""

    table = CallManagerLaneTests.setUp
    invite = CallManagerLaneTests.invite
    invites_to = CallManagerLaneTests.invites_to

    def setUp(self) -> None:
        self.table()
        # b1 probed another port earlier (its NAT is known), not the punch port of its call (40001).
        self.observations.by_user["b1"] = [replace(s, local_port=39001) for s in self.observations.by_user["b1"]]

    def responses(self, user: str, code: int) -> list[Any]:
        return [m for m in self.conns[user].sent if getattr(m, "code", None) == code]

    def test_its_invite_waits_for_the_probe_it_is_asked_for(self) -> None:
        self.invite("b1", "a1", "c1")
        self.clock.advance(0.3)
        asked = self.responses("b1", 183)
        self.assertEqual([m.headers.get(kerjo.PROBES) for m in asked], ["1"])
        self.assertEqual(self.invites_to("a1"), [])
        # The probe from its punch port arrives: the NAT's newest port is now 20044.
        self.observations.by_user["b1"].append(Sample(40001, "198.18.2.2", 20044, "198.18.0.10", 3478, 1000.3))
        self.manager.turn_probes.observed("b1", 40001)
        forwarded = self.invites_to("a1")
        self.assertEqual(len(forwarded), 1)
        self.assertEqual([c.port for c in parse_sdp(forwarded[0].body).of_type("prflx")][:2], [20048, 20052])
        self.manager.turn_probes.observed("b1", 40001)
        self.assertEqual(len(self.invites_to("a1")), 1, "forwarded once")

    def test_no_probe_in_time_and_the_invite_goes_anyway(self) -> None:
        self.invite("b1", "a1", "c1")
        self.clock.advance(0.3)
        self.assertEqual(self.invites_to("a1"), [])
        self.clock.advance(PROBE_WAIT)
        self.assertEqual(len(self.invites_to("a1")), 1)
        self.assertEqual(len(self.responses("b1", 183)), 1)

    def test_a_caller_that_probed_goes_at_once(self) -> None:
        self.invite("b2", "a2", "c2")
        self.clock.advance(0.3)
        self.assertEqual(self.responses("b2", 183), [])
        self.assertEqual(len(self.invites_to("a2")), 1)

    def test_a_call_that_ends_while_it_waits_is_not_forwarded(self) -> None:
        from tests.test_calls import request_in

        self.invite("b1", "a1", "c1")
        self.clock.advance(0.3)
        self.manager.handle_request(self.conns["b1"], request_in("c1", "CANCEL", "b1", "a1"))
        self.manager.turn_probes.observed("b1", 40001)
        self.clock.advance(PROBE_WAIT)
        self.assertEqual(self.invites_to("a1"), [])

    def test_the_callee_of_a_turn_is_asked_for_few_probes(self) -> None:
        self.invite("a1", "b2", "c2")
        self.clock.advance(0.3)
        self.assertEqual(self.invites_to("b2")[0].headers.get(kerjo.PROBES), "1", "behind the sequential NAT")
        self.invite("b2", "a2", "c4")  # a2's probes show no NAT (mapped port = local port, no Contact)
        self.manager.handle_response(self.conns["b2"], answer(self.invites_to("b2")[0], punch=40001))
        self.clock.advance(0.3)
        self.assertEqual(self.invites_to("a2")[0].headers.get(kerjo.PROBES), "0")

    def test_a_callees_turn_ends_with_its_probe_not_its_answer(self) -> None:
        self.invite("a1", "b2", "c5")
        self.invite("a2", "b1", "c6")
        self.clock.advance(0.3)
        self.assertEqual((len(self.invites_to("b2")), len(self.invites_to("b1"))), (1, 0))
        self.observations.by_user["b2"].append(Sample(40777, "198.18.2.2", 20044, "198.18.0.10", 3478, 1000.3))
        self.manager.turn_probes.observed("b2", 40777)
        self.clock.advance(0.3)  # quiet again
        self.assertEqual(len(self.invites_to("b1")), 1, "the next turn began before b2 answered")
        self.manager.handle_response(self.conns["b1"], answer(self.invites_to("b1")[0], punch=40001))
        self.manager.handle_response(self.conns["b2"], answer(self.invites_to("b2")[0], punch=40777))
        oks = {u: [m for m in self.conns[u].sent if getattr(m, "code", None) == 200] for u in ("a1", "a2")}
        first = [c.port for c in parse_sdp(oks["a2"][0].body).of_type("prflx")]
        second = [c.port for c in parse_sdp(oks["a1"][0].body).of_type("prflx")]
        self.assertEqual(first[0], 20048, "b1 answered first: from the NAT's newest port, b2's probe")
        self.assertGreater(second[0], first[0], "b2's window counts b1's dials, scheduled before it")

    def test_a_call_without_a_turn_asks_nothing(self) -> None:
        self.invite("a1", "a2", "c3")  # one LAN: no lane
        self.clock.advance(0.3)
        self.assertIsNone(self.invites_to("a2")[0].headers.get(kerjo.PROBES))
        self.assertEqual(self.responses("a1", 183), [])


class _Recording(FakeAgent):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.probed: list[int | None] = []

    def probe_punch_port(self, sig: Any, registration: Any, local: Any, limit: Any = None) -> defer.Deferred[Any]:
        self.probed.append(limit)
        return defer.succeed([])


#: our last probes: one port mapped to the next port of a counter per destination (sequential, d=4)
SEQUENTIAL_PROBES = [ProbeResult(server, 40001, "203.0.113.5", 20000 + 4 * i)
                     for i, server in enumerate([("198.18.0.10", 3478), ("198.18.0.10", 3479), ("198.18.0.11", 3478)])]


class ClientProbeCountTests(CallTestCase):
    """The client: an unprobed INVITE from behind a sequential NAT, one probe when asked, a callee's few."""

    def setUp(self) -> None:
        super().setUp()
        self.agent = _Recording(self.clock, self.sig)

    def test_behind_a_sequential_nat_the_caller_probes_at_its_turn(self) -> None:
        self.agent.ready_port.latest = list(SEQUENTIAL_PROBES)
        call = OutgoingCall(self.agent, "bob", Factory.forProtocol(Protocol), timeout=20.0)
        call.run()
        [invite] = self.written()
        self.assertEqual((invite.method, self.agent.probed), ("INVITE", []))
        self.assertEqual(call.probe_results, SEQUENTIAL_PROBES, "its NAT as last probed, for the techniques")
        self.sig.dataReceived(make_response(invite, 182, "Queued").to_bytes())
        self.assertEqual(self.agent.probed, [])
        asked = make_response(invite, 183, "Session Progress")
        asked.headers.add(kerjo.PROBES, "1")
        self.sig.dataReceived(asked.to_bytes())
        self.assertEqual(self.agent.probed, [1])
        self.assertEqual(call.phase(), "inviting")

    def test_elsewhere_the_caller_probes_before_its_invite(self) -> None:
        for latest in ([], SEQUENTIAL_PROBES[:1]):  # not known yet; one probe shows no behaviour
            self.agent.ready_port.latest = list(latest)
            OutgoingCall(self.agent, "bob", Factory.forProtocol(Protocol), timeout=20.0).run()
            self.written()
        self.assertEqual(self.agent.probed, [None, None])

    def test_the_callee_probes_as_many_endpoints_as_it_is_told(self) -> None:
        for value, expected in (("1", 1), (None, None), ("all", None)):
            headers = self.call_headers("responder") + ([(kerjo.PROBES, value)] if value else [])
            invite = self.sig.build_request("INVITE", "sips:alice@example.test", call_id=f"leg{value}@srv",
                                            headers=headers, body=self.peer_sdp())
            self.transport.clear()
            IncomingCall(self.agent, self.sig, invite).handle()
            self.assertEqual(self.agent.probed[-1], expected, value)


class ProbeServersTests(unittest.TestCase):
    def test_probe_servers_are_cut_to_the_limit(self) -> None:
        from kerjostunt.client import agentprobes
        from kerjostunt.client.signaling import Registration
        from kerjostunt.wire.kerjo import ProbeOffer

        class Sig:
            server_ip = "198.18.0.10"

        offer = ProbeOffer("tok", "pw", (3478, 3479), 300, "198.18.0.11")
        registration = Registration("b1", "198.18.2.2", 4000, 3600, offer)
        calls: list[Any] = []

        def fake_probe_from(reactor: Any, local: Any, servers: Any, **kw: Any) -> defer.Deferred[Any]:
            calls.append(servers)
            return defer.succeed([])

        self.patch(agentprobes, "probe_from", fake_probe_from)
        for limit in (1, None, 0):
            agentprobes.probe_punch_port(None, Sig(), registration, ("10.2.0.11", 40001), 5.0,  # type: ignore[arg-type]
                                         limit)
        self.assertEqual(calls, [[("198.18.0.10", 3478)],
                                 [("198.18.0.10", 3478), ("198.18.0.10", 3479), ("198.18.0.11", 3478)]])
