"""The call machines (outgoing, incoming) and the race helper, driven step by step.

A real SignalingClientProtocol on a StringTransport and a Clock; the agent is
a small stand-in with exactly the members of ``calls.CallAgent``.  The tests
stop before the dial moment, so no socket but the punch port is opened.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.client.calls import ConnectFailed, IncomingCall, OutgoingCall, build_offer
from kerjostunt.client.handshake import HandshakeFailed
from kerjostunt.client.nat.contest import Contest
from kerjostunt.client.nat.readyport import ReadyPort
from kerjostunt.client.signaling import Registration, SignalingClientProtocol
from kerjostunt.wire import kerjo
from kerjostunt.wire.sip.message import Request, make_response
from kerjostunt.wire.sip.parser import StreamParser

DOMAIN = "example.test"
SECRET = bytes(range(32))


class FakeAgent:
    """What a call needs of its agent (calls.CallAgent), and a record of what it was told."""

    def __init__(self, clock: Clock, sig: SignalingClientProtocol) -> None:
        self.reactor = clock
        self.sig = sig
        self.accept_factory: Any = Factory.forProtocol(Protocol)
        self.app_port = None
        self.punch_deadline = 10.0
        self.low_ttl = None
        self.port_mapping: Any = None
        self.ready_port = ReadyPort(clock, lambda: defer.succeed(None), max_age=0)
        self.registration = Registration("alice", "203.0.113.5", 4000, 3600, None)
        self.started: list[Any] = []
        self.ended: list[Any] = []
        self.dialers: list[Any] = []
        self.accepted: list[Any] = []

    def fresh_registration(self) -> defer.Deferred[Any]:
        return defer.succeed((self.sig, self.registration))

    def probe_punch_port(self, sig: Any, registration: Any, local: Any, limit: Any = None) -> defer.Deferred[Any]:
        return defer.succeed([])

    def call_started(self, call: Any) -> None:
        self.started.append(call)

    def call_ended(self, call: Any) -> None:
        self.ended.append(call)

    def dialer_started(self, dialer: Any) -> None:
        self.dialers.append(dialer)

    def dialer_ended(self, dialer: Any) -> None:
        pass

    def peer_accepted(self, connection: Any) -> None:
        self.accepted.append(connection)


class CallTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sig = SignalingClientProtocol(self.clock, "alice", "pw", DOMAIN)
        self.transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.sig.makeConnection(self.transport)
        self.agent = FakeAgent(self.clock, self.sig)
        self.parser = StreamParser()

    def written(self) -> list[Any]:
        """The SIP messages written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return list(self.parser.feed(data))

    def call_headers(self, role: str) -> list[tuple[str, str]]:
        return [(kerjo.CALL_SECRET, SECRET.hex()), (kerjo.ROLE, role), (kerjo.DIAL_IN, "100")]

    def peer_sdp(self) -> bytes:
        return build_offer("bob", "10.0.0.9", 40001, None).to_bytes()


class OutgoingCallTests(CallTestCase):
    def invite(self) -> tuple[OutgoingCall, defer.Deferred[Any], Request]:
        call = OutgoingCall(self.agent, "bob", Factory.forProtocol(Protocol), timeout=20.0)
        d = call.run()
        [invite] = self.written()
        self.assertEqual((invite.method, call.phase()), ("INVITE", "inviting"))
        return call, d, invite

    def answer(self, invite: Request) -> None:
        response = make_response(invite, 200, to_tag="srv")
        for name, value in self.call_headers("initiator"):
            response.headers.add(name, value)
        response.body = self.peer_sdp()
        self.sig.dataReceived(response.to_bytes())

    def test_cancel_while_inviting_sends_cancel(self) -> None:
        call, d, invite = self.invite()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        [cancel] = self.written()
        self.assertEqual((cancel.method, cancel.call_id), ("CANCEL", invite.call_id))
        self.assertEqual((call.phase(), call.holder), ("done", None))
        self.assertEqual(self.agent.ended, [call])

    def test_a_late_answer_after_the_end_is_ignored(self) -> None:
        call, d, invite = self.invite()
        call.stop("enough")
        self.failureResultOf(d, ConnectFailed)
        self.written()
        self.answer(invite)
        self.assertEqual(self.written(), [])  # no ACK, no dialing
        self.assertEqual(self.agent.dialers, [])

    def test_queued_call_counts_its_timeout_from_the_notice(self) -> None:
        """The server holds the call for a turn at a NAT (182): 20 s from the notice, not from the INVITE."""
        call, d, invite = self.invite()
        self.clock.advance(15.0)
        self.sig.dataReceived(make_response(invite, 182, "Queued").to_bytes())
        self.clock.advance(15.0)
        self.assertNoResult(d)
        self.assertEqual(call.phase(), "inviting")
        self.clock.advance(5.0)
        failure = self.failureResultOf(d, ConnectFailed)
        self.assertEqual((failure.value.code, failure.value.reason), (408, "no connection to bob within 40 s"))

    def test_error_answer_fails_with_its_code(self) -> None:
        call, d, invite = self.invite()
        self.sig.dataReceived(make_response(invite, 486, to_tag="srv").to_bytes())
        self.assertEqual(self.failureResultOf(d, ConnectFailed).value.code, 486)
        self.assertEqual(call.phase(), "done")

    def test_answer_acks_and_dials_at_the_moment(self) -> None:
        call, d, invite = self.invite()
        self.answer(invite)
        [ack] = self.written()
        self.assertEqual((ack.method, call.phase()), ("ACK", "dialing"))
        [dialer] = self.agent.dialers
        self.assertEqual(dialer.phase(), "waiting")
        self.assertAlmostEqual(dialer.dial_at, 0.1)

    def test_losing_signaling_while_dialing_keeps_dialing(self) -> None:
        call, d, invite = self.invite()
        self.answer(invite)
        call.signaling_lost()
        self.assertEqual(call.phase(), "dialing")
        self.assertNoResult(d)
        call.stop("test over")
        self.failureResultOf(d, ConnectFailed)

    def test_losing_signaling_while_inviting_ends_the_call(self) -> None:
        call, d, invite = self.invite()
        call.signaling_lost()
        self.assertEqual(self.failureResultOf(d, ConnectFailed).value.reason, "lost the signaling connection")

    def test_stop_while_dialing_reports_the_failure(self) -> None:
        call, d, invite = self.invite()
        self.answer(invite)
        self.written()
        call.stop("no", code=408)
        self.assertEqual(self.failureResultOf(d, ConnectFailed).value.code, 408)
        [info] = self.written()
        self.assertEqual(info.method, "INFO")
        self.assertEqual(kerjo.parse_outcome(info.body).outcome, "failed")
        self.assertTrue(self.agent.dialers[0].finished)
        self.assertEqual(call.phase(), "done")

    def test_cancelling_while_dialing_fails_with_the_reason(self) -> None:
        call, d, invite = self.invite()
        self.answer(invite)
        d.cancel()
        self.assertEqual(self.failureResultOf(d, ConnectFailed).value.reason, "cancelled")


class IncomingCallTests(CallTestCase):
    def invite(self) -> Request:
        invite = self.sig.build_request("INVITE", f"sips:alice@{DOMAIN}", call_id="leg@srv",
                                        headers=self.call_headers("responder"), body=self.peer_sdp())
        self.transport.clear()
        return invite

    def answered(self) -> IncomingCall:
        call = IncomingCall(self.agent, self.sig, self.invite())
        call.handle()
        [ok] = self.written()
        self.assertEqual((ok.code, call.phase()), (200, "answered"))
        return call

    def test_no_accept_factory_is_603(self) -> None:
        self.agent.accept_factory = None
        call = IncomingCall(self.agent, self.sig, self.invite())
        call.handle()
        [refusal] = self.written()
        self.assertEqual((refusal.code, call.phase(), self.agent.started), (603, "done", []))

    def test_ack_starts_the_race(self) -> None:
        call = self.answered()
        call.ack(Request("ACK", f"sips:alice@{DOMAIN}"))
        self.assertEqual(call.phase(), "dialing")
        call.ack(Request("ACK", f"sips:alice@{DOMAIN}"))  # a retransmission changes nothing
        call.stop("test over")

    def test_losing_signaling_before_the_ack_stops_the_dialer(self) -> None:
        call = self.answered()
        call.signaling_lost()
        self.assertEqual(call.phase(), "done")
        self.assertTrue(self.agent.dialers[0].finished)
        self.assertEqual(self.agent.ended, [call])

    def test_no_ack_in_time(self) -> None:
        call = self.answered()
        self.clock.advance(32)
        self.assertEqual(call.phase(), "done")

    def test_stop_while_dialing_reports_the_failure(self) -> None:
        call = self.answered()
        call.ack(Request("ACK", f"sips:alice@{DOMAIN}"))
        call.peer_ended(Request("BYE", f"sips:alice@{DOMAIN}"))
        [info] = self.written()
        self.assertEqual(kerjo.parse_outcome(info.body).outcome, "failed")
        self.assertEqual(call.phase(), "done")

    def test_cancel_while_preparing_is_487_and_the_late_registration_is_ignored(self) -> None:
        registering: defer.Deferred[Any] = defer.Deferred()
        self.agent.fresh_registration = lambda: registering  # type: ignore[method-assign]
        call = IncomingCall(self.agent, self.sig, self.invite())
        call.handle()
        self.assertEqual(call.phase(), "preparing")
        call.cancelled(Request("CANCEL", f"sips:alice@{DOMAIN}"))
        [refusal] = self.written()
        self.assertEqual((refusal.code, call.phase()), (487, "done"))
        registering.callback((self.sig, self.agent.registration))
        self.assertEqual((self.written(), call.holder, self.agent.dialers), ([], None, []))

    def test_cancel_after_the_answer_sends_no_487(self) -> None:
        call = self.answered()
        call.cancelled(Request("CANCEL", f"sips:alice@{DOMAIN}"))
        self.assertEqual((self.written(), call.phase()), ([], "done"))


class _Handshaking:
    """A contender: its handshake ends when the test says so."""

    def __init__(self) -> None:
        self.done: defer.Deferred[Any] = defer.Deferred()
        self.transport = StringTransport()

    @property
    def handshake_done(self) -> defer.Deferred[Any]:
        return self.done


class ContestTests(unittest.TestCase):
    def test_close_cancels_timers_attempts_and_aborts_contenders(self) -> None:
        clock = Clock()
        contest: Contest[str] = Contest(clock)
        fired: list[str] = []
        contest.later(1, fired.append, "timer")
        attempt: defer.Deferred[str] = contest.track(defer.Deferred())
        loser = _Handshaking()
        contest.contend(loser, fired.append, lambda f: fired.append("lost"))
        self.assertEqual(contest.contenders, 1)
        contest.close()
        clock.advance(2)
        self.failureResultOf(attempt, defer.CancelledError)
        self.assertTrue(loser.transport.disconnecting)
        self.assertEqual(fired, [])
        self.assertTrue(contest.over)

    def test_the_winner_is_kept_and_the_result_waits_for_the_cleanups(self) -> None:
        contest: Contest[str] = Contest(Clock())
        closing: defer.Deferred[None] = defer.Deferred()
        contest.on_close(lambda: closing)
        winner, loser = _Handshaking(), _Handshaking()
        contest.contend(winner, contest.win, lambda f: None)
        contest.contend(loser, contest.win, lambda f: None)
        winner.done.callback("app")
        self.assertFalse(winner.transport.disconnecting)
        self.assertTrue(loser.transport.disconnecting)
        self.assertNoResult(contest.result)
        closing.callback(None)
        contest.lose(ValueError("too late"))  # the result fires once
        self.assertEqual(self.successResultOf(contest.result), "app")

    def test_a_failed_handshake_is_reported_once(self) -> None:
        contest: Contest[str] = Contest(Clock())
        reasons: list[Failure] = []
        loser = _Handshaking()
        contest.contend(loser, contest.win, reasons.append)
        loser.done.errback(HandshakeFailed("wrong secret"))
        self.assertEqual([r.getErrorMessage() for r in reasons], ["wrong secret"])
        self.assertEqual(contest.contenders, 0)

    def test_cancelling_the_result_closes(self) -> None:
        clock = Clock()
        contest: Contest[str] = Contest(clock)
        contest.later(1, lambda: None)
        contest.result.cancel()
        self.failureResultOf(contest.result, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
