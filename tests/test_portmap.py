"""Port mappings (issue 17): the PCP / NAT-PMP codecs, and the client against
a fake gateway on 127.0.0.1 UDP port 0 (PCP, NAT-PMP only, silent, refusing)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.nat.portmap import (
    RETRANSMITS,
    Mapping,
    MappingFailed,
    NATPMPGateway,
    PCPGateway,
    PortMapper,
    default_gateway,
)
from kerjostunt.wire import portmap as wire

ports = st.integers(1, 65535)
lifetimes = st.integers(0, 2**32 - 1)
ipv4 = st.ip_addresses(v=4).map(str)


class CodecTests(unittest.TestCase):
    @given(st.binary(min_size=12, max_size=12), ipv4, ports, lifetimes, st.integers(0, 65535))
    def test_pcp_request_round_trip(self, nonce: bytes, ip: str, port: int, lifetime: int, suggested: int) -> None:
        request = wire.PCPMapRequest(nonce, ip, port, lifetime, suggested)
        data = request.to_bytes()
        self.assertEqual(len(data), 60)  # 24-byte header, 36-byte MAP body (RFC 6887 11.1, 11.2)
        self.assertEqual(wire.decode_pcp_map_request(data), request)

    @given(st.integers(0, 13), lifetimes, st.binary(min_size=12, max_size=12), ports, ports,
           st.ip_addresses().filter(lambda a: a.version == 4 or a.ipv4_mapped is None).map(str))
    def test_pcp_response_round_trip(self, result: int, lifetime: int, nonce: bytes, internal: int,
                                     external: int, ip: str) -> None:
        response = wire.PCPMapResponse(result, lifetime, 99, nonce, internal, external, ip)
        self.assertEqual(wire.decode_pcp_response(response.to_bytes()), response)

    def test_pcp_layout(self) -> None:
        data = wire.PCPMapRequest(b"n" * 12, "192.168.1.5", 7000, 7200).to_bytes()
        self.assertEqual(data[:2], b"\x02\x01")  # version 2, MAP
        self.assertEqual(data[4:8], (7200).to_bytes(4, "big"))
        self.assertEqual(data[8:24], bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 5]))  # IPv4-mapped
        self.assertEqual(data[24:36], b"n" * 12)
        self.assertEqual(data[36], 6)  # TCP
        self.assertEqual(data[40:42], (7000).to_bytes(2, "big"))

    def test_natpmp_reply_to_pcp_is_unsupported_version(self) -> None:
        # A NAT-PMP gateway answers version 2 with version 0, result 1 (RFC 6887 section 9).
        reply = bytes([0, 0x81]) + (1).to_bytes(2, "big") + (5).to_bytes(4, "big")
        self.assertRaises(wire.UnsupportedVersion, wire.decode_pcp_response, reply)

    @given(ports, lifetimes, st.integers(0, 65535))
    def test_natpmp_round_trips(self, port: int, lifetime: int, suggested: int) -> None:
        request = wire.NATPMPMapRequest(port, lifetime, suggested)
        self.assertEqual(wire.decode_natpmp_map_request(request.to_bytes()), request)
        response = wire.NATPMPMapResponse(0, 7, port, suggested, lifetime)
        self.assertEqual(wire.decode_natpmp_map_response(response.to_bytes()), response)

    def test_natpmp_address(self) -> None:
        self.assertEqual(wire.encode_natpmp_address_request(), b"\x00\x00")
        data = wire.natpmp_address_response(0, 1, "203.0.113.5")
        self.assertEqual(wire.decode_natpmp_address_response(data), (0, "203.0.113.5"))

    @given(st.binary(max_size=120))
    def test_garbage_is_an_error_never_a_crash(self, data: bytes) -> None:
        for decode in (wire.decode_pcp_response, wire.decode_natpmp_map_response,
                       wire.decode_natpmp_address_response):
            try:
                decode(data)
            except wire.PortmapError:
                pass

    def test_default_gateway_from_the_route_table(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("Iface\tDestination\tGateway \tFlags\n"
                    "eth0\t0000A8C0\t00000000\t0001\n"
                    "eth0\t00000000\t0101A8C0\t0003\n")
        from pathlib import Path
        self.assertEqual(default_gateway(Path(path)), "192.168.1.1")
        self.assertIsNone(default_gateway(Path(path + ".none")))


class FakeGateway(DatagramProtocol):
    """A gateway on 127.0.0.1: ``speaks`` "pcp", "nat-pmp" (answers PCP with version 0) or "silent"."""

    def __init__(self, speaks: str, external_ip: str = "203.0.113.5", refuse: int = 0) -> None:
        self.speaks = speaks
        self.external_ip = external_ip
        self.refuse = refuse
        self.seen: list[Any] = []
        self.mappings: dict[int, int] = {}  # internal -> external port

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if self.speaks == "silent":
            self.seen.append(data)
            return
        if data[0] == wire.PCP_VERSION:
            if self.speaks != "pcp":
                self.transport.write(bytes([0, 0x80 | data[1], 0, 1]) + bytes(4), addr)
                return
            request = wire.decode_pcp_map_request(data)
            self.seen.append(request)
            external = self._map(request.internal_port, request.lifetime)
            reply = wire.PCPMapResponse(self.refuse, request.lifetime, 1, request.nonce, request.internal_port,
                                        external, self.external_ip)
            self.transport.write(reply.to_bytes(), addr)
        elif data == wire.encode_natpmp_address_request():
            self.seen.append("address")
            self.transport.write(wire.natpmp_address_response(0, 1, self.external_ip), addr)
        else:
            mapping = wire.decode_natpmp_map_request(data)
            self.seen.append(mapping)
            external = self._map(mapping.internal_port, mapping.lifetime)
            reply = wire.NATPMPMapResponse(self.refuse, 1, mapping.internal_port, external, mapping.lifetime)
            self.transport.write(reply.to_bytes(), addr)

    def _map(self, internal: int, lifetime: int) -> int:
        if lifetime == 0:
            self.mappings.pop(internal, None)
            return 0
        return self.mappings.setdefault(internal, 40000 + internal % 1000)


class ClientTests(unittest.TestCase):
    def gateway(self, speaks: str, **kw: Any) -> tuple[FakeGateway, int]:
        fake = FakeGateway(speaks, **kw)
        port = reactor.listenUDP(0, fake, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return fake, port.getHost().port

    def methods(self, port: int, clock: Any = None) -> list[Any]:
        return [PCPGateway(reactor, "127.0.0.1", port, clock=clock),  # type: ignore[arg-type]
                NATPMPGateway(reactor, "127.0.0.1", port, clock=clock)]  # type: ignore[arg-type]

    @defer.inlineCallbacks
    def test_pcp_first(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("pcp")
        mapping = yield self.methods(port)[0].map(7000, 600, None)
        self.assertEqual((mapping.method, mapping.external, mapping.lifetime), ("pcp", ("203.0.113.5", 40000), 600))
        self.assertEqual(mapping.internal, ("127.0.0.1", 7000))
        self.assertEqual(fake.seen[0].client_ip, "127.0.0.1")  # the source address, as PCP wants

    @defer.inlineCallbacks
    def test_mapper_falls_back_to_natpmp_renews_and_deletes(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("nat-pmp")
        clock = Clock()
        changes: list[Mapping | None] = []
        got: defer.Deferred[None] = defer.Deferred()

        def changed(mapping: Mapping | None) -> None:
            changes.append(mapping)
            if not got.called:
                got.callback(None)

        mapper = PortMapper(clock, self.methods(port), 7001, lifetime=120, on_change=changed)
        mapper.start()
        yield got
        self.assertEqual(mapper.phase(), "held")
        self.assertEqual((changes[0].method, changes[0].external), ("nat-pmp", ("203.0.113.5", 40001)))
        self.assertEqual(fake.seen[:2][0], "address")
        # Renewed at half the lifetime, suggesting the port it got.
        clock.advance(60)
        self.assertEqual(mapper.phase(), "renewing")
        while mapper.phase() == "renewing":
            yield _turn()
        self.assertEqual(mapper.phase(), "held")
        self.assertEqual(fake.seen[-1], wire.NATPMPMapRequest(7001, 120, 40001))
        self.assertEqual(len(changes), 1)  # the same mapping: nothing changed for the agent
        yield mapper.release()
        self.assertEqual(changes[-1], None)
        self.assertEqual(fake.seen[-1], wire.NATPMPMapRequest(7001, 0, 0))
        self.assertEqual(fake.mappings, {})
        self.assertEqual(mapper.phase(), "released")
        self.assertEqual(clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_pcp_delete_repeats_the_nonce(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("pcp")
        mapping = yield self.methods(port)[0].map(7002, 600, None)
        yield self.methods(port)[0].unmap(mapping)
        self.assertEqual((fake.seen[-1].lifetime, fake.seen[-1].nonce), (0, fake.seen[0].nonce))
        self.assertEqual(fake.mappings, {})

    @defer.inlineCallbacks
    def test_a_refusal_is_named(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("pcp", refuse=2)
        failure = yield self.assertFailure(self.methods(port)[0].map(7003, 600, None), MappingFailed)
        self.assertEqual(str(failure), "NOT_AUTHORIZED")

    def test_a_silent_gateway_times_out_after_the_retransmissions(self) -> None:
        fake, port = self.gateway("silent")
        clock = Clock()
        d = self.methods(port, clock)[0].map(7004, 600, None)
        for wait in RETRANSMITS:
            self.assertNoResult(d)
            clock.advance(wait)
        self.failureResultOf(d, MappingFailed)

    @defer.inlineCallbacks
    def test_no_gateway_daemon_is_port_unreachable(self):  # type: ignore[no-untyped-def]
        """ICMP port unreachable: the epoll reactor closes the connected socket before any read."""
        closed = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")  # type: ignore[attr-defined]
        number = closed.getHost().port
        yield closed.stopListening()
        failure = yield self.assertFailure(PCPGateway(reactor, "127.0.0.1", number).map(7008, 600, None),  # type: ignore[arg-type]
                                           MappingFailed)
        self.assertEqual(str(failure), "port unreachable")

    def test_upnp_nobody_answering_is_named(self) -> None:
        """miniupnpc's discover() raises Exception('Success') when no device answered."""
        import sys
        import types

        from kerjostunt.client.nat.portmap import UPnPGateway

        class Silent:
            discoverdelay = 0

            def discover(self) -> int:
                raise Exception("Success")

        self.patch(sys, "modules", {**sys.modules, "miniupnpc": types.SimpleNamespace(UPnP=Silent)})
        failure = self.assertRaises(MappingFailed, UPnPGateway(lambda f: defer.succeed(f()))._find)
        self.assertEqual(str(failure), "no UPnP device answered")

    @defer.inlineCallbacks
    def test_nothing_maps_then_nothing_is_held(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("pcp", refuse=8)
        mapper = PortMapper(Clock(), self.methods(port), 7005)
        mapper.start()
        # Both methods refuse (this fake answers NAT-PMP too): the mapper ends with none.
        while mapper.phase() == "asking":
            yield _turn()
        self.assertEqual(mapper.phase(), "none")
        self.assertIsNone(mapper.mapping)
        self.assertEqual([e.split(":")[0] for e in mapper.errors], ["pcp", "nat-pmp"])

    @defer.inlineCallbacks
    def test_release_while_asking_abandons_the_request(self):  # type: ignore[no-untyped-def]
        fake, port = self.gateway("silent")
        clock = Clock()
        mapper = PortMapper(clock, self.methods(port, clock)[:1], 7006)
        mapper.start()
        yield mapper.release()  # before any answer: the exchange's socket and timer go
        self.assertEqual(mapper.phase(), "released")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(mapper.mapping)

    @defer.inlineCallbacks
    def test_upnp_runs_where_the_reactors_shutdown_does_not_wait(self):  # type: ignore[no-untyped-def]
        """miniupnpc's discovery blocks 4 s where nothing answers: in the
        reactor's thread pool, which its shutdown joins, every command that
        was done sooner (a refused connection, a quick echo) took 4 s more to
        exit. The mapper's UPnP calls run in a daemon thread instead."""
        import threading

        from kerjostunt.client.nat.portmap import UPnPGateway, mapper_for

        if not UPnPGateway.available():
            raise unittest.SkipTest("miniupnpc is not installed")
        mapper = mapper_for(reactor, 7009, "192.0.2.1")
        assert mapper is not None
        [upnp] = [g for g in mapper.gateways if isinstance(g, UPnPGateway)]
        pool = reactor.getThreadPool()
        where = yield upnp.in_thread(lambda: (threading.current_thread().daemon,
                                              threading.current_thread() in pool.threads))
        self.assertEqual(where, (True, False))
        with self.assertRaises(ZeroDivisionError):
            yield upnp.in_thread(lambda: 1 // 0)  # errors come back too

    def test_a_upnp_mapping_made_after_release_is_deleted(self) -> None:
        """miniupnpc runs in a thread, which a release cannot stop: its late mapping is deleted."""
        from kerjostunt.client.nat.portmap import UPnPGateway

        threads: list[defer.Deferred[Any]] = []

        def in_thread(f: Any) -> defer.Deferred[Any]:
            threads.append(defer.Deferred())
            return threads[-1]

        gateway = UPnPGateway(in_thread)
        deleted: list[Mapping] = []
        gateway.unmap = lambda m: deleted.append(m) or defer.succeed(None)  # type: ignore[method-assign]
        mapper = PortMapper(Clock(), [gateway], 7007)
        mapper.start()
        mapper.release()
        grant = Mapping("upnp", ("10.0.0.5", 7007), ("203.0.113.5", 7007), 600)
        threads[0].callback(grant)  # the thread finishes after the release
        self.assertEqual(deleted, [grant])
        self.assertIsNone(mapper.mapping)
        self.assertEqual(mapper.phase(), "released")


def _turn() -> defer.Deferred[None]:
    """One reactor turn (the fake gateway's answer crosses loopback)."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0, d.callback, None)  # type: ignore[attr-defined]
    return d


class MappingCandidateTests(unittest.TestCase):
    """The mapping in the SDP: the client's offer, the server's check, the peer's dial order."""

    def offer(self, mapped: Any = ("203.0.113.5", 40700)) -> Any:
        from kerjostunt.client.calls import build_offer
        from kerjostunt.wire.sdp import parse_sdp

        return parse_sdp(build_offer("alice", "10.0.0.5", 40001, 7000, mapped=mapped).to_bytes())

    def test_offer_carries_one_srflx_passive_mapping(self) -> None:
        from kerjostunt.wire.sdp import MAPPING_FOUNDATION, SDPError, validate_offer

        offer = self.offer()
        self.assertEqual(validate_offer(offer), 40001)
        [mapped] = offer.of_type("srflx", "passive")
        self.assertEqual((mapped.foundation, mapped.endpoint, mapped.raddr, mapped.rport),
                         (MAPPING_FOUNDATION, ("203.0.113.5", 40700), "10.0.0.5", 7000))
        self.assertRaises(SDPError, validate_offer, offer.with_candidates([mapped]))
        other = mapped.__class__("s1", 1, "TCP", 5, "203.0.113.5", 1, "srflx", "passive")
        self.assertRaises(SDPError, validate_offer, offer.with_candidates([other]))
        # No app port, no mapping to offer.
        from kerjostunt.client.calls import build_offer
        self.assertEqual(build_offer("a", "10.0.0.5", 1, None, mapped=("203.0.113.5", 2)).of_type("srflx"), [])

    def test_server_passes_on_only_a_mapping_at_the_public_address(self) -> None:
        from kerjostunt.server.calls.dialing import augmented
        from kerjostunt.wire.prediction import NATDescription, Prediction

        nat = NATDescription(True, "address-and-port-dependent", "random", None, "203.0.113.5")
        prediction = Prediction("203.0.113.5", (40001,), 0.1, nat)
        kept = augmented(self.offer(), prediction, "203.0.113.5")
        self.assertIn(("pm", 40700), [(c.foundation, c.port) for c in kept.of_type("srflx")])
        lied = augmented(self.offer(("192.0.2.66", 80)), prediction, "203.0.113.5")
        self.assertNotIn("192.0.2.66", [c.ip for c in lied.candidates])

    def test_the_peer_dials_the_mapping_first_even_when_flagged_stunt(self) -> None:
        from twisted.internet.protocol import Factory, Protocol

        from kerjostunt.client.calls import CallSetup, Dialer, DialerConfig

        remote = self.offer().with_candidates([
            self.offer().of_type("srflx")[0].__class__("s1", 1, "TCP", 5, "203.0.113.5", 7000, "srflx", "passive"),
        ])
        dialer = Dialer(Clock(), CallSetup("c", bytes(32), "initiator", "203.0.113.5", remote),
                        Factory.forProtocol(Protocol), local_ip="10.9.0.5", punch_port=1,
                        own_public_ip="198.51.100.7", config=DialerConfig(low_ttl=None))
        self.assertEqual([(c.endpoint, t) for c, t in dialer.direct_candidates()],
                         [(("203.0.113.5", 40700), "port-mapping"), (("203.0.113.5", 7000), "public")])
        dialer.stunt_only = True
        self.assertEqual([t for _, t in dialer.direct_candidates()], ["port-mapping"])

    def test_the_mapping_is_dialed_before_the_dial_moment_unless_our_nat_is_sequential(self) -> None:
        from twisted.internet.protocol import Factory, Protocol

        from kerjostunt.client.calls import CallSetup, Dialer, DialerConfig, race
        from kerjostunt.client.nat.probing import ProbeResult

        dialed: list[Any] = []
        self.patch(race, "connect_from", lambda reactor, local, remote, *a, **kw: dialed.append(remote)
                   or defer.Deferred())
        self.patch(race, "punch", lambda *a: defer.Deferred())
        for probes, early in (([], True), ([ProbeResult(("192.0.2.1", 3478), 1, "198.51.100.7", 20000),
                                            ProbeResult(("192.0.2.1", 3479), 1, "198.51.100.7", 20001),
                                            ProbeResult(("192.0.2.2", 3478), 1, "198.51.100.7", 20002)], False)):
            dialed.clear()
            clock = Clock()
            dialer = Dialer(clock, CallSetup("c", bytes(32), "initiator", "203.0.113.5", self.offer()),
                            Factory.forProtocol(Protocol), local_ip="10.9.0.5", punch_port=1,
                            own_public_ip="198.51.100.7", config=DialerConfig(low_ttl=None), own_probes=probes)
            dialer.start(0.05).addErrback(lambda f: None)
            self.assertEqual(dialed[:1] == [("203.0.113.5", 40700)], early, probes)
            clock.advance(0.05)
            self.assertEqual(dialed.count(("203.0.113.5", 40700)), 1)  # once, early or at the moment
            dialer.stop("done")


class OfferedMappingWaitTests(unittest.TestCase):
    """A side that offered its mapping keeps its race open while the peer may still dial it."""

    def race(self, offered: bool) -> tuple[Any, Clock, Any]:
        from twisted.internet.protocol import Factory, Protocol

        from kerjostunt.client.calls import CallSetup, Dialer, DialerConfig, build_offer

        # The peer offers only private addresses (not ours to dial): our own attempts end at once.
        remote = build_offer("bob", "10.0.0.5", 40001, 7000)
        clock = Clock()
        dialer = Dialer(clock, CallSetup("c", bytes(32), "initiator", "203.0.113.5", remote),
                        Factory.forProtocol(Protocol), local_ip="10.9.0.5", punch_port=1,
                        own_public_ip="198.51.100.7", config=DialerConfig(low_ttl=None, offered_mapping=offered))
        result = dialer.start(0.0)
        clock.advance(0)
        return dialer, clock, result

    def test_without_a_mapping_the_race_ends_with_its_attempts(self) -> None:
        from kerjostunt.client.calls import ConnectFailed

        _, _, result = self.race(offered=False)
        self.failureResultOf(result, ConnectFailed)

    def test_with_a_mapping_it_waits_for_the_peers_direct_connect(self) -> None:
        from kerjostunt.client.calls import ConnectFailed, DialerConfig

        dialer, clock, result = self.race(offered=True)
        self.assertNoResult(result)
        clock.advance(DialerConfig().direct_timeout - 0.01)
        self.assertFalse(dialer.finished)  # a connection to our app port would still be taken
        clock.advance(0.01)
        self.failureResultOf(result, ConnectFailed)

    def test_the_peers_connect_to_the_mapping_wins_as_port_mapping(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import StringTransport

        from kerjostunt.client.handshake import HandshakeFactory

        dialer, clock, result = self.race(offered=True)
        clock.advance(1.0)
        peer_address = IPv4Address("TCP", "203.0.113.5", 40123)
        ours = dialer.handshakes.buildProtocol(peer_address)  # as the app port hands it over
        mine, theirs = StringTransport(), StringTransport()
        ours.makeConnection(mine)
        dialer.accepted(ours, ("203.0.113.5", 40123))
        setup = dialer.setup
        peer = HandshakeFactory(setup.secret, setup.handshake_id, "responder", Factory.forProtocol(Protocol),
                                clock).buildProtocol(peer_address)
        peer.makeConnection(theirs)
        hello = mine.value()
        mine.clear()
        peer.dataReceived(hello)
        ours.dataReceived(theirs.value())
        self.assertEqual(self.successResultOf(result).technique, "port-mapping")


class AgentMappingTests(unittest.TestCase):
    """The agent maps its app port only when allowed (``--no-port-mapping`` is ``port_mapping=False``)."""

    def mapped_ports(self, **kw: Any) -> list[int]:
        from twisted.internet.protocol import Factory, Protocol

        from kerjostunt.client import agent as agent_module

        asked: list[int] = []

        def mapper_for(clock: Any, port: int) -> None:
            asked.append(port)
            return None  # no gateway: nothing to start

        self.patch(agent_module, "mapper_for", mapper_for)
        listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        agent = agent_module.PeerAgent(Clock(), server=("127.0.0.1", 5061), user_id="alice", password="x",
                                       domain="kerjo.test", ca_path="unused", **kw)
        agent._app_port = listening
        agent._map_app_port()
        return asked

    def test_the_app_port_is_mapped_by_default(self) -> None:
        self.assertEqual(len(self.mapped_ports()), 1)

    def test_no_port_mapping_asks_nothing(self) -> None:
        self.assertEqual(self.mapped_ports(port_mapping=False), [])


class NoRefusalWithAMappingTests(unittest.SynchronousTestCase):
    """A random NAT facing a sequential one is 488; a caller offering its gateway's mapping is dialed there."""

    from tests.test_lanes import CallManagerLaneTests as _Lanes

    setUp = _Lanes.setUp
    invites_to = _Lanes.invites_to

    def call(self, mapped: tuple[str, int]) -> list[int | None]:
        from kerjostunt.client.calls import build_offer
        from tests.test_calls import invite_request

        body = build_offer("d1", "10.0.0.5", 40001, 7000, mapped=mapped).to_bytes()
        self.manager.handle_request(self.conns["d1"], invite_request("d1", "b1", "c7", body=body))
        self.clock.advance(0.3)
        return [getattr(m, "code", None) for m in self.conns["d1"].sent]

    def test_a_caller_with_a_mapping_is_not_refused(self) -> None:
        from kerjostunt.wire.sdp import parse_sdp

        self.assertNotIn(488, self.call(("198.18.4.2", 7700)))
        [forwarded] = self.invites_to("b1")
        self.assertIn(("198.18.4.2", 7700), [c.endpoint for c in parse_sdp(forwarded.body).of_type("srflx")])

    def test_a_mapping_at_another_address_does_not_count(self) -> None:
        self.assertIn(488, self.call(("203.0.113.9", 7700)))
        self.assertEqual(self.invites_to("b1"), [])
