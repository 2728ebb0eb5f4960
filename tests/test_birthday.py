"""
The birthday technique (kerjostunt/client/nat/birthday.py) on loopback.

A NAT that drops an unsolicited SYN is made with a reusable listener of
backlog 0 whose one queue slot is taken: further SYNs to that port are
dropped, so the hard side's sockets dialing it stay in SYN_SENT, as behind a
real NAT.  The easy side sprays from that same port; a guess that hits one of
the hard side's ports meets a socket in SYN_SENT and the two make one TCP
connection by simultaneous open -- the event the technique lives on.  Guesses
at ports where nothing listens are refused at once.  Where time matters a
Clock drives the timers while the real reactor serves the sockets.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.handshake import HandshakeFactory
from kerjostunt.client.nat import birthday as B
from kerjostunt.client.nat.probing import ProbeResult
from kerjostunt.client.nat.punch import PunchFailed
from kerjostunt.client.nat.sockets import listen_reusable, reusable_socket
from kerjostunt.wire import prediction as P
from tests.test_punch import LOOP, AppFactory, HeldInitiators, SplitReactor, closed_port, turns


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def black_hole(test: unittest.TestCase) -> int:
    """A reusable port where SYNs are dropped (a full backlog-0 listener)."""
    listener = reusable_socket((LOOP, 0))
    test.addCleanup(listener.close)
    listener.listen(0)
    filler = socket.socket()
    test.addCleanup(filler.close)
    filler.setblocking(False)
    filler.connect_ex(listener.getsockname())
    return listener.getsockname()[1]


def start(reactor_, plan, factory):
    attempt = B._Birthday(reactor_, plan, factory)
    return attempt, attempt.start()


class RoleTests(unittest.TestCase):
    def nat(self, mapping, allocation, behind=True):
        return P.NATDescription(behind, mapping, allocation, None, None)

    def test_header(self):
        nat = B.parse_nat_header("mapping=address-and-port-dependent; allocation=random; delta=none; confidence=0.90")
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (P.APD, P.RANDOM, None))
        nat = B.parse_nat_header("mapping=endpoint-independent; allocation=sequential; delta=-3; confidence=0.5")
        self.assertEqual((nat.mapping, nat.allocation, nat.delta), (P.EI, P.SEQUENTIAL, -3))
        self.assertIsNone(B.parse_nat_header(None))
        self.assertIsNone(B.parse_nat_header("garbage"))

    def test_own_from_probe_results(self):
        random_nat = [ProbeResult(("198.18.0.10", 3478), 40000, "198.18.1.2", 43797),
                      ProbeResult(("198.18.0.10", 3479), 40000, "198.18.1.2", 11165),
                      ProbeResult(("198.18.0.11", 3478), 40000, "198.18.1.2", 55521),
                      ProbeResult(("198.18.0.11", 3479), 40000, "198.18.1.2", 1623)]
        own = B.describe_own(random_nat, "10.1.0.11")
        self.assertEqual((own.mapping, own.allocation), (P.APD, P.RANDOM))
        preserving = [ProbeResult(("198.18.0.10", p), 40000, "198.18.2.2", 40000) for p in (3478, 3479)]
        own = B.describe_own(preserving, "10.2.0.11")
        self.assertEqual((own.mapping, own.allocation), (P.EI, P.PRESERVING))
        self.assertIsNone(B.describe_own([], "10.0.0.1"))

    def test_roles(self):
        rnd = self.nat(P.APD, P.RANDOM)
        pres = self.nat(P.EI, P.PRESERVING)
        seq = self.nat(P.APD, P.SEQUENTIAL)
        public = self.nat(P.EI, P.PRESERVING, behind=False)
        self.assertEqual(B.choose_role(rnd, pres)[0], B.HARD)
        self.assertEqual(B.choose_role(pres, rnd)[0], B.EASY)
        self.assertEqual(B.choose_role(public, rnd)[0], B.EASY)
        role, why = B.choose_role(rnd, rnd)
        self.assertIsNone(role)
        self.assertIn("both", why)
        self.assertIsNone(B.choose_role(rnd, seq)[0])
        self.assertIsNone(B.choose_role(pres, pres)[0])
        self.assertEqual(B.choose_role(pres, pres)[1], "")
        self.assertIsNone(B.choose_role(None, rnd)[0])
        self.assertIsNone(B.choose_role(rnd, None)[0])

    def test_plan_for_call(self):
        hard = B.plan_for_call(B.HARD, local_ip="10.1.0.11", punch_port=40000,
                               peer_endpoint=("198.18.2.2", 41000), deadline=10.0, low_ttl=2)
        self.assertEqual((hard.local, hard.peer, hard.low_ttl), (("10.1.0.11", 0), ("198.18.2.2", 41000), 2))
        self.assertLessEqual(hard.deadline, 10.0)
        easy = B.plan_for_call(B.EASY, local_ip="10.2.0.11", punch_port=41000,
                               peer_endpoint=("198.18.1.2", 1234), deadline=2.0, low_ttl=2)
        self.assertEqual((easy.local, easy.peer, easy.deadline), (("10.2.0.11", 41000), ("198.18.1.2", 0), 2.0))
        self.assertIsNone(easy.low_ttl)
        ports = easy.guess_ports()
        self.assertEqual(len(ports), B.EASY_GUESSES)
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(1024 <= p <= 65535 for p in ports))

    def test_plan_validation(self):
        self.assertRaises(ValueError, B.BirthdayPlan, "medium", (LOOP, 0), (LOOP, 1), 1.0)
        self.assertRaises(ValueError, B.BirthdayPlan, B.HARD, (LOOP, 0), (LOOP, 0), 1.0)
        self.assertRaises(ValueError, B.BirthdayPlan, B.EASY, (LOOP, 0), (LOOP, 0), 1.0)
        self.assertRaises(ValueError, B.BirthdayPlan, B.EASY, (LOOP, 5), (LOOP, 0), 0)


class PairTests(unittest.TestCase):
    """A hard side and an easy side against each other, real reactor."""

    @inlineCallbacks
    def test_spray_finds_a_hard_socket(self):
        easy_port = black_hole(self)
        decoys = [closed_port(self) for _ in range(40)]
        yield turns(3)  # let the reactor settle before counting
        before = open_fds()
        apps_h, apps_e = AppFactory(), AppFactory()
        fh = HandshakeFactory(b"k", "bd1", "initiator", apps_h, reactor)
        fe = HandshakeFactory(b"k", "bd1", "responder", apps_e, reactor)
        hard, dh = start(reactor, B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, easy_port), 10.0, sockets=16), fh)
        yield turns(3)
        self.assertEqual(len(hard.open), 16)
        hard_ports = sorted(a.port for a in hard.open)
        self.assertEqual(len(set(hard_ports)), 16)
        # Every hard socket waits in SYN_SENT: its SYN was dropped.
        self.assertEqual({a.tcp_state() for a in hard.open}, {2})
        # 40 misses (nothing listens there: refused), then one hit.
        ports = tuple(decoys + [hard_ports[7]])
        easy, de = start(reactor, B.BirthdayPlan(B.EASY, (LOOP, easy_port), (LOOP, 0), 10.0,
                                                 ports=ports, spray_time=0.05), fe)
        rh, re_ = yield gatherResults([dh, de])
        self.assertEqual((rh.technique, re_.technique), ("birthday", "birthday"))
        self.assertEqual(rh.remote, (LOOP, easy_port))
        self.assertEqual(re_.remote, (LOOP, hard_ports[7]))
        # One TCP connection, its two ends.
        th, te = rh.protocol.transport, re_.protocol.transport
        self.assertEqual(th.getHost().port, te.getPeer().port)
        self.assertEqual(te.getHost().port, easy_port)
        th.write(b"over the birthday\n")
        yield re_.protocol.wait_for(b"over the birthday\n")
        # The losers are closed: only the winning connection (both ends) is left.
        self.assertEqual((hard.open, easy.open), (set(), set()))
        self.assertLessEqual(hard.peak_open, 16)
        self.assertEqual(open_fds(), before + 2)
        th.abortConnection()
        te.abortConnection()
        yield gatherResults([rh.protocol.lost, re_.protocol.lost])
        self.assertEqual(open_fds(), before)

    @inlineCallbacks
    def test_wrong_secret_is_not_a_win(self):
        """A hit whose handshake fails is dropped; the hard side dials that port again."""
        easy_port = black_hole(self)
        clock = Clock()
        fh = HandshakeFactory(b"k", "bd2", "initiator", AppFactory(), reactor, timeout=5)
        fe = HandshakeFactory(b"other", "bd2", "responder", AppFactory(), reactor, timeout=5)
        hard, dh = start(SplitReactor(clock),
                         B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, easy_port), 10.0, sockets=4), fh)
        yield turns(3)
        port = sorted(a.port for a in hard.open)[0]
        easy, de = start(reactor, B.BirthdayPlan(B.EASY, (LOOP, easy_port), (LOOP, 0), 10.0,
                                                 ports=(port,), spray_time=0.01), fe)
        (failure,) = yield de.addCallbacks(lambda r: self.fail(f"won: {r}"), lambda f: [f])
        failure.trap(B.BirthdayFailed)
        self.assertIn("handshake failed 1", failure.value.reason)
        self.assertNoResult(dh)
        self.assertEqual(hard.errors.get("handshake failed"), 1)
        # The port is dialed again after retry_interval.
        for _ in range(10):
            if port in {a.port for a in hard.open}:
                break
            clock.advance(0.05)
            yield turns(3)
        self.assertIn(port, {a.port for a in hard.open})
        dh.cancel()
        self.failureResultOf(dh)
        self.assertEqual(hard.open, set())


class BoundsTests(unittest.TestCase):
    """Bounded sockets, cleanup and deadlines; Clock time, real sockets."""

    def setUp(self):
        self.clock = Clock()
        self.reactor = SplitReactor(self.clock)

    @inlineCallbacks
    def advance(self, seconds: float, step: float = 0.01):
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)
            yield turns(2)

    @inlineCallbacks
    def test_easy_in_flight_bounded_and_all_closed(self):
        local = reusable_socket((LOOP, 0))
        self.addCleanup(local.close)
        holes = [black_hole(self) for _ in range(60)]
        yield turns(3)  # let the reactor settle before counting
        before = open_fds()
        plan = B.BirthdayPlan(B.EASY, (LOOP, local.getsockname()[1]), (LOOP, 0), 5.0,
                              ports=tuple(holes), spray_time=0.1, max_in_flight=8,
                              guess_timeout=0.3)
        easy, d = start(self.reactor, plan, AppFactory())
        failures = []
        d.addErrback(failures.append)
        peaks = []
        for _ in range(200):
            if d.called:
                break
            self.clock.advance(0.02)
            yield turns(2)
            peaks.append(len(easy.open))
            self.assertLessEqual(open_fds(), before + 8, (len(easy.open), os.listdir("/proc/self/fd")))
        self.assertEqual(max(peaks), 8)
        self.assertEqual(easy.peak_open, 8)
        self.assertEqual(easy.attempts, 60)
        self.assertEqual(len(failures), 1)
        failures[0].trap(B.BirthdayFailed)
        self.assertIn("all guesses missed", failures[0].value.reason)
        self.assertIn("timed out 60", failures[0].value.reason)
        # 60 guesses, 8 at a time, 0.3 s each: about 8 rounds, long before the deadline.
        self.assertLess(self.clock.seconds(), 3.0)
        self.assertEqual(easy.open, set())
        self.assertEqual(open_fds(), before)

    @inlineCallbacks
    def test_easy_refused_guesses_fail_fast(self):
        local = reusable_socket((LOOP, 0))
        self.addCleanup(local.close)
        ports = tuple(closed_port(self) for _ in range(30))
        plan = B.BirthdayPlan(B.EASY, (LOOP, local.getsockname()[1]), (LOOP, 0), 5.0,
                              ports=ports, spray_time=0.05)
        easy, d = start(self.reactor, plan, AppFactory())
        failures = []
        d.addErrback(failures.append)
        yield self.advance(0.2)
        self.assertEqual(len(failures), 1)
        self.assertIn("refused 30", failures[0].value.reason)

    @inlineCallbacks
    def test_hard_cycles_sockets_and_stops_at_deadline(self):
        target = black_hole(self)
        yield turns(3)  # let the reactor settle before counting
        before = open_fds()
        plan = B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, target), 2.0, sockets=12, cycle=0.8)
        hard, d = start(self.reactor, plan, AppFactory())
        failures = []
        d.addErrback(failures.append)
        yield turns(3)
        ports = {a.port for a in hard.open}
        self.assertEqual(len(ports), 12)
        self.assertEqual(open_fds(), before + 12)
        yield self.advance(0.9, step=0.05)
        # Each socket was replaced before the kernel's 1 s retransmission,
        # from the same local port (same 5-tuple, same NAT mapping).
        self.assertEqual(hard.attempts, 24)
        self.assertEqual({a.port for a in hard.open}, ports)
        self.assertEqual(open_fds(), before + 12)
        self.assertFalse(failures)
        yield self.advance(1.2, step=0.05)
        self.assertEqual(len(failures), 1)
        failures[0].trap(PunchFailed)
        reason = failures[0].value.reason
        self.assertIn("birthday (hard): no connection within 2 s", reason)
        self.assertIn("12 sockets", reason)
        self.assertEqual(hard.open, set())
        self.assertEqual(open_fds(), before)

    @inlineCallbacks
    def test_deadline_between_r_and_i_keeps_the_connection(self):
        """The NAT lab's 40-peer group: the hard side (responder) proved itself on a guess's
        connection, then its 4 s ran out before the easy side's proof arrived.  The other
        sockets close at the deadline; that connection stays and wins."""
        peer = HeldInitiators()
        listener = listen_reusable(reactor, (LOOP, 0), peer)
        self.addCleanup(listener.stopListening)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in peer.built])
        target = black_hole(self)
        mine = HandshakeFactory(b"k", "c", "responder", AppFactory(), self.reactor)
        plan = B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, listener.getHost().port), 2.0, sockets=1)
        hard, d = start(self.reactor, plan, mine)
        held = yield peer.first
        yield held.proved
        stuck, _ = hard._dial((LOOP, 0), (LOOP, target), None, hard.hard_done)  # dialing a dropping NAT
        self.assertEqual(hard.open, {stuck})
        yield self.advance(2.1, step=0.1)
        self.assertNoResult(d)
        self.assertEqual(hard.open, set())  # the socket still dialing closed at the deadline
        self.assertFalse(held.lost.called)
        held.send_proof(b"k", "c")
        for _ in range(20):
            if d.called:
                break
            yield turns(2)
        result = self.successResultOf(d)
        self.assertIs(result.protocol, mine.chosen)
        self.assertEqual(result.technique, "birthday")
        self.assertFalse(held.lost.called)

    @inlineCallbacks
    def test_hard_socket_limit_respects_fd_budget(self):
        target = black_hole(self)
        self.patch(B, "fd_budget", lambda reserve=B.FD_RESERVE: 5)
        plan = B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, target), 2.0, sockets=50)
        hard, d = start(self.reactor, plan, AppFactory())
        yield turns(3)
        self.assertEqual(len(hard.open), 5)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(hard.open, set())

    def test_no_descriptors_fails_at_once(self):
        self.patch(B, "fd_budget", lambda reserve=B.FD_RESERVE: 0)
        plan = B.BirthdayPlan(B.EASY, (LOOP, 9), (LOOP, 0), 2.0, ports=(1, 2))
        _, d = start(self.reactor, plan, AppFactory())
        self.failureResultOf(d, B.BirthdayFailed)

    @inlineCallbacks
    def test_cancel_closes_everything(self):
        target = black_hole(self)
        yield turns(3)  # let the reactor settle before counting
        before = open_fds()
        hard, d = start(self.reactor, B.BirthdayPlan(B.HARD, (LOOP, 0), (LOOP, target), 5.0, sockets=20), AppFactory())
        yield turns(3)
        self.assertEqual(open_fds(), before + 20)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(open_fds(), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fd_budget(self):
        budget = B.fd_budget(reserve=0)
        self.assertGreater(budget, 0)
        self.assertGreater(B.fd_budget(reserve=0), B.fd_budget(reserve=100))
