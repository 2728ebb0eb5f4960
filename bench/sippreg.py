"""SIPp as cluster.py's REGISTER load generator: a compiled third-party client, TLS and digest.

Each sipp process runs ``sipp/register_hold.xml`` over TLS with one
connection per call (``-t ln``) for a contiguous range of users, read from
an injection file (``-inf``, ``USER;PASSWORD`` lines), from its own source
address (sipp binds every TCP/TLS socket to ``-i``; the server allows 1000
connections per address, so at most 900 users per process), and holds each
connection open (the scenario's ``<pause/>``, ``-d`` milliseconds) until the
coordinator stops it.

TLS: sipp's OpenSSL (the system's), a full handshake per call; with
``verify`` the chain is checked against the bench CA (``-tls_ca``), not the
name (sipp has no host check). sipp wants a certificate and key of its own
even as a client (``-tls_cert``/``-tls_key``): a throwaway self-signed one.

sipp's TLS handshake blocks its one thread (SSL_connect in a loop), so a
process has one handshake in flight at a time; ``per_target`` processes per
instance keep each instance busy. It must be a sipp built with TLS and the
poll patch (``sipp/build-sipp.sh``): unpatched, every handshake sleeps
200 ms.

Counting: ``-trace_rtt -rtt_freq 1`` writes a line per 200 (its time, on
sipp's clock from the process start, and the REGISTER-to-200 time); failed
calls come from the ``-trace_stat`` file, written every second.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

SCENARIO = Path(__file__).resolve().parent / "sipp" / "register_hold.xml"
PER_ADDRESS = 900  # users per sipp process: one source address each, under the server's --max-per-ip 1000


def find_sipp(path: str | None) -> tuple[str, str] | None:
    """(path, version) of the sipp to use (``path``, or ``sipp`` on PATH) if it speaks TLS, else None."""
    exe = path or shutil.which("sipp")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version = next((w.rstrip(".") for w in out.split() if w.startswith(("v3", "v4"))), "?")
    return (exe, version) if "TLS" in version else None


def write_client_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate: sipp loads one even as a TLS client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sipp bench client")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "sipp-cert.pem", directory / "sipp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class SippProcess:
    """One sipp: its users, target, files and the process."""

    workdir: Path
    users: range
    target: tuple[str, int]
    source: str
    proc: subprocess.Popen[bytes] | None = None
    spawned: float = 0.0
    last_cpu: float = 0.0

    @property
    def rtt_file(self) -> Path:
        return self.workdir / f"{SCENARIO.stem}_{self.proc.pid if self.proc else 0}_rtt.csv"

    @property
    def stat_file(self) -> Path:
        return self.workdir / "stat.csv"

    def command(self, sipp: str, cert: tuple[Path, Path], ca: str | None, hold_ms: int, timeout: float) -> list[str]:
        n = len(self.users)
        inf = self.workdir / "users.csv"
        inf.write_text("SEQUENTIAL\n" + "".join(f"{common.user_id(i)};{common.password_of(common.user_id(i))}\n"
                                              for i in self.users))
        port = common.free_ports(1, self.source)[0]  # sipp listens on -p too, even as a TLS client
        return [
            sipp, f"{self.target[0]}:{self.target[1]}", "-sf", str(SCENARIO), "-t", "ln",
            "-i", self.source, "-p", str(port),
            "-tls_cert", str(cert[0]), "-tls_key", str(cert[1]), *(["-tls_ca", ca] if ca else []),
            "-inf", str(inf), "-key", "domain", common.DOMAIN, "-auth_uri", common.DOMAIN,
            "-m", str(n), "-l", str(n), "-r", "20000", "-rp", "1000", "-d", str(hold_ms),
            "-max_socket", str(n + 16), "-nd", "-nostdin", "-timeout", f"{math.ceil(timeout)}s",
            "-trace_rtt", "-rtt_freq", "1", "-trace_stat", "-fd", "1", "-stf", str(self.stat_file),
        ]

    def cpu(self) -> float:
        if self.proc is not None:
            try:
                self.last_cpu = common.cpu_seconds(self.proc.pid)
            except OSError:
                pass  # exited: keep the last reading
        return self.last_cpu

    def registered(self) -> list[tuple[float, float]]:
        """(time of the 200 on the wall clock, REGISTER-to-200 ms) of each registration so far."""
        try:
            lines = self.rtt_file.read_text().splitlines()[1:]
        except OSError:
            return []
        out = []
        for line in lines:
            parts = line.split(";")
            if len(parts) >= 2:
                try:
                    out.append((self.spawned + float(parts[0]) / 1000, float(parts[1])))
                except ValueError:
                    pass  # a line being written
        return out

    def failures(self) -> Counter[str]:
        """The failed calls by kind, from the last line of the -trace_stat file (cumulative columns)."""
        try:
            rows = list(csv.reader(self.stat_file.read_text().splitlines(), delimiter=";"))
        except OSError:
            return Counter()
        if len(rows) < 2:
            return Counter()
        header, last = rows[0], rows[-1]
        kinds: Counter[str] = Counter()
        for name, value in zip(header, last):
            counted = name.startswith("Failed") and name.endswith("(C)") and name != "FailedCall(C)"
            if counted and value.isdigit() and int(value):
                kinds[f"sipp {name[:-3]}"] = int(value)
        return kinds


@dataclass
class SippGenerators:
    """K sipp processes spread over the instances, started together, stopped by process object."""

    sipp: str
    workdir: Path
    targets: list[tuple[str, int]]
    clients: int
    ca: str
    verify: bool = True
    per_target: int = 4
    cpus: frozenset[int] | None = None
    processes: list[SippProcess] = field(default_factory=list)

    def plan(self) -> None:
        count = max(self.per_target * len(self.targets), math.ceil(self.clients / PER_ADDRESS))
        count = min(count, 250, self.clients)
        for k, users in enumerate(common.split(self.clients, count)):
            directory = self.workdir / f"sipp{k}"
            directory.mkdir(parents=True, exist_ok=True)
            self.processes.append(SippProcess(directory, users, self.targets[k % len(self.targets)],
                                              f"127.0.0.{2 + k}"))

    def prepare(self) -> None:
        self.plan()

    def go(self, hold_s: float, timeout: float) -> None:
        cert = write_client_certificate(self.workdir)
        env = dict(os.environ, TERM="dumb")
        for p in self.processes:
            cmd = p.command(self.sipp, cert, self.ca if self.verify else None, int(1000 * hold_s), timeout)
            with open(p.workdir / "sipp.out", "wb") as out, common.affinity(self.cpus):
                p.spawned = time.time()
                p.proc = subprocess.Popen(cmd, cwd=p.workdir, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=env)

    def cpu(self) -> float:
        return sum(p.cpu() for p in self.processes)

    def wait_registered(self, timeout: float) -> dict[str, Any]:
        """Poll the files until every call registered or failed (or a sipp exited, or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            done = [p.registered() for p in self.processes]
            failures = sum((p.failures() for p in self.processes), Counter())
            ok = sum(len(d) for d in done)
            exited = [p for p in self.processes if p.proc is not None and p.proc.poll() is not None]
            if ok + sum(failures.values()) >= self.clients or exited or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        errors = failures
        missing = self.clients - ok - sum(failures.values())
        if missing > 0:
            errors["no 200 (sipp exited or timed out)" if exited else "no 200 before the timeout"] += missing
        ends = [t for d in done for t, _ in d]
        starts = [t - ms / 1000 for d in done for t, ms in d]
        return {"ok": ok, "errors": dict(errors), "latencies": [ms for d in done for _, ms in d],
                "first_start": min(starts) if starts else 0.0, "last_end": max(ends) if ends else 0.0}

    def stop(self) -> None:
        for p in self.processes:
            if p.proc is not None and p.proc.poll() is None:
                p.cpu()
                p.proc.send_signal(signal.SIGTERM)
        for p in self.processes:
            if p.proc is None:
                continue
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
