"""Shared test fixtures: a real server on 127.0.0.1 port 0, real TLS clients."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from kerjostunt import tls
from kerjostunt.client.signaling import SignalingClientProtocol, connect_signaling
from kerjostunt.server.service import ServerSettings, StuntServer
from kerjostunt.server.signaling import ConnectionLimits
from kerjostunt.store import Database

DOMAIN = "kerjo.test"
REPO_ROOT = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict[str, str]:
    """Environment for child processes (twistd, the CLI): this checkout's code first.

    With PYTHONPATH at the repository root a child imports the code under
    test, and twistd finds ``twisted/plugins/kerjostunt_plugin.py`` there,
    whether the package was installed normally, editable, or not at all.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    return env


@dataclass
class RunningServer:
    server: StuntServer
    host: str
    port: int
    ca: Path
    db_url: str

    def database(self) -> Database:
        """A second, blocking handle for test setup and assertions (never used by the server)."""
        return Database(self.db_url)


@defer.inlineCallbacks
def start_loopback_server(case: unittest.TestCase, **settings: Any):  # type: ignore[no-untyped-def]
    """Start a StuntServer on loopback port 0 with a fresh store and certificates.

    Fires with (RunningServer, {port name: listening port}) once every port listens;
    ``settings`` are ServerSettings fields beyond the store, certificates, SIP and probes.
    """
    base = Path(case.mktemp())
    base.mkdir(parents=True)
    db_url = f"sqlite:///{base / 'test.sqlite'}"
    listening: dict[str, Any] = {
        "sip_endpoint": "tcp:0:interface=127.0.0.1",
        "probe_endpoints": ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
        "probe_ports": [0, 0],
    }
    server_settings = ServerSettings(
        domain=DOMAIN,
        db_url=db_url,
        certs_dir=base / "certs",
        **{**listening, **settings},
    )
    server = StuntServer(server_settings, reactor)
    server.startService()
    case.addCleanup(server.stopService)
    ports = {}
    for name in list(server.ports):
        ports[name] = yield server.ports[name]
    running = RunningServer(server, "127.0.0.1", ports["sip"].getHost().port, server.certificates.ca, db_url)  # type: ignore[arg-type]
    return running, ports


@defer.inlineCallbacks
def start_server(case: unittest.TestCase, limits: ConnectionLimits | None = None, **overrides: Any):  # type: ignore[no-untyped-def]
    """Start a full server (store, TLS signaling, probes) on loopback port 0."""
    running, _ports = yield start_loopback_server(
        case, web_endpoint=None, limits=limits or ConnectionLimits(), **overrides
    )
    return running


def add_users(running: RunningServer, users: dict[str, str], group: str | None = "friends") -> None:
    db = running.database()
    try:
        db.upgrade()
        for user_id, password in users.items():
            db.add_user(user_id, DOMAIN, password=password)
        if group is not None:
            db.add_group(group)
            db.join_group(group, list(users))
    finally:
        db.close()


@defer.inlineCallbacks
def connect_client(
    case: unittest.TestCase,
    running: RunningServer,
    user_id: str,
    password: str,
    on_request: Callable[[SignalingClientProtocol, Any], None] | None = None,
    hostname: str = "localhost",
    ca: Path | None = None,
):  # type: ignore[no-untyped-def]
    """A TLS signaling client that verified the server against the generated CA."""
    options = tls.client_options(ca or running.ca, hostname)
    proto = yield connect_signaling(
        reactor, running.host, running.port, options,
        lambda: SignalingClientProtocol(reactor, user_id, password, DOMAIN, on_request),
    )
    case.addCleanup(_close, proto)
    return proto


def _close(proto: SignalingClientProtocol) -> defer.Deferred:
    if proto.disconnected.called:
        return defer.succeed(None)
    proto.transport.loseConnection()
    return proto.disconnected
