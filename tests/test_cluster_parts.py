"""The cluster's parts without a database: envelopes, the view of the others, relays, stand-in legs."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.server.cluster.envelope import COMPRESS_OVER, Envelope, EnvelopeError, decode, encode, sender_of
from kerjostunt.server.cluster.legs import RELAY_LINGER, Relays, RemoteLeg
from kerjostunt.server.cluster.view import ClusterView, RemoteBinding
from kerjostunt.store.presence import BindingRow, InstanceInfo, Lease
from kerjostunt.wire.prediction import NATDescription, Prediction
from kerjostunt.wire.sip.message import Headers, Request, Response
from kerjostunt.wire.sip.parser import parse_message

INVITE = (b"INVITE sips:bob@kerjo SIP/2.0\r\nVia: SIP/2.0/TLS 10.0.0.1:5061;branch=z9hG4bK-1\r\n"
          b"From: <sips:alice@kerjo>;tag=a1\r\nTo: <sips:bob@kerjo>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
          b"Content-Type: application/sdp\r\nContent-Length: 9\r\n\r\nv=0\r\n\xff\x00zz")


def lease(instance: str, remaining: float) -> Lease:
    return Lease(InstanceInfo(instance, "h", 5061, (3478, 3479)), remaining)


class EnvelopeTests(unittest.TestCase):
    def test_round_trip_with_a_prediction(self) -> None:
        nat = NATDescription(True, "endpoint-independent", "sequential", 1, "198.51.100.7")
        answer = Response(200, "OK", Headers([("Call-ID", "c1"), ("CSeq", "1 INVITE")]), b"v=0\r\n\xe9")
        envelope = Envelope("from", "i1", 7, user="bob", message=answer,
                            prediction=Prediction("198.51.100.7", (4001, 4002), 0.9, nat), rtt=0.012)
        back = decode(encode(envelope))
        self.assertEqual(back, envelope)

    def test_bindings_and_users(self) -> None:
        bound = Envelope("bound", "i1", 1, bindings=[("bob", "10.0.0.1", 4000, 12.5)])
        self.assertEqual(decode(encode(bound)).bindings, [("bob", "10.0.0.1", 4000, 12.5)])
        gone = Envelope("gone", "i1", 2, users=["bob", "carol"])
        self.assertEqual(decode(encode(gone)).users, ["bob", "carol"])

    def test_a_large_message_is_deflated(self) -> None:
        invite = Request("INVITE", "sips:bob@kerjo", Headers([("X-Filler", "a" * (3 * COMPRESS_OVER))]))
        payload = encode(Envelope("to", "i1", 3, user="bob", message=invite))
        self.assertTrue(payload.startswith("i1 z:"))
        self.assertLess(len(payload), COMPRESS_OVER)
        self.assertEqual(decode(payload).message, invite)
        self.assertNotIn("\n", payload)  # payloads share notifications, newline-separated

    def test_the_sender_is_read_without_decoding(self) -> None:
        payload = encode(Envelope("bound", "i1", 1, bindings=[("bob", "10.0.0.1", 4000, 12.5)]))
        self.assertEqual(sender_of(payload), "i1")
        self.assertEqual(sender_of("garbage"), "")
        self.assertNotIn("\n", encode(Envelope("to", "i1", 2, user="bob", message=Request("ACK", "sips:bob@kerjo"))))

    def test_a_message_rebuilt_from_its_parts_is_the_same_message(self) -> None:
        invite = parse_message(INVITE)
        back = decode(encode(Envelope("to", "i1", 1, user="bob", message=invite))).message
        self.assertEqual(back, invite)
        self.assertEqual(back.to_bytes(), invite.to_bytes())  # type: ignore[union-attr]

    def test_a_header_with_a_line_break_is_refused(self) -> None:
        forged = '{"k":"to","s":1,"u":"bob","m":["Q","ACK","sips:bob@kerjo",[["To","x\\r\\nVia: y"]],""]}'
        self.assertRaises(EnvelopeError, decode, "i1 " + forged)
        self.assertRaises(EnvelopeError, decode, 'i1 {"k":"to","s":1,"m":["X","ACK","u",[],""]}')

    def test_garbage_is_an_envelope_error(self) -> None:
        for payload in ("", "{", "x {", "x", " {}", "x z:!!!", "x {\"s\": 1}", "x {\"k\":\"bound\",\"b\":[[1]]}"):
            self.assertRaises(EnvelopeError, decode, payload)


class ViewTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.view = ClusterView(self.clock, "me", lease=6.0)
        self.moved: list[tuple[str, str]] = []
        self.view.subscribe(lambda user, old: self.moved.append((user, old.instance_id)))

    def test_a_binding_counts_while_its_instance_lives(self) -> None:
        self.view.leases_read([lease("b", 6.0), lease("me", 6.0)])
        self.view.bound([BindingRow("bob", "b", "10.0.0.1", 4000, 1.0)])
        self.assertEqual(self.view.where("bob"), RemoteBinding("bob", "b", "10.0.0.1", 4000, 1.0))
        self.assertEqual(self.view.instances(), ["b"])
        self.clock.advance(6.5)  # no renewal read: the lease ran out
        self.assertIsNone(self.view.where("bob"))
        self.assertEqual(self.view.leases_read([lease("b", -0.5)]), ["b"])
        self.assertEqual(self.moved, [("bob", "b")])
        self.assertEqual(len(self.view), 0)

    def test_a_message_keeps_an_instance_alive_before_its_lease_is_read(self) -> None:
        self.view.heard_from("c")
        self.view.bound([BindingRow("carol", "c", "10.0.0.2", 4000, 1.0)])
        self.assertIsNotNone(self.view.where("carol"))

    def test_bindings_of_this_instance_are_not_elsewhere(self) -> None:
        self.view.heard_from("me")
        self.view.bound([BindingRow("alice", "me", "10.0.0.3", 4000, 1.0)])
        self.assertIsNone(self.view.where("alice"))

    def test_moving_and_gone(self) -> None:
        self.view.heard_from("b")
        self.view.heard_from("c")
        self.view.bound([BindingRow("bob", "b", "10.0.0.1", 4000, 1.0)])
        self.view.bound([BindingRow("bob", "c", "10.0.0.1", 4001, 2.0)])
        self.assertEqual(self.moved, [("bob", "b")])
        self.view.gone("b", ["bob"])  # late news from where bob was: he stays on c
        self.assertEqual(self.view.where("bob").instance_id, "c")  # type: ignore[union-attr]
        self.view.gone("c", ["bob"])
        self.assertIsNone(self.view.where("bob"))
        self.view.bound([BindingRow("dave", "b", "10.0.0.4", 4000, 3.0)])
        self.view.bound_here("dave")
        self.assertIsNone(self.view.where("dave"))
        self.assertEqual(self.moved, [("bob", "b"), ("bob", "c"), ("dave", "b")])

    def test_the_second_read_adds_only_unknown_users(self) -> None:
        self.view.heard_from("b")
        self.view.heard_from("c")
        self.view.bound([BindingRow("bob", "c", "ip", 1, 5.0)])  # news: bob is on c now
        self.view.add_missing([BindingRow("bob", "b", "ip", 1, 1.0), BindingRow("carol", "b", "ip", 2, 1.0)])
        self.assertEqual(self.view.where("bob").instance_id, "c")  # type: ignore[union-attr]
        self.assertEqual(self.view.where("carol").instance_id, "b")  # type: ignore[union-attr]

    def test_a_reload_replaces_what_changed(self) -> None:
        self.view.heard_from("b")
        self.view.bound([BindingRow("bob", "b", "ip", 1, 1.0), BindingRow("carol", "b", "ip", 2, 1.0)])
        self.view.replace_all([BindingRow("bob", "b", "ip", 1, 1.0)])
        self.assertEqual(self.moved, [("carol", "b")])
        self.assertIsNotNone(self.view.where("bob"))


class Conn:
    def __init__(self) -> None:
        self.peer = ("10.0.0.9", 5000)
        self.user_ids = {"bob"}
        self.rtt = 0.01


class RelayTests(unittest.TestCase):
    def test_messages_of_a_relayed_call_are_found_by_connection_and_call_id(self) -> None:
        clock = Clock()
        relays = Relays(clock)
        conn, other = Conn(), Conn()
        relays.delivered("call-1", "a", "bob", conn)  # type: ignore[arg-type]
        self.assertEqual(relays.of(conn, "call-1").origin, "a")  # type: ignore[arg-type, union-attr]
        self.assertIsNone(relays.of(other, "call-1"))  # type: ignore[arg-type]
        self.assertIsNone(relays.of(conn, "call-2"))  # type: ignore[arg-type]
        self.assertEqual([r.origin for r in relays.lost(conn)], ["a"])  # type: ignore[arg-type]
        self.assertEqual(len(relays), 0)

    def test_idle_relays_are_swept(self) -> None:
        clock = Clock()
        relays = Relays(clock)
        conn = Conn()
        relays.delivered("call-1", "a", "bob", conn)  # type: ignore[arg-type]
        clock.advance(RELAY_LINGER / 2)
        relays.of(conn, "call-1")  # type: ignore[arg-type]
        clock.advance(RELAY_LINGER / 2 + 1)
        relays.sweep()
        self.assertEqual(len(relays), 1)  # used half-way: still lingering
        clock.advance(RELAY_LINGER)
        relays.sweep()
        self.assertEqual(len(relays), 0)
        self.assertEqual(relays.lost(conn), [])  # type: ignore[arg-type]


class RemoteLegTests(unittest.TestCase):
    def test_sends_go_to_its_instance_and_the_rtt_includes_the_bus(self) -> None:
        sent: list[tuple[str, str]] = []
        leg = RemoteLeg("b", "bob", ("10.0.0.1", 4000), lambda leg, m: sent.append((leg.instance_id, m.method)))  # type: ignore[union-attr]
        self.assertIsNone(leg.rtt)  # no answer yet: the call uses its default
        leg.reported_rtt, leg.bus_rtt = 0.020, 0.002
        self.assertAlmostEqual(leg.rtt, 0.022)  # type: ignore[arg-type]
        leg.send(Request("INVITE", "sips:bob@kerjo"))
        self.assertEqual(sent, [("b", "INVITE")])
        leg.close()  # the connection is the other instance's: nothing happens
        self.assertEqual(leg.user_ids, {"bob"})
