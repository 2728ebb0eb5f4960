"""The client user agent's transaction matching and keepalive handling, on StringTransport."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire.sip.message import Request, make_response


class TransactionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = SignalingClientProtocol(self.clock, "alice", "pw", "kerjo.test")
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def _cancel_for(self, invite: Request) -> Request:
        cancel = Request("CANCEL", invite.uri, invite.headers.copy())
        cseq_number = invite.cseq[0]  # type: ignore[index]
        cancel.headers.set("CSeq", f"{cseq_number} CANCEL")
        return cancel

    def test_cancel_sharing_the_invite_branch_is_its_own_transaction(self) -> None:
        invite = self.proto.build_request("INVITE", "sips:bob@kerjo.test")
        invite_result = self.proto.send_request(invite)
        cancel = self._cancel_for(invite)
        cancel_result = self.proto.send_request(cancel)
        self.proto.dataReceived(make_response(cancel, 200).to_bytes())
        self.assertEqual(self.successResultOf(cancel_result).code, 200)
        self.assertNoResult(invite_result)
        self.proto.dataReceived(make_response(invite, 487).to_bytes())
        self.assertEqual(self.successResultOf(invite_result).code, 487)

    def test_provisional_responses_do_not_finish(self) -> None:
        invite = self.proto.build_request("INVITE", "sips:bob@kerjo.test")
        result = self.proto.send_request(invite)
        self.proto.dataReceived(make_response(invite, 100).to_bytes())
        self.assertNoResult(result)
        self.proto.dataReceived(make_response(invite, 200).to_bytes())
        self.assertEqual(self.successResultOf(result).code, 200)

    def test_timeout(self) -> None:
        result = self.proto.request("OPTIONS", "sips:kerjo.test", timeout=5)
        self.clock.advance(5)
        self.failureResultOf(result)

    def test_queued_restarts_the_timeout_and_is_heard(self) -> None:
        """``182 Queued``: the server holds the INVITE on purpose (a turn at a NAT)."""
        heard: list[int] = []
        invite = self.proto.build_request("INVITE", "sips:bob@kerjo.test")
        result = self.proto.send_request(invite, timeout=5, on_provisional=lambda r: heard.append(r.code))
        self.clock.advance(4)
        self.proto.dataReceived(make_response(invite, 182, "Queued").to_bytes())
        self.clock.advance(4)
        self.assertNoResult(result)
        self.proto.dataReceived(make_response(invite, 100).to_bytes())
        self.clock.advance(1)
        self.failureResultOf(result)
        self.assertEqual(heard, [182, 100])

    def test_server_ping_answered_with_pong(self) -> None:
        self.transport.clear()
        self.proto.dataReceived(b"\r\n\r\n")
        self.assertEqual(self.transport.value(), b"\r\n")

    def test_ping_measures_rtt(self) -> None:
        result = self.proto.ping()
        self.assertEqual(self.transport.value()[-4:], b"\r\n\r\n")
        self.clock.advance(0.25)
        self.proto.dataReceived(b"\r\n")
        self.assertAlmostEqual(self.successResultOf(result), 0.25)

    def test_garbage_from_server_closes(self) -> None:
        self.proto.dataReceived(b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
