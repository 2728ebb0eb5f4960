"""CPU the rest of the machine spends: the PostgreSQL server's processes, and all CPUs together.

On a 2-core machine the instances share the cores with the load generators
and PostgreSQL, so cluster.py reports each one's CPU per registration: the
two-instance rate is bounded by 2 / (server + generator + PostgreSQL CPU per
registration) however well the instances scale.

PostgreSQL's CPU: utime + stime, from ``/proc``, of the postmaster listening
on the URL's port, its background processes (checkpointer, WAL writer, ...)
and the backends connected to the URL's database (their title names it:
``postgres: USER DATABASE HOST(PORT) STATE``); backends of other databases
(other benches or tests on the same cluster) are left out. A backend that
exits between two readings loses its CPU; the instances' pools keep theirs
open for the whole phase.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

import common


def _read(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().decode(errors="replace")


def _postgres_pids() -> dict[int, tuple[int, str]]:
    """Every process called ``postgres``: pid -> (parent pid, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if _read(pid, "comm").strip() != "postgres":
                continue
            ppid = int(_read(pid, "stat").rsplit(")", 1)[1].split()[1])
            found[pid] = (ppid, _read(pid, "cmdline").replace("\0", " ").strip())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def postgres_cpu(url: str) -> dict[int, float] | None:
    """CPU seconds of each process of the PostgreSQL server behind ``url`` (see the module), by pid.

    None when that server is not on this machine. ``cpu_delta`` subtracts two readings.
    """
    parts = urlsplit(url)
    port, database = str(parts.port or 5432), parts.path.lstrip("/")
    procs = _postgres_pids()
    masters = [pid for pid, (ppid, _) in procs.items() if ppid not in procs]
    mine = [pid for pid in masters if f"-p {port}" in procs[pid][1] or f"port={port}" in procs[pid][1]]
    if not mine and len(masters) == 1:
        mine = masters
    if len(mine) != 1:
        return None
    master = mine[0]
    seconds = {}
    for pid, (ppid, cmdline) in procs.items():
        if pid != master and ppid != master:
            continue
        words = cmdline.split()
        backend = len(words) >= 4 and "(" in words[3]  # postgres: USER DATABASE HOST(PORT) STATE
        if backend and words[2] != database:
            continue
        try:
            seconds[pid] = common.cpu_seconds(pid)
        except OSError:
            pass
    return seconds


def cpu_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float:
    """CPU seconds spent between two ``postgres_cpu`` readings by the processes alive at the second; NaN unknown."""
    if before is None or after is None:
        return float("nan")
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / common.CLK_TCK


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave the guest's vCPUs to others since boot (``/proc/stat``'s steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields + [0] * 8)[7] / common.CLK_TCK


class StealWatch:
    """Steal time over a phase, and its worst ``interval``: whether the host took the CPUs away.

    A phase's slow calls that come in bursts at every process at once look
    like the machine rather than one process (docs/performance.rst); the
    guest's steal counter says whether the host ran something else then.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.worst = 0.0
        self._stop = threading.Event()
        self._start = self._last = steal_seconds()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            now = steal_seconds()
            self.worst = max(self.worst, now - self._last)
            self._last = now

    def stop(self) -> float:
        """Ends the watch; returns the phase's steal in CPU seconds."""
        self._stop.set()
        self._thread.join()
        return steal_seconds() - self._start
