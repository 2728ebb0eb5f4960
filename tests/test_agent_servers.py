"""Several servers (a cluster's): the agent tries them in order, with the back-off per round."""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from kerjostunt.client.agent import PeerAgent
from kerjostunt.client.agentconfig import Account, AgentConfig, Ports, ServerConfig
from kerjostunt.client.cli.options import agent_config, servers_of
from kerjostunt.client.signaling import SignalingError

from .test_agent import DOMAIN, FakeSignaling


class Signaling(FakeSignaling):
    def hang_up(self) -> None:
        if not self.disconnected.called:
            self.disconnected.callback(None)


SERVERS = (("a.example", 5061), ("b.example", 5062), ("c.example", 5063))


class ServerOrderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dialed: list[tuple[str, int, float]] = []
        self.up: set[str] = set()
        self.connections: list[FakeSignaling] = []
        self.patch(__import__("kerjostunt.tls", fromlist=["x"]), "client_options", lambda *a: None)
        (first, *rest) = SERVERS
        config = AgentConfig(ServerConfig(*first, domain=DOMAIN, ca_path="x", alternates=tuple(rest)),
                             Account("alice", "pw"), ports=Ports(listen_port=None, punch_port_max_age=0.0))
        self.agent = PeerAgent(self.clock, config, jitter=lambda: 0.5)
        self.agent.connect_signaling = self.connect

    def connect(self, reactor: Any, host: str, port: int, *rest: Any, **options: Any) -> defer.Deferred:
        self.dialed.append((host, port, self.clock.seconds()))
        if host not in self.up:
            return defer.fail(SignalingError("connection refused"))
        sig = Signaling()
        self.connections.append(sig)
        return defer.succeed(sig)

    def test_start_tries_each_server_in_order_at_once(self) -> None:
        self.up = {"c.example"}
        self.successResultOf(self.agent.start())
        self.assertEqual(self.dialed, [("a.example", 5061, 0.0), ("b.example", 5062, 0.0), ("c.example", 5063, 0.0)])
        self.assertEqual(self.agent.server.address, ("c.example", 5063))

    def test_start_fails_only_when_every_server_failed(self) -> None:
        self.failureResultOf(self.agent.start(), SignalingError)
        self.assertEqual([d[0] for d in self.dialed], ["a.example", "b.example", "c.example"])

    def test_after_a_loss_the_next_servers_follow_with_one_back_off_step_per_round(self) -> None:
        self.up = {"a.example"}
        self.successResultOf(self.agent.start())
        self.up = {"c.example"}
        self.dialed.clear()
        self.connections[0].disconnected.callback(None)  # a.example died
        for _ in range(20):
            self.clock.advance(0.25)
        # a again after 1 s (it was fine), then b and c, each 1 s later: the first round's delay.
        self.assertEqual([(h, t) for h, _p, t in self.dialed], [("a.example", 1.0), ("b.example", 2.0),
                                                                ("c.example", 3.0)])
        self.assertTrue(self.agent.signaling_up)
        self.assertEqual(self.agent.server.host, "c.example")
        self.successResultOf(self.agent.stop())


class RepeatedServerOptionTests(unittest.TestCase):
    def test_every_server_is_kept_in_order(self) -> None:
        args = argparse.Namespace(server=["a.example", "b.example:5070", "[2001:db8::1]"], domain=DOMAIN,
                                  ca="ca.pem", tls_hostname=None, user="alice")
        self.assertEqual(servers_of(args), [("a.example", 5061), ("b.example", 5070), ("2001:db8::1", 5061)])
        config = agent_config(args, servers_of(args)[0], "pw")
        self.assertEqual(config.server.addresses, (("a.example", 5061), ("b.example", 5070), ("2001:db8::1", 5061)))

    def test_echo_takes_the_option_twice(self) -> None:
        from kerjostunt.cli import build_parser

        args = build_parser().parse_args(["echo-server", "--server", "a.example", "--server", "b.example:7",
                                          "--user", "u", "--password-stdin", "--ca", "x"])
        self.assertEqual(args.server, [("a.example", 5061), ("b.example", 7)])


class SilentServer(FakeSignaling):
    """TLS up, then nothing: the REGISTER gets no answer and a close no close_notify."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: defer.Deferred[Any] = defer.Deferred()
        self.aborted = False

    def register(self, expires: int, mapping: Any = None) -> defer.Deferred:
        return self.answer

    def hang_up(self) -> None:
        pass  # the close waits for the server's close_notify

    def abort(self) -> None:
        self.aborted = True
        self.disconnected.callback(None)


class SilentServerStartTests(unittest.TestCase):
    def test_a_failed_register_does_not_wait_for_the_close_for_ever(self) -> None:
        """``kerjostunt echo-server`` against a server that completes TLS and
        never answers printed nothing and ran until killed: after the REGISTER's
        transaction timeout the start waited for a TLS close the server never
        answered. The close is now aborted after ``stop_close``."""
        clock = Clock()
        self.patch(__import__("kerjostunt.tls", fromlist=["x"]), "client_options", lambda *a: None)
        config = AgentConfig(ServerConfig("a.example", 5061, domain=DOMAIN, ca_path="x"), Account("alice", "pw"),
                             ports=Ports(listen_port=None, punch_port_max_age=0.0))
        agent = PeerAgent(clock, config, jitter=lambda: 0.5)
        sig = SilentServer()
        agent.connect_signaling = lambda *a, **kw: defer.succeed(sig)  # type: ignore[method-assign]
        started = agent.start()
        sig.answer.errback(defer.TimeoutError("no final response to REGISTER"))  # the transaction's timer
        self.assertNoResult(started)
        clock.advance(config.timeouts.stop_close)
        self.assertTrue(sig.aborted)
        self.failureResultOf(started, defer.TimeoutError)
