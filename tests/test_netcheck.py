"""``kerjostunt netcheck``: the verdict logic, the connect-back, and a loopback run.

The NAT lab run (every NAT kind the lab builds) is in tests/test_netcheck_lab.py.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from kerjostunt.cli import build_parser
from kerjostunt.client.cli import netcheck as cli
from kerjostunt.client.nat.portmap import PortMapper
from kerjostunt.client.netcheck import NetcheckConfig, netcheck
from kerjostunt.client.netreport import (
    IPv6Check,
    MappingCheck,
    NetReport,
    format_text,
    inbound_of,
    other_paths,
    port_speed,
    unreachable_kinds,
    verdict,
)
from kerjostunt.server.connectback import ConnectBack, result_of
from kerjostunt.server.probe import ObservationLog, ProbeFactory, ProbeTokens
from kerjostunt.wire import stun
from kerjostunt.wire.prediction import AD, APD, EI, PRESERVING, RANDOM, SEQUENTIAL, UNKNOWN, NATDescription, Sample
from tests.test_portmap import FakeGateway

PUBLIC = NATDescription(False, EI, PRESERVING, None, "198.51.100.7")
PRESERVING_NAT = NATDescription(True, EI, PRESERVING, None, "198.51.100.7")
SEQ_NAT = NATDescription(True, APD, SEQUENTIAL, 4, "198.51.100.7")
RANDOM_NAT = NATDescription(True, APD, RANDOM, None, "198.51.100.7")


def _sample(local: int, mapped: int, server_port: int = 3478, t: float = 0.0,
            server_ip: str = "192.0.2.1") -> Sample:
    return Sample(local, "198.51.100.7", mapped, server_ip, server_port, t, local_ip="10.0.0.5")


class VerdictTests(TestCase):
    def test_public_open(self) -> None:
        self.assertEqual(verdict(PUBLIC, "open"),
                         "you have a public address: peers behind any NAT can reach you directly")

    def test_public_firewalled(self) -> None:
        self.assertIn("firewall", verdict(PUBLIC, "dropped"))

    def test_preserving_reaches_most(self) -> None:
        self.assertEqual(verdict(PRESERVING_NAT, "reset"), "peers behind most NATs can reach you directly")
        self.assertEqual(unreachable_kinds(PRESERVING_NAT), [])

    def test_sequential_needs_relay_for_random(self) -> None:
        self.assertEqual(
            verdict(SEQ_NAT, "dropped"),
            "only a relay will join you to peers behind random NATs; peers with a public address, "
            "port-preserving NATs or sequential NATs can reach you directly")

    def test_random_needs_relay_for_random_and_sequential(self) -> None:
        self.assertEqual(unreachable_kinds(RANDOM_NAT), ["sequential NATs", "random NATs"])
        self.assertTrue(verdict(RANDOM_NAT, "icmp").startswith(
            "only a relay will join you to peers behind sequential NATs or random NATs; "))

    def test_unknown(self) -> None:
        nat = NATDescription(True, UNKNOWN, UNKNOWN, None, None)
        self.assertIn("could not tell", verdict(nat, "unknown"))

    def test_inbound_words(self) -> None:
        self.assertEqual(inbound_of("refused", False), "reset")
        self.assertEqual(inbound_of("timeout", False), "dropped")
        self.assertEqual(inbound_of("unreachable", False), "icmp")
        self.assertEqual(inbound_of("connected", True), "open")
        # The server got through, our listener heard nothing: not ours.
        self.assertEqual(inbound_of("connected", False), "unknown")
        self.assertEqual(inbound_of(None, False), "unknown")

    def test_port_speed_counts_other_hosts(self) -> None:
        before, after = _sample(5000, 20008, t=10.0), _sample(5001, 20028, t=12.0)
        # 20 ports = 5 connections of step 4; one was ours: 4 * 4 ports over 2 s.
        self.assertEqual(port_speed(before, after, SEQ_NAT), 8.0)
        self.assertEqual(port_speed(before, _sample(5001, 20012, t=12.0), SEQ_NAT), 0.0)
        self.assertIsNone(port_speed(before, after, RANDOM_NAT))

    def test_classify_from_samples(self) -> None:
        report = NetReport("192.0.2.1", (3478, 3479), "10.0.0.5")
        report.samples = [_sample(5000, 20000, 3478, 0.0), _sample(5000, 20004, 3479, 0.1),
                          _sample(5001, 20008, 3478, 0.2), _sample(5002, 20012, 3478, 0.3),
                          _sample(5003, 20016, 3478, 0.4)]
        report.classify()
        self.assertEqual((report.nat.mapping, report.nat.allocation, report.nat.delta), (APD, SEQUENTIAL, 4))
        report.samples = [_sample(5000, 5000, 3478, 0.0), _sample(5000, 5000, 3479, 0.1),
                          _sample(5000, 7000, 3478, 0.2, server_ip="192.0.2.2")]
        report.classify()
        self.assertEqual(report.nat.mapping, AD)

    def test_text_and_json(self) -> None:
        report = NetReport("192.0.2.1", (3478, 3479), "10.0.0.5", public_ip="198.51.100.7", public_port=20000,
                           nat=SEQ_NAT, inbound="dropped", hairpin=False, hairpin_detail="refused", rtt_ms=40.2)
        text = format_text(report)
        self.assertIn("mapping address-and-port-dependent, allocation sequential (step +4)", text)
        self.assertIn("hairpinning     no (refused)", text)
        self.assertIn("server RTT      40.2 ms", text)
        data = json.loads(report.dumps())
        self.assertEqual(data["nat"]["allocation"], SEQUENTIAL)
        self.assertEqual(data["unreachable_peers"], ["random NATs"])
        self.assertEqual(data["verdict"], report.verdict)


class ConnectBackTests(TestCase):
    def test_results_of_failures(self) -> None:
        self.assertEqual(result_of(Failure(error.ConnectionRefusedError())), "refused")
        self.assertEqual(result_of(Failure(error.TimeoutError())), "timeout")
        self.assertEqual(result_of(Failure(error.ConnectError(osError=113))), "unreachable")
        self.assertEqual(result_of(Failure(error.ConnectError(osError=99))), "error")

    def test_connects_to_the_source_and_caps(self) -> None:
        mem = MemoryReactorClock()
        cb = ConnectBack(mem, source_ip="192.0.2.2", max_pending=1)
        first = cb.attempt(("198.51.100.7", 20000), b"t" * 12)
        host, port, factory, timeout, bind = mem.tcpClients[0]
        self.assertEqual((host, port, bind), ("198.51.100.7", 20000, ("192.0.2.2", 0)))
        self.assertEqual(self.successResultOf(cb.attempt(("198.51.100.7", 20000), b"u" * 12)), "busy")
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.successResultOf(first), "refused")
        self.assertEqual(cb.pending, 0)

    def test_probe_answers_after_the_connect(self) -> None:
        clock = MemoryReactorClock()

        class Fake:
            def __init__(self) -> None:
                self.calls: list[tuple[tuple[str, int], bytes]] = []
                self.d: defer.Deferred[str] = defer.Deferred()

            def attempt(self, target: tuple[str, int], tag: bytes) -> defer.Deferred[str]:
                self.calls.append((target, tag))
                return self.d

        fake = Fake()
        factory = ProbeFactory(clock, ProbeTokens(clock), ObservationLog(), connect_back=fake)
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_addr("198.51.100.7", 20000), hostAddress=_addr("192.0.2.1", 3478))
        proto.makeConnection(transport)
        tid = b"x" * 12
        proto.dataReceived(stun.encode(stun.BINDING_REQUEST, tid, [(stun.KERJO_CONNECT_BACK, b"")]))
        self.assertEqual(fake.calls, [(("198.51.100.7", 20000), tid)])
        self.assertEqual(transport.value(), b"")
        fake.d.callback("timeout")
        msg = stun.decode(transport.value())
        self.assertEqual(msg.get(stun.KERJO_CONNECT_BACK_RESULT), b"timeout")
        # A second ask on the connection is not dialed.
        transport.clear()
        proto.dataReceived(stun.encode(stun.BINDING_REQUEST, b"y" * 12, [(stun.KERJO_CONNECT_BACK, b"")]))
        self.assertEqual(stun.decode(transport.value()).get(stun.KERJO_CONNECT_BACK_RESULT), b"busy")
        self.assertEqual(len(fake.calls), 1)


def _addr(host: str, port: int) -> Any:
    from twisted.internet.address import IPv4Address
    return IPv4Address("TCP", host, port)


class LoopbackTests(TestCase):
    """The real probe service on 127.0.0.1 port 0: no NAT, a public-looking address."""

    def setUp(self) -> None:
        tokens, log = ProbeTokens(reactor), ObservationLog()
        cb = ConnectBack(reactor, timeout=3.0)
        self.ports = []
        for _ in range(2):
            port = reactor.listenTCP(0, ProbeFactory(reactor, tokens, log, connect_back=cb), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.ports.append(port.getHost().port)
        self.log = log

    @defer.inlineCallbacks
    def test_no_nat(self) -> Any:
        report = yield netcheck(reactor, NetcheckConfig("127.0.0.1", tuple(self.ports), wait=0.05,
                                                        port_mapping=False))
        self.assertEqual(report.errors, [])
        self.assertFalse(report.nat.behind_nat)
        self.assertEqual(report.public_ip, "127.0.0.1")
        self.assertEqual(report.connect_back, "connected")
        self.assertEqual(report.inbound, "open")
        self.assertIsNone(report.hairpin)
        self.assertIsNotNone(report.rtt_ms)
        # 2 ports from one local port, 3 + 1 fresh ones, the connect-back's: 7
        self.assertEqual(len(report.samples), 7)
        self.assertTrue(all(s.mapped_port == s.local_port for s in report.samples))
        self.assertEqual(report.verdict, "you have a public address: peers behind any NAT can reach you directly")
        self.assertEqual(self.log.for_user("anyone"), [])  # unauthenticated: nothing recorded

    @defer.inlineCallbacks
    def test_connect_back_to_a_closed_port_is_refused(self) -> Any:
        """Nobody listens on the probing port: the kernel answers the server's SYN with RST."""
        from kerjostunt.client.nat.probing import exchange
        from kerjostunt.client.nat.sockets import reusable_socket

        holder = reusable_socket(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        local = holder.getsockname()
        tid = b"z" * 12
        request = stun.encode(stun.BINDING_REQUEST, tid, [(stun.KERJO_CONNECT_BACK, b"")])
        ex = yield exchange(reactor, local, ("127.0.0.1", self.ports[0]), request, tid)
        self.assertEqual(ex.result.mapped_port, local[1])
        self.assertEqual(ex.response.get(stun.KERJO_CONNECT_BACK_RESULT), b"refused")

    @defer.inlineCallbacks
    def test_command_json(self) -> Any:
        args = build_parser().parse_args(["netcheck", "--server", "127.0.0.1", "--json", "--wait", "0.05",
                                          "--no-port-mapping", "--probe-ports", ",".join(map(str, self.ports))])
        out, err = io.StringIO(), io.StringIO()
        code = yield cli.run(reactor, args, io.StringIO(), out, err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        data = json.loads(out.getvalue())
        self.assertEqual(data["inbound"], "open")
        self.assertFalse(data["nat"]["behind_nat"])
        self.assertEqual(data["port_mapping"], {"asked": False, "method": None, "internal_port": None,
                                                "external_ip": None, "external_port": None, "lifetime": None,
                                                "deleted": None, "errors": ["--no-port-mapping"]})
        # This host's own IPv6 decides which comes first; neither is a path.
        self.assertIn(data["ipv6"]["detail"], {"the server named no IPv6 address", "no global IPv6 address"})
        self.assertFalse(data["ipv6"]["reached"])

    @defer.inlineCallbacks
    def test_command_nothing_listens(self) -> Any:
        closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = closed.getHost().port
        yield closed.stopListening()
        args = build_parser().parse_args(["netcheck", "--server", "127.0.0.1", "--probe-ports", str(number),
                                          "--no-port-mapping"])
        out, err = io.StringIO(), io.StringIO()
        code = yield cli.run(reactor, args, io.StringIO(), out, err)
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "kerjostunt netcheck: error: no probe port of 127.0.0.1 answered\n")
        self.assertIn(f"problem         probe 127.0.0.1:{number} from port", out.getvalue())
        self.assertIn(": refused", out.getvalue())


NAT_REPORT: dict[str, Any] = {"public_ip": "198.51.100.7", "public_port": 20000, "nat": RANDOM_NAT,
                               "inbound": "reset", "rtt_ms": 40.2}


class OtherPathsTests(TestCase):
    """IPv6 and the port mapping (issue 17) in the verdict and the rows."""

    def report(self, **kw: Any) -> NetReport:
        return NetReport("192.0.2.1", (3478, 3479), "10.0.0.5", **{**NAT_REPORT, **kw})

    def test_a_mapping_at_the_public_address_makes_the_nat_reachable(self) -> None:
        pm = MappingCheck(True, "pcp", 7000, "198.51.100.7", 40000, 7200, True)
        report = self.report(port_mapping=pm)
        self.assertEqual(other_paths(report), [
            "a port mapping makes your NAT reachable directly (pcp mapped port 7000 to 198.51.100.7:40000): "
            "peers connect to it without punching (the relay-only rule above does not count it yet)"])
        preserving = self.report(port_mapping=pm, nat=PRESERVING_NAT)
        self.assertTrue(other_paths(preserving)[0].endswith("peers connect to it without punching"))
        text = format_text(report)
        self.assertIn("port mapping    pcp mapped port 7000 to 198.51.100.7:40000 for 7200 s (deleted again)\n",
                      text)
        self.assertIn("\n                a port mapping makes your NAT reachable directly", text)
        self.assertEqual(json.loads(report.dumps())["port_mapping"]["method"], "pcp")

    def test_a_mapping_at_another_address_is_no_use(self) -> None:
        pm = MappingCheck(True, "upnp", 7000, "10.0.0.1", 7000, 7200, True)
        self.assertIn("another NAT beyond it, so the mapping does not reach you", other_paths(self.report(port_mapping=pm))[0])

    def test_no_mapping_says_why(self) -> None:
        pm = MappingCheck(True, internal_port=7000, errors=["pcp: port unreachable", "nat-pmp: port unreachable"])
        report = self.report(port_mapping=pm)
        self.assertEqual(other_paths(report), [])
        self.assertIn("port mapping    no port mapping (pcp: port unreachable; nat-pmp: port unreachable)\n",
                      format_text(report))
        skipped = self.report(port_mapping=MappingCheck(errors=["--no-port-mapping"]))
        self.assertIn("port mapping    not asked (--no-port-mapping)\n", format_text(skipped))

    def test_ipv6_works(self) -> None:
        v6 = IPv6Check("2001:db8:1::11", "2001:db8::10", True, "2001:db8:1::11", 40.5, "timeout", "dropped")
        report = self.report(ipv6=v6)
        self.assertEqual(other_paths(report), ["IPv6 works: peers with IPv6 reach you directly"])
        text = format_text(report)
        self.assertIn("IPv6            2001:db8:1::11 reaches the server at [2001:db8::10], RTT 40.5 ms\n", text)
        self.assertIn("IPv6 inbound    dropped (no answer)\n", text)
        self.assertEqual(json.loads(report.dumps())["other_paths"], other_paths(report))

    def test_ipv6_address_without_a_path(self) -> None:
        v6 = IPv6Check("2001:db8:1::11", "2001:db8::10", detail="unreachable")
        report = self.report(ipv6=v6)
        self.assertEqual(other_paths(report), ["you have an IPv6 address but it does not reach the server "
                                               "(unreachable): IPv6 will not help your calls"])
        self.assertIn("IPv6            unreachable\n", format_text(report))
        none = self.report(ipv6=IPv6Check(detail="no global IPv6 address"))
        self.assertEqual(other_paths(none), [])
        self.assertIn("IPv6            no global IPv6 address\n", format_text(none))


class ServerPartsTests(TestCase):
    def test_probe_ips_only_when_asked(self) -> None:
        clock = MemoryReactorClock()
        factory = ProbeFactory(clock, ProbeTokens(clock), ObservationLog())
        factory.ips = ("192.0.2.1", "2001:db8::1")
        answers = []
        for attrs in ([], [(stun.KERJO_PROBE_IPS, b"")]):
            proto = factory.buildProtocol(None)
            transport = StringTransport(peerAddress=_addr("198.51.100.7", 20000),
                                        hostAddress=_addr("192.0.2.1", 3478))
            proto.makeConnection(transport)
            proto.dataReceived(stun.encode(stun.BINDING_REQUEST, b"q" * 12, attrs))
            answers.append(stun.decode(transport.value()).get(stun.KERJO_PROBE_IPS))
        self.assertEqual(answers, [None, b"192.0.2.1, 2001:db8::1"])

    def test_connect_back_binds_only_its_own_family(self) -> None:
        mem = MemoryReactorClock()
        cb = ConnectBack(mem, source_ip="192.0.2.2")
        cb.attempt(("2001:db8:1::11", 20000), b"t" * 12)
        cb.attempt(("198.51.100.7", 20000), b"t" * 12)
        self.assertEqual([(c[0], c[4]) for c in mem.tcpClients],
                         [("2001:db8:1::11", None), ("198.51.100.7", ("192.0.2.2", 0))])


class MapperSettledTests(TestCase):
    @defer.inlineCallbacks
    def test_settled_fires_with_the_grant_or_none(self) -> Any:
        from kerjostunt.client.nat.portmap import PCPGateway

        fake = FakeGateway("pcp")
        port = reactor.listenUDP(0, fake, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        mapper = PortMapper(reactor, [PCPGateway(reactor, "127.0.0.1", port.getHost().port)], 7010)  # type: ignore[arg-type]
        waiting = mapper.settled()
        mapper.start()
        mapping = yield waiting
        self.assertEqual(mapping.external, ("203.0.113.5", 40010))
        self.assertEqual((yield mapper.settled()), mapping)  # already answered: at once
        self.assertTrue((yield mapper.release()))
        self.assertEqual(fake.mappings, {})
        refusing = PortMapper(reactor, [], 7011)
        refusing.start()
        self.assertIsNone(self.successResultOf(refusing.settled()))


class DualStackLoopbackTests(TestCase):
    """Probe ports on 127.0.0.1 and ::1 (the server names both), a fake PCP gateway on 127.0.0.1."""

    def setUp(self) -> None:
        tokens, log = ProbeTokens(reactor), ObservationLog()
        cb = ConnectBack(reactor, source_ip="127.0.0.1", timeout=3.0)
        self.ports: list[int] = []
        for interface in ("127.0.0.1", "::1"):
            for i in range(2):
                factory = ProbeFactory(reactor, tokens, log, connect_back=cb)
                factory.ips = ("127.0.0.1", "::1")
                wanted = self.ports[i] if interface == "::1" else 0
                try:
                    port = reactor.listenTCP(wanted, factory, interface=interface)
                except error.CannotListenError as e:
                    raise SkipTest(f"no IPv6 loopback here: {e}") from None
                self.addCleanup(port.stopListening)
                if interface == "127.0.0.1":
                    self.ports.append(port.getHost().port)
        self.gateway = FakeGateway("pcp")
        udp = reactor.listenUDP(0, self.gateway, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(udp.stopListening)
        self.gateway_port = udp.getHost().port

    @defer.inlineCallbacks
    def test_ipv6_and_a_mapping(self) -> Any:
        config = NetcheckConfig("127.0.0.1", tuple(self.ports), wait=0.05, gateway="127.0.0.1",
                                gateway_port=self.gateway_port, upnp=False, local_v6="::1")
        report = yield netcheck(reactor, config)
        self.assertEqual(report.errors, [])
        v6 = report.ipv6
        self.assertEqual((v6.address, v6.server, v6.reached, v6.mapped, v6.connect_back, v6.inbound),
                         ("::1", "::1", True, "::1", "connected", "open"))
        self.assertIsNotNone(v6.rtt_ms)
        pm = report.port_mapping
        self.assertEqual((pm.asked, pm.method, pm.external_ip, pm.lifetime, pm.deleted),
                         (True, "pcp", "203.0.113.5", 7200, True))
        self.assertEqual(pm.external_port, 40000 + pm.internal_port % 1000)
        self.assertEqual(self.gateway.mappings, {})  # deleted at the gateway
        # No NAT here: the verdict says so; IPv6 is a path of its own.
        self.assertEqual(other_paths(report), ["IPv6 works: peers with IPv6 reach you directly"])

    @defer.inlineCallbacks
    def test_server_given_by_its_ipv6_address(self) -> Any:
        """``--server [::1]``: steps 1 to 3 run over IPv6, and the IPv6 rows are theirs."""
        config = NetcheckConfig("::1", tuple(self.ports), wait=0.05, port_mapping=False, local_v6="::1")
        report = yield netcheck(reactor, config)
        self.assertEqual((report.errors, report.public_ip, report.inbound), ([], "::1", "open"))
        v6 = report.ipv6
        self.assertEqual((v6.server, v6.reached, v6.mapped, v6.inbound, v6.rtt_ms), ("::1", True, "::1", "open",
                                                                                   report.rtt_ms))
