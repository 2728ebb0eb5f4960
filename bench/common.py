"""Shared machinery of the benchmarks: the real server, load-generator processes, a lean SIP client.

The benchmark scripts (``registrations.py``, ``calls.py``) are coordinators:
they start the real server (``twistd -n kerjostunt``) in a temporary
directory, start load-generator *worker* processes (the same script with
``--worker``), drive them with one-line commands on their stdin and read
their JSON reports from their stdout.  The server runs alone in its own
process, so ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` measure exactly
its CPU and memory.

Everything is bounded: every worker gets an absolute deadline after which it
stops its reactor and exits, the coordinator kills what it started (by
``Popen`` object, never by name) in a ``finally``, and traffic goes only to
loopback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "kerjo.local"
GROUP = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- users and addresses ---------------------------------------------------------


def user_id(index: int) -> str:
    return f"b{index:05d}"


def password_of(uid: str) -> str:
    return "pw-" + uid


def source_address(index: int, sources: int) -> str:
    """Client ``index`` binds to 127.0.0.(2 + index % sources): spreads ephemeral ports and per-IP counts."""
    return f"127.0.0.{2 + index % sources}"


def sources_for(clients: int, per_ip: int = 900) -> int:
    """Enough source addresses to stay under the server's default --max-per-ip (1000)."""
    return max(1, min(250, math.ceil(clients / per_ip)))


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free right now (bound together so they differ, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- /proc ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (the store's SQL thread included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def kernel_seconds(pid: int) -> float:
    """stime of every thread of ``pid``: the system calls' share of ``cpu_seconds``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLK_TCK


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """(reactor thread, all other threads) CPU seconds: the main thread is the reactor, the rest is the SQL pool."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that just ended
        seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
        if int(tid) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine_facts() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    return {
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "python": sys.version.split()[0],
        "twisted": twisted.__version__,
        "pyOpenSSL": OpenSSL.__version__,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "open files limit": str(_nofile()),
    }


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- CPU pinning -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the server and the load generators may run on (None: anywhere).

    With the generators on the server's core, a message the server has
    already answered can wait for a generator's time slice before its time
    is taken: the latency tail was the generators', not the server's.  Pinning
    both apart makes the tail the server's (plus whatever else the machine
    runs on its core).
    """

    server: frozenset[int] | None = None
    generators: frozenset[int] | None = None

    def describe(self) -> str:
        if self.server is None:
            return "off (all processes on all CPUs)"
        return f"server on CPU {_cpus(self.server)}, load generators on CPU {_cpus(self.generators or ())}"


def _cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def cpu_plan(choice: str) -> CpuPlan:
    """``--server-cpu``: ``auto`` (the last CPU when there are two or more), ``off``, or a CPU number."""
    available = sorted(os.sched_getaffinity(0))
    if choice == "off" or (choice == "auto" and len(available) < 2):
        return CpuPlan()
    server = available[-1] if choice == "auto" else int(choice)
    if server not in available or len(available) < 2:
        raise SystemExit(f"--server-cpu {choice}: need a CPU of {available} and at least one other")
    return CpuPlan(frozenset({server}), frozenset(available) - {server})


@contextmanager
def affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the block on ``cpus``: processes started in it inherit them (fork copies the mask)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def add_pinning_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-cpu", default="auto", metavar="CPU|auto|off",
                   help="pin the server to this CPU and the load generators to the others "
                        "(default auto: the last CPU, when there are at least two)")


# -- statistics and tables --------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A reStructuredText simple table (pastes straight into docs/performance.rst)."""
    rows = [(str(k), _fmt(v)) for k, v in rows]
    w1 = max(len("metric"), *(len(k) for k, _ in rows))
    w2 = max(len("value"), *(len(v) for _, v in rows))
    rule = "=" * w1 + "  " + "=" * w2
    lines = [title, "", rule, f"{'metric':<{w1}}  value", rule]
    lines += [f"{k:<{w1}}  {v}" for k, v in rows]
    lines += [rule, ""]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# -- the server -------------------------------------------------------------------


@dataclass
class ServerProcess:
    """``twistd -n kerjostunt`` in a temporary directory, on free loopback ports."""

    workdir: Path
    users: int
    max_per_ip: int = 1000
    extra_args: list[str] = field(default_factory=list)
    cpus: frozenset[int] | None = None
    inside: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0
    probe_ports: tuple[int, int] = (0, 0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ca(self) -> Path:
        return self.workdir / "certs" / "ca.pem"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.workdir / 'kerjostunt.sqlite'}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def create_users(self) -> float:
        """Bulk-create ``users`` users in one group, as ``kerjostunt user import`` would; returns seconds."""
        from kerjostunt.store import Database

        started = time.monotonic()
        db = Database(self.db_url)
        try:
            db.upgrade()
            rows = ({"user_id": user_id(i), "password": password_of(user_id(i)), "groups": GROUP}
                    for i in range(self.users))
            db.import_users(rows, DOMAIN)
        finally:
            db.close()
        return time.monotonic() - started

    def command(self) -> list[str]:
        return [
            sys.executable, "-c", self._prelude() + "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", f"--logfile={self.log_path}",
            "kerjostunt",
            "--interface", "127.0.0.1",
            "--port", str(self.port),
            "--probe-ports", ",".join(map(str, self.probe_ports)),
            "--web-port", "0",
            "--domain", DOMAIN,
            "--db", self.db_url,
            "--certs", str(self.workdir / "certs"),
            "--max-per-ip", str(self.max_per_ip),
            *self.extra_args,
        ]

    @property
    def inside_path(self) -> Path:
        return self.workdir / "inside.json"

    def _prelude(self) -> str:
        """``--inside``: bench/inside.py wraps the functions before twistd loads anything else."""
        if not self.inside:
            return ""
        return (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import inside; "
                f"inside.install({self.inside!r}, {str(self.inside_path)!r}); ")

    def inside_restart(self) -> None:
        """Start ``--inside``'s counts afresh (the phase to measure begins)."""
        if self.inside and self.proc is not None:
            self.proc.send_signal(signal.SIGUSR2)

    def start(self, timeout: float = 60.0) -> None:
        self.port, *probes = free_ports(3)
        self.probe_ports = (probes[0], probes[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        out = open(self.workdir / "server.stdout", "wb")  # noqa: SIM115 (the child holds it for its whole life)
        with affinity(self.cpus):
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        marker = f"starting on {self.port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.workdir}")
            if self.ca.exists() and self.log_path.exists() and marker in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not listening after {timeout} s; see {self.log_path}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def kernel_cpu(self) -> float:
        return kernel_seconds(self.pid)

    def threads_cpu(self) -> tuple[float, float]:
        return thread_cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    def wait_quiet(self, threshold: float = 0.03, interval: float = 0.5, limit: float = 60.0) -> float:
        """Wait until the server uses under ``threshold`` of a core (queued SQL done); returns seconds waited."""
        started = time.monotonic()
        last = self.cpu()
        while time.monotonic() - started < limit:
            time.sleep(interval)
            now = self.cpu()
            if now - last < threshold * interval:
                break
            last = now
        return time.monotonic() - started

    def log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class PySpy:
    """``py-spy record`` attached to the server for one phase (stopped with SIGINT)."""

    def __init__(self, pid: int, output: Path, native: bool = False, rate: int = 200) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("py-spy is not installed (pip install py-spy)")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(output.suffix, "raw")
        cmd = [exe, "record", "--nonblocking", "-r", str(rate), "-p", str(pid), "-f", fmt, "-o", str(output)]
        if native:
            cmd.append("--native")
        self.output = output
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- load-generator processes -----------------------------------------------------


class Workers:
    """K worker processes: commands go to their stdin, JSON lines come back from their stdout."""

    def __init__(self, script: Path, configs: list[dict[str, Any]], workdir: Path,
                 cpus: frozenset[int] | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.messages: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        for index, config in enumerate(configs):
            err = open(workdir / f"worker{index}.stderr", "wb")  # noqa: SIM115 (the worker holds it for its whole life)
            with affinity(cpus):
                proc = subprocess.Popen(
                    [sys.executable, str(script), "--worker", json.dumps(config)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                )
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.messages.put((index, json.loads(line)))
            except ValueError:
                self.messages.put((index, {"event": "garbage", "line": line.decode(errors="replace")}))
        self.messages.put((index, {"event": "exited", "code": proc.wait()}))

    def send(self, index: int, command: str) -> None:
        proc = self.procs[index]
        if proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.write(command.encode() + b"\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass

    def cpu(self) -> float:
        """CPU seconds of all live workers (the load generators' own cost, to see whether they keep up)."""
        total = 0.0
        for proc in self.procs:
            try:
                total += cpu_seconds(proc.pid)
            except OSError:
                pass
        return total

    def broadcast(self, command: str) -> None:
        for index in range(len(self.procs)):
            self.send(index, command)

    def collect(self, event: str, count: int | None = None, timeout: float = 600.0) -> list[dict[str, Any]]:
        """Wait for ``event`` from ``count`` workers (all by default); a worker that exits counts as failed."""
        want = len(self.procs) if count is None else count
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"only {len(got)} of {want} workers reported {event!r}")
            try:
                index, message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if message.get("event") == event:
                message["worker"] = index
                got.append(message)
            elif message.get("event") == "exited":
                raise RuntimeError(f"worker {index} exited ({message['code']}) before {event!r}")
            elif message.get("event") in ("garbage", "error"):
                print(f"worker {index}: {message}", file=sys.stderr)
        return got

    def stop(self, timeout: float = 20.0) -> None:
        self.broadcast("stop")
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def split(total: int, parts: int) -> list[range]:
    """``range(total)`` cut into ``parts`` contiguous, nearly equal ranges."""
    bounds = [total * k // parts for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def make_workdir(keep: bool) -> tuple[Path, Callable[[], None]]:
    path = Path(tempfile.mkdtemp(prefix="kerjostunt-bench-"))

    def cleanup() -> None:
        if keep:
            print(f"(kept {path})", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)

    return path, cleanup


# -- what every coordinator shares: the last options, shutting down, the report ------


def add_run_options(p: argparse.ArgumentParser, phase: str) -> None:
    """--py-spy (during ``phase``), --py-spy-native, --json, --keep, --server-arg and the hidden --worker."""
    p.add_argument("--py-spy", metavar="FILE", type=Path,
                   help=f"record the server with py-spy during {phase} (.svg, .json or raw .txt)")
    p.add_argument("--py-spy-native", action="store_true", help="include native (C) frames in the py-spy profile")
    p.add_argument("--py-spy-rate", type=int, default=200, metavar="HZ", help="py-spy samples per second (default 200)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (server log, database)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra twistd kerjostunt option, repeatable (e.g. --server-arg=--tls-groups=X25519:P-256)")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def add_inside_option(p: argparse.ArgumentParser, phase: str) -> None:
    p.add_argument("--inside", action="append", default=[], metavar="MODULE:NAME",
                   help=f"time this function inside the server during {phase}, repeatable "
                        "(e.g. kerjostunt.wire.sdp:parse_sdp; bench/inside.py)")


def shut_down(server: ServerProcess, workers: Workers | None, spy: PySpy | None) -> None:
    """Stop what the coordinator started: the profiler, the workers, then the server."""
    if spy is not None:
        spy.stop()
    if workers is not None:
        workers.stop()
    server.stop()


def report(args: argparse.Namespace, title: str, rows: list[tuple[str, Any]], errors: dict[str, int],
           load_start: float, **extra: Any) -> str:
    """Print the table (the machine's load average last) and the errors; write ``--json``; return the table.

    ``extra`` goes into the JSON after the table, before the machine facts.
    """
    rows.append(("machine load average (1 min), start / end", f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"))
    text = print_table(title, rows)
    for kind, n in sorted(errors.items()):
        print(f"  error {kind}: {n}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items() if k != "worker"},
            "rows": rows, "errors": dict(errors), "table": text, **extra,
            "machine": machine_facts(),
        }, indent=2))
    return text


# -- inside a worker: a lean SIP user agent over TLS -------------------------------
#
# Imported lazily by workers only, so the coordinator never loads a reactor.


def worker_runtime():  # type: ignore[no-untyped-def]
    """Return the worker-side classes (imports Twisted and the SIP code)."""
    from twisted.internet import reactor, stdio
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import ClientFactory, Protocol
    from twisted.protocols.basic import LineReceiver
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    from kerjostunt import tls
    from kerjostunt.wire.sip.digest import authorization
    from kerjostunt.wire.sip.headers import parse_auth, parse_via
    from kerjostunt.wire.sip.message import Headers, Request, Response, make_response
    from kerjostunt.wire.sip.parser import KeepAlivePing, KeepAlivePong, StreamParser

    class Commands(LineReceiver):
        """One command a line from the coordinator; EOF means stop."""

        delimiter = b"\n"

        def __init__(self, handler: Callable[[str], None]) -> None:
            self.handler = handler

        def lineReceived(self, line: bytes) -> None:
            self.handler(line.decode().strip())

        def connectionLost(self, reason: Any = None) -> None:
            self.handler("stop")

    @implementer(IHandshakeListener)
    class LoadClient(Protocol):
        """One peer: REGISTER with digest, keepalives both ways, requests matched by Via branch."""

        def __init__(self, owner: Any, uid: str, source: str) -> None:
            self.owner = owner
            self.user_id = uid
            self.source = source
            self.parser = StreamParser()
            self.pending: dict[str, tuple[Callable[[Response], None], Any, Any]] = {}
            self.local = ("0.0.0.0", 0)
            self.cseq = 0
            self.tag = secrets.token_hex(4)
            self.reg_call_id = secrets.token_hex(8) + "@bench"
            self.pings = self.pongs = 0
            self.registered = False
            self.closed = False
            self.connect_started = 0.0

        # Twisted
        def connectionMade(self) -> None:
            host = self.transport.getHost()
            self.local = (host.host, host.port)
            # Small request/response messages: without this, a message written
            # while an earlier small one is unacknowledged waits for the
            # peer's delayed ACK (Nagle), 40 ms on Linux.
            self.transport.setTcpNoDelay(True)

        def handshakeCompleted(self) -> None:
            self.owner.secured(self)

        def connectionLost(self, reason: Any = None) -> None:
            self.closed = True
            for _, timer, _ in self.pending.values():
                if timer.active():
                    timer.cancel()
            self.pending.clear()
            self.owner.lost(self, reason)

        def dataReceived(self, data: bytes) -> None:
            try:
                events = self.parser.feed(data)
            except Exception as exc:  # the server sent garbage: a bench error
                self.owner.error(self, f"parse: {exc}")
                self.transport.abortConnection()
                return
            for event in events:
                if isinstance(event, KeepAlivePing):
                    self.transport.write(b"\r\n")
                elif isinstance(event, KeepAlivePong):
                    self.pongs += 1
                elif isinstance(event, Response):
                    self._response(event)
                else:
                    self.owner.request(self, event)

        # requests
        def uri_of(self, uid: str) -> str:
            return f"sips:{uid}@{DOMAIN}"

        def build(self, method: str, uri: str, to: str, call_id: str, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"", cseq: int | None = None, to_tag: str | None = None) -> Request:
            if cseq is None:
                self.cseq += 1
                cseq = self.cseq
            h = Headers()
            h.add("Via", f"SIP/2.0/TLS {self.local[0]}:{self.local[1]};branch=z9hG4bK{secrets.token_hex(8)};rport")
            h.add("Max-Forwards", "70")
            h.add("From", f"<{self.uri_of(self.user_id)}>;tag={self.tag}")
            h.add("To", f"<{to}>" + (f";tag={to_tag}" if to_tag else ""))
            h.add("Call-ID", call_id)
            h.add("CSeq", f"{cseq} {method}")
            for name, value in headers:
                h.add(name, value)
            return Request(method, uri, h, body)

        def send(self, request: Request, on_final: Callable[[Response], None] | None, timeout: float = 32.0,
                 on_provisional: Callable[[Response], None] | None = None) -> None:
            if self.closed:
                return
            if on_final is not None:
                branch = parse_via(request.headers.get_all("Via")[0]).branch or ""
                timer = reactor.callLater(timeout, self._timeout, branch, request.method)
                self.pending[branch] = (on_final, timer, on_provisional)
            self.transport.write(request.to_bytes())

        def respond(self, request: Request, code: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                    to_tag: str | None = None) -> None:
            response = make_response(request, code, to_tag=to_tag)
            for name, value in headers:
                response.headers.add(name, value)
            response.body = body
            if not self.closed:
                self.transport.write(response.to_bytes())

        def _response(self, response: Response) -> None:
            vias = response.headers.get_all("Via")
            branch = parse_via(vias[0]).branch if vias else None
            if response.code < 200:
                entry = self.pending.get(branch or "")
                if entry is not None and entry[2] is not None:
                    entry[2](response)
                return
            entry = self.pending.pop(branch or "", None)
            if entry is None:
                return
            on_final, timer, _ = entry
            if timer.active():
                timer.cancel()
            on_final(response)

        def _timeout(self, branch: str, method: str) -> None:
            if self.pending.pop(branch, None) is not None:
                self.owner.error(self, f"timeout: {method}")

        # REGISTER
        def register(self, done: Callable[[LoadClient, Response], None]) -> None:
            uri = f"sips:{DOMAIN}"
            contact = ("Contact", f"<sips:{self.user_id}@{self.local[0]}:{self.local[1]};transport=tls>;expires=3600")
            me = self.uri_of(self.user_id)

            def challenged(response: Response) -> None:
                if response.code != 401:
                    done(self, response)
                    return
                params = [p for s, p in (parse_auth(v) for v in response.headers.get_all("WWW-Authenticate"))
                          if s.lower() == "digest"]
                auth = authorization(params[0], self.user_id, password_of(self.user_id), "REGISTER", uri,
                                     secrets.token_hex(8))
                self.send(self.build("REGISTER", uri, me, self.reg_call_id, [contact, ("Authorization", auth)]),
                          lambda r: done(self, r))

            self.send(self.build("REGISTER", uri, me, self.reg_call_id, [contact]), challenged)

        def ping(self) -> None:
            if not self.closed:
                self.pings += 1
                self.transport.write(b"\r\n\r\n")

    class OneClientFactory(ClientFactory):
        noisy = False

        def __init__(self, client: LoadClient) -> None:
            self.client = client

        def buildProtocol(self, addr: Any) -> LoadClient:
            return self.client

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            self.client.owner.connect_failed(self.client, reason)

    class Connector:
        """Opens TLS connections that verify the server against the bench CA."""

        def __init__(self, host: str, port: int, ca: str) -> None:
            self.host, self.port = host, port
            self.options = tls.client_options(ca, "localhost")

        def connect(self, client: LoadClient) -> None:
            client.connect_started = time.time()
            factory = TLSMemoryBIOFactory(self.options, True, OneClientFactory(client))
            factory.noisy = False
            reactor.connectTCP(self.host, self.port, factory, timeout=15, bindAddress=(client.source, 0))

    def run_worker(handler: Callable[[str], None], deadline: float) -> None:
        """Commands from stdin to ``handler``; the reactor stops at ``deadline`` whatever happens."""
        # Our reports go out through blocking sys.stdout; StandardIO only reads stdin.
        stdio.StandardIO(Commands(handler), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
        reactor.callLater(max(1.0, deadline - time.time()), _expired)
        reactor.run()

    def _expired() -> None:
        emit({"event": "error", "why": "worker deadline reached"})
        if reactor.running:
            reactor.stop()

    return type("Runtime", (), {
        "reactor": reactor, "LoadClient": LoadClient, "Connector": Connector, "run_worker": staticmethod(run_worker),
        "Request": Request, "Response": Response,
    })


def emit(message: dict[str, Any]) -> None:
    """A worker's report to the coordinator: one JSON line on stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class RegistrationTally:
    """What a registration worker counts in a phase and reports: the REGISTERs that got
    their 200, errors by kind, connect-to-200 latencies, the first start and the last 200.

    Shared by ``registrations.py``'s Twisted workers and ``leanreg.py``'s, which speak
    the same worker protocol to the coordinators."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.first_start = self.last_end = 0.0

    def started(self, at: float) -> None:
        if not self.first_start:
            self.first_start = at

    def succeeded(self, started: float) -> None:
        self.ok += 1
        now = time.time()
        self.last_end = max(self.last_end, now)
        self.latencies.append(1000 * (now - started))

    def failed(self, error: str) -> None:
        self.errors[error] += 1

    def report(self, warmup: bool) -> None:
        """The phase's event: ``warm`` (counts only) or ``registered`` (with the timings)."""
        if warmup:
            emit({"event": "warm", "ok": self.ok, "errors": dict(self.errors)})
            return
        emit({"event": "registered", "ok": self.ok, "errors": dict(self.errors),
              "latencies": [round(x, 3) for x in self.latencies],
              "first_start": self.first_start, "last_end": self.last_end})


def run_to_exit(server: ServerProcess, start: Callable[[], Any]) -> int:
    """Start ``server``, run the reactor until ``start()``'s Deferred fires, stop the server.

    The exit code: 1 (the failure on stderr) when it failed, else 0.
    """
    from twisted.internet import defer, reactor

    outcome: list[Any] = []
    server.create_users()
    server.start()
    try:
        d = start()
        d.addBoth(outcome.append).addBoth(lambda _: reactor.stop())
        reactor.run()  # type: ignore[attr-defined]
    finally:
        server.stop()
    if outcome and isinstance(outcome[0], Exception | defer.Failure):
        print(outcome[0], file=sys.stderr)
        return 1
    return 0
