"""Child processes for integration tests (twistd, stunnel, sipp), driven by the reactor.

Nothing here blocks the reactor thread: processes are spawned with
``reactor.spawnProcess``, output is watched as it arrives, and waiting for a
port is a bounded number of reactor-scheduled connection attempts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

import kerjostunt


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now; callers retry if it is taken before use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def source_root() -> str:
    """The directory holding the ``kerjostunt`` package (and ``twisted/plugins``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(kerjostunt.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must find this checkout.

    An editable install (``pip install -e``, as .ci/run does) maps only the
    ``kerjostunt`` package, so ``twisted/plugins/kerjostunt_plugin.py`` is not
    on the child's path and twistd would not know the ``kerjostunt`` command;
    a regular install puts the plugin in site-packages, where this is a no-op.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root(), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class ProcessExited(Exception):
    """The process ended while we were waiting for something it never did."""


class WatchedProcess(ProcessProtocol):
    """Collects output, tells when a marker shows up and when the process ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None
        self._waiters: list[tuple[bytes, defer.Deferred[None]]] = []

    @property
    def running(self) -> bool:
        return not self.ended.called

    @property
    def output(self) -> str:
        return (bytes(self.out) + bytes(self.err)).decode("utf-8", "replace")

    def childDataReceived(self, fd: int, data: bytes) -> None:
        (self.out if fd == 1 else self.err).extend(data)
        self._check_waiters()

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessTerminated):
            self.exit_code = reason.value.exitCode
            self.signal = reason.value.signal
        elif reason.check(ProcessDone):
            self.exit_code = 0
        waiters, self._waiters = self._waiters, []
        for marker, d in waiters:
            d.errback(ProcessExited(f"{self.name} exited ({self.describe_exit()}) before printing {marker!r}:\n{self.output}"))
        self.ended.callback(self.exit_code)

    def describe_exit(self) -> str:
        return f"signal {self.signal}" if self.signal is not None else f"exit code {self.exit_code}"

    def wait_for(self, marker: bytes) -> defer.Deferred[None]:
        """Fires when ``marker`` appears in stdout or stderr; fails if the process ends first."""
        d: defer.Deferred[None] = defer.Deferred()
        if not self.running:
            d.errback(ProcessExited(f"{self.name} already exited ({self.describe_exit()}):\n{self.output}"))
            return d
        self._waiters.append((marker, d))
        self._check_waiters()
        return d

    def _check_waiters(self) -> None:
        seen = bytes(self.out) + bytes(self.err)
        ready = [(m, d) for m, d in self._waiters if m in seen]
        self._waiters = [(m, d) for m, d in self._waiters if m not in seen]
        for _, d in ready:
            d.callback(None)

    def stop(self, grace: float = 10.0) -> defer.Deferred[int | None]:
        """SIGTERM, then SIGKILL if it has not ended after ``grace`` seconds."""
        if not self.running:
            return defer.succeed(self.exit_code)
        self.transport.signalProcess("TERM")
        killer = reactor.callLater(grace, self._kill)

        def ended(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            return result

        return self.ended.addBoth(ended)

    def _kill(self) -> None:
        if self.running:
            self.transport.signalProcess("KILL")


def spawn(
    case: unittest.TestCase,
    name: str,
    executable: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    path: str | None = None,
    stdin: bytes | None = None,
) -> WatchedProcess:
    """Start a process that the test's cleanup stops (and waits for).

    ``stdin``, if given, is written to the process and its stdin closed.
    """
    proto = WatchedProcess(name)
    reactor.spawnProcess(proto, executable, [executable, *args], env=env if env is not None else dict(os.environ), path=path)
    if stdin is not None:
        proto.transport.write(stdin)
        proto.transport.closeStdin()

    def cleanup() -> defer.Deferred[None]:
        return proto.stop().addCallback(lambda _: None)

    case.addCleanup(cleanup)
    return proto


@defer.inlineCallbacks
def wait_until_listening(host: str, port: int, process: WatchedProcess | None = None, attempts: int = 100, delay: float = 0.1):  # type: ignore[no-untyped-def]
    """Connect (and hang up) until ``host:port`` accepts; at most ``attempts`` tries, ``delay`` apart."""
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=2)
    last: Failure | None = None
    for _ in range(attempts):
        if process is not None and not process.running:
            raise ProcessExited(f"{process.name} exited ({process.describe_exit()}) before listening on {port}:\n{process.output}")
        try:
            proto = yield endpoint.connect(Factory.forProtocol(Protocol))
        except Exception:
            last = Failure()
            yield task.deferLater(reactor, delay, lambda: None)
            continue
        proto.transport.abortConnection()
        return None
    raise AssertionError(f"nothing listened on {host}:{port} after {attempts} attempts: {last}")

