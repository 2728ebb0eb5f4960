"""The probe service: tokens, observations, and the STUN-over-TCP protocol."""

from __future__ import annotations

import struct

from aioice import stun as aio
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from kerjostunt.server.probe import AlternateAddresses, Observation, ObservationLog, ProbeFactory, ProbeTokens
from kerjostunt.wire import stun

PEER = IPv4Address("TCP", "203.0.113.7", 40123)
HOST = IPv4Address("TCP", "198.51.100.1", 3478)


class TokenTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.tokens = ProbeTokens(self.clock, lifetime=300)

    def test_issue_lookup(self) -> None:
        token, password = self.tokens.issue("alice")
        self.assertNotEqual(token, password)
        self.assertRegex(token, r"^[A-Za-z0-9_-]{16,}$")
        self.assertRegex(password, r"^[A-Za-z0-9_-]{16,}$")
        self.assertEqual(self.tokens.lookup(token), ("alice", password))
        self.assertIsNone(self.tokens.lookup("nope"))
        self.assertNotEqual(self.tokens.issue("alice")[0], token)

    def test_expiry(self) -> None:
        token, _ = self.tokens.issue("alice")
        self.clock.advance(299)
        self.assertIsNotNone(self.tokens.lookup(token))
        self.clock.advance(1)
        self.assertIsNone(self.tokens.lookup(token))
        self.tokens.issue("bob")
        self.assertEqual(len(self.tokens), 1)

    def test_issue_prunes_only_expired_tokens_oldest_first(self) -> None:
        old, _ = self.tokens.issue("alice")
        self.clock.advance(200)
        live, _ = self.tokens.issue("bob")
        self.clock.advance(100)
        self.tokens.issue("carol")
        self.assertEqual(len(self.tokens), 2)
        self.assertIsNone(self.tokens.lookup(old))
        self.assertIsNotNone(self.tokens.lookup(live))
        self.clock.advance(200)
        self.tokens.issue("dave")
        self.assertEqual(len(self.tokens), 2)
        self.assertIsNone(self.tokens.lookup(live))

    def test_revoke_and_bound(self) -> None:
        issued = [self.tokens.issue("alice")[0] for _ in range(6)]
        self.assertIsNone(self.tokens.lookup(issued[0]))
        self.assertIsNotNone(self.tokens.lookup(issued[-1]))
        bob, _ = self.tokens.issue("bob")
        self.tokens.revoke_user("alice")
        self.assertTrue(all(self.tokens.lookup(t) is None for t in issued))
        self.assertIsNotNone(self.tokens.lookup(bob))


    def test_bound_to_the_registered_address(self) -> None:
        self.tokens.registered_from("alice", "203.0.113.7")
        token, password = self.tokens.issue("alice")
        self.assertEqual(self.tokens.lookup(token, "203.0.113.7"), ("alice", password))
        self.assertEqual(self.tokens.lookup(token, "::ffff:203.0.113.7"), ("alice", password))
        self.assertIsNone(self.tokens.lookup(token, "198.51.100.66"))
        unbound, _ = self.tokens.issue("bob")  # never registered here: works from anywhere
        self.assertIsNotNone(self.tokens.lookup(unbound, "198.51.100.66"))

    def test_registering_from_a_new_address_revokes_the_old_tokens(self) -> None:
        self.tokens.registered_from("alice", "203.0.113.7")
        old, _ = self.tokens.issue("alice")
        self.tokens.registered_from("alice", "203.0.113.7")  # a refresh from the same address
        self.assertIsNotNone(self.tokens.lookup(old, "203.0.113.7"))
        self.tokens.registered_from("alice", "192.0.2.9")
        new, _ = self.tokens.issue("alice")
        self.assertIsNone(self.tokens.lookup(old, "203.0.113.7"))
        self.assertIsNotNone(self.tokens.lookup(new, "192.0.2.9"))


class LogTests(TestCase):
    def test_bounded_and_listeners(self) -> None:
        log = ObservationLog(per_user=3)
        seen = []
        log.subscribe(seen.append)
        log.subscribe(lambda o: 1 / 0)  # a broken listener does not stop anything
        obs = [Observation("alice", 5000 + i, "203.0.113.7", 6000 + i, "198.51.100.1", 3478,
                           float(i)) for i in range(5)]
        for o in obs:
            log.add(o)
        log.add(Observation("alice", None, "203.0.113.7", 1, "198.51.100.1", 3478, 9.0))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 6)
        self.assertEqual(len(seen), 6)
        self.assertEqual(log.for_user("alice")[0], obs[3])
        samples = log.samples("alice")
        self.assertEqual([s.local_port for s in samples], [5003, 5004])
        self.assertEqual(samples[0].mapped_port, 6003)
        log.forget("alice")
        self.assertEqual(log.for_user("alice"), [])
        self.assertEqual(log.samples("nobody"), [])


class ProtocolTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.tokens = ProbeTokens(self.clock)
        self.log = ObservationLog()
        self.factory = ProbeFactory(self.clock, self.tokens, self.log, idle_timeout=10)
        self.token, self.password = self.tokens.issue("alice")
        self.key = self.password.encode()

    def connect(self, factory=None):
        proto = (factory or self.factory).buildProtocol(PEER)
        transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport

    def responses(self, transport) -> list[tuple[stun.StunMessage, bytes]]:
        out = stun.StunStreamDecoder().feed(transport.value())
        transport.clear()
        return out

    def test_plain_request(self) -> None:
        proto, tr = self.connect()
        raw, tid = stun.binding_request()
        proto.dataReceived(raw)
        [(msg, _)] = self.responses(tr)
        self.assertEqual(msg.msg_type, stun.BINDING_SUCCESS)
        self.assertEqual(stun.parse_binding_response(msg, tid), ("203.0.113.7", 40123))
        self.assertEqual(stun.decode_address(msg.get(stun.MAPPED_ADDRESS)), ("203.0.113.7", 40123))
        self.assertEqual(msg.get(stun.SOFTWARE), b"kerjostunt")
        self.assertIsNone(msg.get(stun.OTHER_ADDRESS))
        self.assertEqual(self.log.for_user("alice"), [])

    def test_token_accepted_and_recorded(self) -> None:
        self.clock.advance(42)
        proto, tr = self.connect()
        raw, tid = stun.binding_request(username=self.token, key=self.key, local_port=5555)
        proto.dataReceived(raw)
        [(msg, wire)] = self.responses(tr)
        self.assertTrue(stun.check_integrity(wire, self.key))
        self.assertTrue(msg.has(stun.MESSAGE_INTEGRITY))
        self.assertEqual(stun.parse_binding_response(wire, tid, key=self.key),
                         ("203.0.113.7", 40123))
        self.assertEqual(self.log.for_user("alice"), [
            Observation("alice", 5555, "203.0.113.7", 40123, "198.51.100.1", 3478, 42.0)])

    def test_sha256_accepted(self) -> None:
        proto, tr = self.connect()
        raw, tid = stun.binding_request(username=self.token, key=self.key, local_port=1,
                                        integrity_sha256=True)
        proto.dataReceived(raw)
        [(msg, wire)] = self.responses(tr)
        self.assertEqual(msg.msg_type, stun.BINDING_SUCCESS)
        self.assertTrue(msg.has(stun.MESSAGE_INTEGRITY_SHA256))
        self.assertTrue(stun.check_integrity(wire, self.key))
        self.assertEqual(len(self.log.for_user("alice")), 1)

    def assert_error(self, tr, code: int) -> stun.StunMessage:
        [(msg, _)] = self.responses(tr)
        self.assertEqual(msg.msg_type, stun.BINDING_ERROR)
        self.assertEqual(stun.decode_error_code(msg.get(stun.ERROR_CODE))[0], code)
        return msg

    def test_forged_integrity(self) -> None:
        proto, tr = self.connect()
        raw, _ = stun.binding_request(username=self.token, key=b"guessed", local_port=1)
        proto.dataReceived(raw)
        msg = self.assert_error(tr, 401)
        self.assertFalse(msg.has(stun.MESSAGE_INTEGRITY))
        self.assertEqual(self.log.for_user("alice"), [])
        self.assertTrue(tr.connected)

    def test_expired_token(self) -> None:
        self.clock.advance(301)
        proto, tr = self.connect()
        raw, _ = stun.binding_request(username=self.token, key=self.key, local_port=1)
        proto.dataReceived(raw)
        self.assert_error(tr, 401)
        self.assertEqual(self.log.for_user("alice"), [])

    def test_unknown_token(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(stun.binding_request(username="who", key=self.key)[0])
        self.assert_error(tr, 401)

    def test_username_without_integrity(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(stun.binding_request(username=self.token)[0])
        self.assert_error(tr, 400)
        self.assertEqual(self.log.for_user("alice"), [])

    def test_unknown_required_attribute(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(stun.encode(stun.BINDING_REQUEST, bytes(12), [(0x7777, b"x")]))
        msg = self.assert_error(tr, 420)
        self.assertEqual(msg.get(stun.UNKNOWN_ATTRIBUTES), b"\x77\x77")

    def test_malformed_body_gets_400(self) -> None:
        proto, tr = self.connect()
        frame = struct.pack("!HHI12s", 1, 4, stun.MAGIC_COOKIE, bytes(12)) + b"\x00\x06\x00\x09"
        proto.dataReceived(frame)
        self.assert_error(tr, 400)
        self.assertTrue(tr.connected)

    def test_unknown_method_gets_400(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(stun.encode(0x0002, bytes(12), []))
        [(msg, _)] = self.responses(tr)
        self.assertEqual(msg.msg_type, 0x0112)

    def test_indication_ignored(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(stun.encode(stun.BINDING_INDICATION, bytes(12), []))
        self.assertEqual(tr.value(), b"")

    def test_garbage_closes(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(tr.value(), b"")
        self.assertTrue(tr.disconnecting)

    def test_oversized_closes(self) -> None:
        proto, tr = self.connect()
        proto.dataReceived(struct.pack("!HHI12s", 1, 4000, stun.MAGIC_COOKIE, bytes(12)))
        self.assertTrue(tr.disconnecting)
        proto.dataReceived(b"\x00" * 100)  # ignored once closing
        self.assertEqual(tr.value(), b"")

    def test_several_requests_in_order(self) -> None:
        proto, tr = self.connect()
        reqs = [stun.binding_request(username=self.token, key=self.key, local_port=p)
                for p in (1, 2)]
        bad = stun.binding_request(username=self.token, key=b"x")[0]
        plain = stun.binding_request()
        data = reqs[0][0] + bad + reqs[1][0] + plain[0]
        proto.dataReceived(data[:30])
        proto.dataReceived(data[30:])
        out = self.responses(tr)
        self.assertEqual([m.transaction_id for m, _ in out],
                         [reqs[0][1], stun.decode(bad).transaction_id, reqs[1][1], plain[1]])
        self.assertEqual([m.msg_type for m, _ in out],
                         [stun.BINDING_SUCCESS, stun.BINDING_ERROR, stun.BINDING_SUCCESS,
                          stun.BINDING_SUCCESS])
        self.assertEqual([o.local_port for o in self.log.for_user("alice")], [1, 2])

    def test_max_requests(self) -> None:
        factory = ProbeFactory(self.clock, self.tokens, self.log, max_requests=2)
        proto, tr = self.connect(factory)
        proto.dataReceived(b"".join(stun.binding_request()[0] for _ in range(3)))
        self.assertEqual(len(self.responses(tr)), 2)
        self.assertTrue(tr.disconnecting)

    def test_closing_answers_nothing_more(self) -> None:
        """Once closing (here: over the limit), input is ignored and no idle timer runs."""
        factory = ProbeFactory(self.clock, self.tokens, self.log, max_requests=1)
        proto, tr = self.connect(factory)
        proto.dataReceived(b"".join(stun.binding_request()[0] for _ in range(2)))
        self.assertEqual(len(self.responses(tr)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.dataReceived(stun.binding_request()[0])
        self.assertEqual(tr.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        proto.connectionLost(None)
        proto.dataReceived(stun.binding_request()[0])  # and after the loss too
        self.assertEqual(tr.value(), b"")

    def test_idle_timeout(self) -> None:
        """Part of a request does not move the deadline (issue 13); tests.test_probe_limits has more."""
        proto, tr = self.connect()
        self.clock.advance(9)
        proto.dataReceived(stun.binding_request()[0][:10])
        self.assertFalse(tr.disconnecting)
        self.clock.advance(1)
        self.assertTrue(tr.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_cancels_timer(self) -> None:
        proto, tr = self.connect()
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_address(self) -> None:
        factory = ProbeFactory(self.clock, self.tokens, self.log,
                               other_address=("198.51.100.2", 3479))
        proto, tr = self.connect(factory)
        proto.dataReceived(stun.binding_request()[0])
        [(msg, _)] = self.responses(tr)
        self.assertEqual(stun.decode_address(msg.get(stun.OTHER_ADDRESS)), ("198.51.100.2", 3479))
        self.assertEqual(stun.decode_address(msg.get(stun.RESPONSE_ORIGIN)),
                         ("198.51.100.1", 3478))

    def test_empty_change_request_is_a_plain_request(self) -> None:
        """stuntman's stunclient sends CHANGE-REQUEST with no flag in every request."""
        proto, tr = self.connect()
        tid = stun.new_transaction_id()
        proto.dataReceived(stun.encode(stun.BINDING_REQUEST, tid, [(stun.CHANGE_REQUEST, stun.encode_change_request())]))
        [(msg, _)] = self.responses(tr)
        self.assertEqual(msg.msg_type, stun.BINDING_SUCCESS)
        self.assertEqual(stun.decode_xor_address(msg.get(stun.XOR_MAPPED_ADDRESS), tid), ("203.0.113.7", 40123))

    def test_change_of_address_over_tcp_is_400(self) -> None:
        for flags in ((True, False), (False, True), (True, True)):
            proto, tr = self.connect()
            proto.dataReceived(stun.encode(stun.BINDING_REQUEST, stun.new_transaction_id(),
                                           [(stun.CHANGE_REQUEST, stun.encode_change_request(*flags))]))
            [(msg, _)] = self.responses(tr)
            self.assertEqual(msg.msg_type, stun.BINDING_ERROR)
            self.assertEqual(stun.decode_error_code(msg.get(stun.ERROR_CODE)),
                             (400, "Bad Request: no change of address over TCP"))

    def test_other_address_is_the_other_ip_and_port(self) -> None:
        pair = AlternateAddresses("198.51.100.2", [3478, 3479], primary_ip="198.51.100.1")
        self.assertEqual(pair.other(("198.51.100.1", 3478)), ("198.51.100.2", 3479))
        self.assertEqual(pair.other(("198.51.100.1", 3479)), ("198.51.100.2", 3478))
        self.assertEqual(pair.other(("198.51.100.2", 3478)), ("198.51.100.1", 3479))
        self.assertEqual(pair.other(("198.51.100.2", 3479)), ("198.51.100.1", 3478))
        self.assertIsNone(pair.other(("198.51.100.1", 5000)))
        wildcard = AlternateAddresses("198.51.100.2", [3478, 3479])
        self.assertEqual(wildcard.other(("10.0.0.1", 3478)), ("198.51.100.2", 3479))
        self.assertIsNone(wildcard.other(("198.51.100.2", 3478)))

    def test_ipv4_mapped_peer(self) -> None:
        from twisted.internet.address import IPv6Address
        proto = self.factory.buildProtocol(None)
        tr = StringTransport(hostAddress=IPv6Address("TCP", "::ffff:198.51.100.1", 3478),
                             peerAddress=IPv6Address("TCP", "::ffff:203.0.113.7", 999))
        proto.makeConnection(tr)
        raw, tid = stun.binding_request(username=self.token, key=self.key, local_port=7)
        proto.dataReceived(raw)
        self.assertEqual(stun.parse_binding_response(tr.value(), tid), ("203.0.113.7", 999))
        [obs] = self.log.for_user("alice")
        self.assertEqual((obs.mapped_ip, obs.server_ip), ("203.0.113.7", "198.51.100.1"))


class _Collect(protocol.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= 20:
            length = struct.unpack("!H", self.data[2:4])[0]
            if len(self.data) >= 20 + length and not self.done.called:
                self.done.callback(self.data[:20 + length])
                self.transport.loseConnection()


class AioiceOverTCPTests(TestCase):
    """A standard STUN client that this project did not write (aioice's codec)
    gets a correct XOR-MAPPED-ADDRESS from the probe port over TCP."""

    @defer.inlineCallbacks
    def test_aioice_client(self):
        tokens = ProbeTokens(reactor)
        log = ObservationLog()
        port = reactor.listenTCP(0, ProbeFactory(reactor, tokens, log), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        request = aio.Message(aio.Method.BINDING, aio.Class.REQUEST)
        request.add_fingerprint()
        collector = _Collect(bytes(request))
        cc = protocol.ClientCreator(reactor, lambda: collector)
        proto = yield cc.connectTCP("127.0.0.1", port.getHost().port)
        local = proto.transport.getHost()
        raw = yield collector.done
        response = aio.parse_message(raw)
        self.assertEqual(response.message_method, aio.Method.BINDING)
        self.assertEqual(response.message_class, aio.Class.RESPONSE)
        self.assertEqual(response.transaction_id, request.transaction_id)
        self.assertEqual(response.attributes["XOR-MAPPED-ADDRESS"], (local.host, local.port))
        self.assertEqual(log.for_user("alice"), [])

    @defer.inlineCallbacks
    def test_aioice_client_with_credentials(self):
        tokens = ProbeTokens(reactor)
        log = ObservationLog()
        token, password = tokens.issue("alice")
        port = reactor.listenTCP(0, ProbeFactory(reactor, tokens, log), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        request = aio.Message(aio.Method.BINDING, aio.Class.REQUEST)
        request.attributes["USERNAME"] = token
        request.add_message_integrity(password.encode())
        request.add_fingerprint()
        collector = _Collect(bytes(request))
        proto = yield protocol.ClientCreator(reactor, lambda: collector).connectTCP(
            "127.0.0.1", port.getHost().port)
        local = proto.transport.getHost()
        raw = yield collector.done
        response = aio.parse_message(raw)
        self.assertEqual(response.attributes["XOR-MAPPED-ADDRESS"], (local.host, local.port))
        self.assertTrue(response.check_message_integrity(password.encode()))
        [obs] = log.for_user("alice")
        self.assertEqual((obs.mapped_ip, obs.mapped_port), (local.host, local.port))
        self.assertEqual(obs.server_port, port.getHost().port)
        self.assertIsNone(obs.local_port)  # aioice does not send KERJO-LOCAL-PORT


class BehaviourDiscoveryOverTCPTests(TestCase):
    """RFC 5780 4.3 over TCP, as stuntman's ``stunclient --mode behavior --protocol tcp`` runs it,
    with aioice's codec: a request to the primary address names OTHER-ADDRESS; the client
    connects to (other IP, primary port) and (other IP, other port) and compares the mapped
    addresses. On loopback there is no NAT: every mapping is the connection's own address,
    and each answer's RESPONSE-ORIGIN is the address connected to."""

    @defer.inlineCallbacks
    def _ask(self, host: str, port: int):  # type: ignore[no-untyped-def]
        request = aio.Message(aio.Method.BINDING, aio.Class.REQUEST)
        request.attributes["CHANGE-REQUEST"] = 0
        request.add_fingerprint()
        collector = _Collect(bytes(request))
        proto = yield protocol.ClientCreator(reactor, lambda: collector).connectTCP(host, port)
        local = proto.transport.getHost()
        response = aio.parse_message((yield collector.done))
        self.assertEqual(response.message_class, aio.Class.RESPONSE)
        return response.attributes, (local.host, local.port)

    @defer.inlineCallbacks
    def test_mapping_behaviour_discovery(self):  # type: ignore[no-untyped-def]
        tokens, log = ProbeTokens(reactor), ObservationLog()
        ports: list[int] = [0, 0]
        factory = ProbeFactory(reactor, tokens, log,
                               other_address=AlternateAddresses("127.0.0.2", ports, primary_ip="127.0.0.1"))
        # The primary port on both addresses first: another program may hold it on 127.0.0.2.
        for _ in range(20):
            first = reactor.listenTCP(0, factory, interface="127.0.0.1")
            ports[0] = first.getHost().port
            try:
                alt_primary = reactor.listenTCP(ports[0], factory, interface="127.0.0.2")
                break
            except CannotListenError:
                yield first.stopListening()
        self.addCleanup(first.stopListening)
        self.addCleanup(alt_primary.stopListening)
        second = reactor.listenTCP(0, factory, interface="127.0.0.2")
        self.addCleanup(second.stopListening)
        ports[1] = second.getHost().port

        attrs, local = yield self._ask("127.0.0.1", ports[0])
        self.assertEqual(attrs["XOR-MAPPED-ADDRESS"], local)
        self.assertEqual(attrs["RESPONSE-ORIGIN"], ("127.0.0.1", ports[0]))
        self.assertEqual(attrs["OTHER-ADDRESS"], ("127.0.0.2", ports[1]))
        other_ip, other_port = attrs["OTHER-ADDRESS"]
        attrs2, local2 = yield self._ask(other_ip, ports[0])
        self.assertEqual(attrs2["XOR-MAPPED-ADDRESS"], local2)
        self.assertEqual(attrs2["RESPONSE-ORIGIN"], ("127.0.0.2", ports[0]))
        self.assertEqual(attrs2["OTHER-ADDRESS"], ("127.0.0.1", ports[1]))
        attrs3, local3 = yield self._ask(other_ip, other_port)
        self.assertEqual(attrs3["XOR-MAPPED-ADDRESS"], local3)
        self.assertEqual(attrs3["RESPONSE-ORIGIN"], ("127.0.0.2", ports[1]))
