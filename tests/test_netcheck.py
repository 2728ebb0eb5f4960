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
from twisted.trial.unittest import TestCase

from kerjostunt.cli import build_parser
from kerjostunt.client.cli import netcheck as cli
from kerjostunt.client.netcheck import NetcheckConfig, netcheck
from kerjostunt.client.netreport import NetReport, format_text, inbound_of, port_speed, unreachable_kinds, verdict
from kerjostunt.server.connectback import ConnectBack, result_of
from kerjostunt.server.probe import ObservationLog, ProbeFactory, ProbeTokens
from kerjostunt.wire import stun
from kerjostunt.wire.prediction import AD, APD, EI, PRESERVING, RANDOM, SEQUENTIAL, UNKNOWN, NATDescription, Sample

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
        report = yield netcheck(reactor, NetcheckConfig("127.0.0.1", tuple(self.ports), wait=0.05))
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
                                          "--probe-ports", ",".join(map(str, self.ports))])
        out, err = io.StringIO(), io.StringIO()
        code = yield cli.run(reactor, args, io.StringIO(), out, err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        data = json.loads(out.getvalue())
        self.assertEqual(data["inbound"], "open")
        self.assertFalse(data["nat"]["behind_nat"])

    @defer.inlineCallbacks
    def test_command_nothing_listens(self) -> Any:
        closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = closed.getHost().port
        yield closed.stopListening()
        args = build_parser().parse_args(["netcheck", "--server", "127.0.0.1", "--probe-ports", str(number)])
        out, err = io.StringIO(), io.StringIO()
        code = yield cli.run(reactor, args, io.StringIO(), out, err)
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "kerjostunt netcheck: error: no probe port of 127.0.0.1 answered\n")
        self.assertIn(f"problem         probe 127.0.0.1:{number} from port", out.getvalue())
        self.assertIn(": refused", out.getvalue())
