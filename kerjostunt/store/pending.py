"""Usage records the server could not write yet: the pending file.

What the server records about its peers (an outcome acknowledged with a
200, a last-seen address, a NAT description) must not be lost because the
database is locked or down for a while. ``AsyncStore`` keeps such records
in memory, retried until written; this module is where they go when
memory is not enough: past the in-memory bound while the server runs, and
whatever is still unwritten at a clean stop. The next start reads the file
back into the queue (``AsyncStore.replay_pending``) and removes it.

One JSON object a line, ``{"op": NAME, "args": [...], "kwargs": {...}}``:
the ``Database`` method and its arguments, so a record is replayed exactly
as it was first tried. Only the methods in ``USAGE_OPS`` are accepted back.
The file is created mode 0600, like the database (user IDs and addresses).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

#: the ``Database`` methods whose records are kept, and what each call's
#: Deferred fires with when its record went to the file instead of the
#: database: record_attempt's new states are not known then (nor a
#: record_attempts_many batch's), and
#: record_seen_many names no unknown user
USAGE_OPS: dict[str, Any] = {"record_attempt": {}, "record_attempts_many": [], "record_seen_many": [],
                             "record_nat": None}


@dataclass(frozen=True)
class Record:
    """One kept call: a ``Database`` method's name and its arguments."""

    op: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def line(self) -> str:
        return json.dumps({"op": self.op, "args": list(self.args), "kwargs": self.kwargs}, sort_keys=True) + "\n"


class PendingFile:
    """Append records to the file, or take them all back (and remove it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: Iterable[Record]) -> int:
        """Write ``records`` at the end of the file; how many. OSError if it cannot."""
        text = "".join(record.line() for record in records)
        if not text:
            return 0
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return text.count("\n")

    def take(self) -> tuple[list[Record], list[str]]:
        """Every record in the file and the complaints about lines that are not
        one; the file is removed (a file that cannot be read stays)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return [], []
        records: list[Record] = []
        problems: list[str] = []
        bad: list[str] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(parse(line))
            except ValueError as e:
                problems.append(f"{self.path}:{number}: {e}")
                bad.append(line if line.endswith("\n") else line + "\n")
        if bad:  # kept for a person to look at, beside the file
            rejected = self.path.with_name(self.path.name + ".rejected")
            fd = os.open(rejected, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.writelines(bad)
        self.path.unlink()
        return records, problems


def parse(line: str) -> Record:
    """One line back into a Record; ValueError if it is not one of ours."""
    try:
        document = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    op, args, kwargs = document.get("op"), document.get("args", []), document.get("kwargs", {})
    if op not in USAGE_OPS:
        raise ValueError(f"unknown op {op!r}")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("args must be a list and kwargs an object")
    return Record(op, tuple(args), kwargs)


class Keeper:
    """The pending file as the store uses it: each record saved or lost is counted and logged.

    ``path`` None (an in-memory database) has nowhere to keep records: a
    record that cannot be written then is lost, with a critical log line.
    """

    log = Logger()

    def __init__(self, path: Path | None, count: Callable[[str], None]) -> None:
        self.file = PendingFile(path) if path is not None else None
        self._count = count

    def keep(self, records: list[Record], why: str) -> bool:
        """Append to the file; False (and a critical line) if there is none or it fails."""
        try:
            if self.file is None:
                raise OSError("no pending file for an in-memory database")
            written = self.file.append(records)
        except OSError as e:
            for _ in records:
                self._count("store_records_lost")
            self.log.critical("{n} usage records lost ({why}): {error}", n=len(records), why=why, error=e)
            return False
        for _ in range(written):
            self._count("store_records_saved")
        self.log.warn("{n} usage records kept in {path} ({why}), written at the next start",
                      n=written, path=self.file.path, why=why)
        return True

    def take(self) -> list[Record]:
        """The file's records (the file removed), its bad lines logged."""
        if self.file is None:
            return []
        try:
            records, problems = self.file.take()
        except OSError as e:
            self.log.error("Cannot read the pending file {path}: {why}", path=self.file.path, why=e)
            return []
        for problem in problems:
            self.log.error("Pending record not replayed (kept in .rejected): {problem}", problem=problem)
        for _ in records:
            self._count("store_records_replayed")
        if records:
            self.log.info("Replaying {n} usage records from {path}", n=len(records), path=self.file.path)
        return records
