"""
A race's deadline and the handshakes in flight (nat/contest.py ``Contest.expire``).

Two real HandshakeProtocols, one per side, each side with its own Contest,
joined by StringTransports whose bytes move only when the test says so: the
test picks the exact moment a side's deadline fires (between the responder's
``KJ1 R`` and the initiator's ``KJ1 I``, the window the NAT lab's 40-peer
group fell into) and checks that both sides end with the same verdict.  An
aborted side's next delivery is its RST: the other side's connection is lost.
Clock time throughout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from kerjostunt.client.calls import PREAMBLE, AppPortProtocol, CallSetup, Dialer, DialerConfig, build_offer
from kerjostunt.client.handshake import HandshakeFactory, HandshakeProtocol, compute_mac
from kerjostunt.client.nat.contest import Contest, in_flight
from kerjostunt.client.nat.punch import PunchFailed
from tests.test_client_calls import _Handshaking as Handshaking

SECRET = b"per-call secret"
CALL = "call-7"
ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class Side:
    """One peer: its handshake factory, its race (a Contest) and the verdict the race reached."""

    def __init__(self, clock: Clock, role: str) -> None:
        self.factory = HandshakeFactory(SECRET, CALL, role, Factory.forProtocol(Protocol), clock)
        self.contest: Contest[Any] = Contest(clock)
        self.verdict: Any = None
        self.outcome: Any = None
        self.contest.result.addBoth(self._decided)

    def _decided(self, outcome: Any) -> None:
        self.outcome = outcome
        self.verdict = "failed" if isinstance(outcome, Failure) else "connected"

    def contend(self, protocol: HandshakeProtocol) -> None:
        self.contest.contend(protocol, self.contest.win, lambda reason: None)

    def deadline(self) -> None:
        """What punch.py and birthday.py do when their deadline passes."""
        self.contest.expire(PunchFailed("no connection within 4 s"), self.factory.proof_wait)


class Connection:
    """One TCP connection between the two sides' handshakes; bytes move only on ``deliver``."""

    def __init__(self, initiator: Side, responder: Side) -> None:
        self.i = initiator.factory.buildProtocol(ADDR)
        self.r = responder.factory.buildProtocol(ADDR)
        self.ti, self.tr = StringTransport(), StringTransport()
        self.i.makeConnection(self.ti)
        self.r.makeConnection(self.tr)
        initiator.contend(self.i)
        responder.contend(self.r)
        self.closed = False

    def deliver(self, to: str) -> bytes:
        """Move what one side wrote to the other, in order: bytes written before an abort
        still arrive; then (or when bytes reach an aborted end) the reset ends the connection."""
        if self.closed:
            return b""
        src, dst, dst_transport = (self.ti, self.r, self.tr) if to == "responder" else (self.tr, self.i, self.ti)
        data = src.value()
        if data and not dst_transport.disconnecting:
            src.clear()
            dst.dataReceived(data)
            return data
        if self.ti.disconnecting or self.tr.disconnecting:
            self.closed = True
            for protocol, transport in ((self.i, self.ti), (self.r, self.tr)):
                why = ConnectionAborted() if transport.disconnecting else ConnectionLost("reset by the peer")
                protocol.connectionLost(Failure(why))
        return b""

    def both_ends_open(self) -> bool:
        return not (self.closed or self.ti.disconnecting or self.tr.disconnecting)


class DeadlineInTheHandshakeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.initiator = Side(self.clock, "initiator")
        self.responder = Side(self.clock, "responder")
        self.conn = Connection(self.initiator, self.responder)

    def verdicts(self) -> tuple[Any, Any]:
        return self.initiator.verdict, self.responder.verdict

    def test_lose_in_the_window_splits_the_verdict(self) -> None:
        """How it was: the responder's deadline dropped everything after its R. The initiator,
        committed when it sent I, reported a connection that the responder's RST then killed."""
        self.conn.deliver("responder")  # HELLO
        self.assertTrue(in_flight(self.conn.r))  # R is out
        self.responder.contest.lose(PunchFailed("no connection within 4 s"))
        self.assertTrue(self.conn.deliver("initiator").startswith(b"KJ1 R "))  # R was on its way
        self.assertEqual(self.verdicts(), ("connected", "failed"))
        self.conn.deliver("responder")  # the I meets the RST
        self.assertFalse(self.conn.both_ends_open())

    def test_responder_deadline_between_r_and_i_keeps_the_connection(self) -> None:
        """The bug's window with ``expire``: R is a promise, the I that follows still wins."""
        self.conn.deliver("responder")  # HELLO; the responder answers with R
        self.responder.deadline()
        self.assertTrue(self.responder.contest.over)  # no more trying ...
        self.assertIsNone(self.responder.verdict)  # ... but no verdict yet
        self.assertFalse(self.conn.tr.disconnecting)
        self.conn.deliver("initiator")  # R: the initiator sends I and commits
        self.assertEqual(self.initiator.verdict, "connected")
        self.conn.deliver("responder")  # I
        self.assertEqual(self.verdicts(), ("connected", "connected"))
        self.assertTrue(self.conn.both_ends_open())
        self.assertIs(self.responder.factory.chosen, self.conn.r.app)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the grace and the handshake timers are gone

    def test_responder_deadline_before_hello_drops_it_and_both_fail(self) -> None:
        """Before HELLO the responder has promised nothing: dropped at once, and the initiator's
        handshake fails on the reset, so its race fails too at its own deadline."""
        self.assertFalse(in_flight(self.conn.r))
        self.responder.deadline()
        self.assertEqual(self.responder.verdict, "failed")
        self.assertTrue(self.conn.tr.disconnecting)
        self.conn.deliver("responder")  # the HELLO meets the RST
        self.assertEqual(self.initiator.contest.contenders, 0)
        self.initiator.deadline()
        self.assertEqual(self.verdicts(), ("failed", "failed"))

    def test_initiator_deadline_while_awaiting_r_still_connects_both(self) -> None:
        """The initiator's HELLO is out: its deadline keeps the connection, and the R that comes
        makes it send I as usual."""
        self.assertTrue(in_flight(self.conn.i))
        self.initiator.deadline()
        self.assertFalse(self.conn.ti.disconnecting)
        self.conn.deliver("responder")
        self.conn.deliver("initiator")
        self.conn.deliver("responder")
        self.assertEqual(self.verdicts(), ("connected", "connected"))

    def test_both_deadlines_in_the_window(self) -> None:
        self.conn.deliver("responder")
        self.initiator.deadline()
        self.responder.deadline()
        self.conn.deliver("initiator")
        self.conn.deliver("responder")
        self.assertEqual(self.verdicts(), ("connected", "connected"))

    def test_a_bad_i_in_the_grace_fails_the_race_at_once(self) -> None:
        self.conn.deliver("responder")
        self.responder.deadline()
        self.conn.r.dataReceived(b"KJ1 I " + b"0" * 64 + b"\n")
        self.assertEqual(self.responder.verdict, "failed")
        self.assertTrue(self.responder.outcome.check(PunchFailed))  # the deadline's reason, not the handshake's
        self.assertTrue(self.conn.tr.disconnecting)

    def test_no_i_fails_by_the_handshake_timeout(self) -> None:
        """The initiator vanished: the handshake's own limit ends the grace (``proof_wait``,
        10 s after the R, however late the HELLO came)."""
        self.clock.advance(4.5)
        self.conn.deliver("responder")  # a late HELLO: the R gets the full proof_wait
        self.responder.deadline()
        self.clock.advance(9.9)
        self.assertIsNone(self.responder.verdict)
        self.clock.advance(0.2)
        self.assertEqual(self.responder.verdict, "failed")
        self.assertTrue(self.conn.tr.disconnecting)


class _Stuck(Handshaking):
    """A contender in flight whose handshake never ends (the grace's own bound is the net)."""

    handshake_in_flight = True


class _Quiet(_Stuck):
    handshake_in_flight = False


class ExpireTests(unittest.TestCase):
    def test_no_contender_loses_at_once_and_waits_for_the_cleanups(self) -> None:
        clock = Clock()
        contest: Contest[Any] = Contest(clock)
        closing: defer.Deferred[None] = defer.Deferred()
        contest.on_close(lambda: closing)
        fired: list[str] = []
        contest.later(1, fired.append, "timer")
        attempt: defer.Deferred[Any] = contest.track(defer.Deferred())
        contest.expire(PunchFailed("late"), 5.0)
        self.failureResultOf(attempt, defer.CancelledError)
        self.assertNoResult(contest.result)
        closing.callback(None)
        self.failureResultOf(contest.result, PunchFailed)
        clock.advance(2)
        self.assertEqual(fired, [])

    def test_only_contenders_in_flight_are_kept_and_the_grace_is_bounded(self) -> None:
        clock = Clock()
        contest: Contest[Any] = Contest(clock)
        stuck, quiet = _Stuck(), _Quiet()
        for protocol in (stuck, quiet):
            contest.contend(protocol, contest.win, lambda reason: None)
        self.assertEqual(contest.in_flight, 1)
        contest.expire(PunchFailed("late"), 2.0)
        self.assertTrue(quiet.transport.disconnecting)
        self.assertFalse(stuck.transport.disconnecting)
        self.assertEqual(contest.contenders, 1)
        clock.advance(1.9)
        self.assertNoResult(contest.result)
        clock.advance(0.1)
        self.failureResultOf(contest.result, PunchFailed)
        self.assertTrue(stuck.transport.disconnecting)

    def test_the_first_decision_stands(self) -> None:
        contest: Contest[Any] = Contest(Clock())
        stuck = _Stuck()
        contest.contend(stuck, contest.win, lambda reason: None)
        contest.expire(PunchFailed("late"), 2.0)
        stuck.done.callback("app")
        self.assertTrue(contest.settled)
        contest.lose(PunchFailed("later still"))
        contest.expire(PunchFailed("again"), 1.0)
        self.assertEqual(self.successResultOf(contest.result), "app")


class DialerSafetyNetTests(unittest.TestCase):
    """The call's last deadline (race.py's safety net) waits for a handshake in flight too."""

    def test_the_safety_net_waits_for_an_r_awaiting_its_i(self) -> None:
        clock = Clock()
        setup = CallSetup("c1@x", bytes(range(32)), "responder", "198.51.100.9",
                          build_offer("bob", "10.0.0.9", 40001, None))
        dialer = Dialer(clock, setup, Factory.forProtocol(Protocol), local_ip="127.0.0.1", punch_port=1,
                        own_public_ip=None, config=DialerConfig(deadline=1.0, low_ttl=None))
        app_port = AppPortProtocol({dialer.tag: dialer}.get, clock)
        transport = StringTransport()
        app_port.makeConnection(transport)
        app_port.dataReceived(PREAMBLE + dialer.tag + b"\n")  # the peer reached our app port
        d = dialer.start(0.0)
        clock.advance(0)  # the dial moment: the safety net is 1 + 10 + 1 s from here
        clock.advance(4.9)
        nonce_i = b"5" * 32
        app_port.dataReceived(b"KJ1 HELLO " + nonce_i + b"\n")  # a late HELLO; our R goes out
        nonce_r = transport.value().split()[2]
        clock.advance(7.2)  # past the safety net, within our R's proof_wait
        self.assertNoResult(d)
        self.assertFalse(transport.disconnecting)
        mac_i = compute_mac(setup.secret, "initiator", setup.handshake_id, nonce_i, nonce_r)
        app_port.dataReceived(b"KJ1 I " + mac_i + b"\n")
        result = self.successResultOf(d)
        self.assertEqual((result.outcome, dialer.tried()), ("direct", (("accepted", "connected"),)))
        self.assertEqual(clock.getDelayedCalls(), [])
