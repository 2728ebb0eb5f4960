"""A real coturn for tests: a generated config, started with the reactor, stopped at cleanup.

The config is the one docs/relay.rst gives an operator, with what a test
needs on top: loopback peers allowed (coturn refuses them by default) and
the lab's private ranges allowed as peers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.trial import unittest

from tests.processes import WatchedProcess, free_port, spawn, wait_until_listening

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
REALM = "kerjo.test"


def skip_without_coturn(case: unittest.TestCase) -> None:
    if not os.path.exists(TURNSERVER):
        raise unittest.SkipTest("coturn (Debian package coturn) is not installed")


@dataclass
class Coturn:
    process: WatchedProcess
    host: str
    port: int
    secret: bytes
    directory: str


def config_text(*, listen: str, port: int, relay: str, secret: bytes, directory: str,
                extra: Sequence[str] = (), allow_peers: Sequence[str] = ()) -> str:
    lines = [
        f"listening-ip={listen}", f"listening-port={port}", f"relay-ip={relay}",
        "min-port=40000", "max-port=40999",
        "use-auth-secret", f"static-auth-secret={secret.decode('ascii')}", f"realm={REALM}",
        "no-tls", "no-dtls", "fingerprint", "no-udp-relay", "no-cli", "no-rfc5780",
        "allow-loopback-peers", "log-file=stdout", "simple-log", "no-software-attribute",
        f"pidfile={directory}/turn.pid", f"userdb={directory}/turndb",
        *(f"allowed-peer-ip={r}" for r in allow_peers),
        *extra,
    ]
    return "\n".join(lines) + "\n"


@defer.inlineCallbacks
def start_coturn(case: unittest.TestCase, *, host: str = "127.0.0.1", secret: bytes = b"lab-secret",  # type: ignore[no-untyped-def]
                 extra: Sequence[str] = ()):
    """coturn listening on ``host``:a free port, relaying from ``host``; fires with a Coturn."""
    skip_without_coturn(case)
    directory = tempfile.mkdtemp(prefix="kerjo-coturn-")
    case.addCleanup(shutil.rmtree, directory, True)
    port = free_port6(host) if ":" in host else free_port(host)
    path = os.path.join(directory, "turnserver.conf")
    with open(path, "w") as f:
        f.write(config_text(listen=host, port=port, relay=host, secret=secret, directory=directory,
                            extra=extra))
    process = spawn(case, "coturn", TURNSERVER, ["-c", path])
    if ":" in host:
        yield wait_until_listening6(host, port, process)
    else:
        yield wait_until_listening(host, port, process)
    return Coturn(process, host, port, secret, directory)


def free_port6(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@defer.inlineCallbacks
def wait_until_listening6(host: str, port: int, process: WatchedProcess, attempts: int = 100):  # type: ignore[no-untyped-def]
    """wait_until_listening for an IPv6 address."""
    from twisted.internet import reactor, task
    from twisted.internet.endpoints import TCP6ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol

    endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=2)
    for _ in range(attempts):
        if not process.running:
            raise AssertionError(f"coturn exited before listening:\n{process.output}")
        try:
            proto = yield endpoint.connect(Factory.forProtocol(Protocol))
        except Exception:
            yield task.deferLater(reactor, 0.1, lambda: None)
            continue
        proto.transport.abortConnection()
        return None
    raise AssertionError(f"nothing listened on [{host}]:{port}")
