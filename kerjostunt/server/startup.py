"""A server that cannot start says why in one line and exits non-zero.

twistd prints 40 to 140 lines of traceback for a busy port or a bad
database file, and the cause is on the last one. ``StartGuard`` holds the
server (``tap.makeService`` puts it there) and turns the failures an
operator can fix into one ``critical`` log line and exit code 1:
``describe`` says which line each gets.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from kerjostunt import __version__, tls
from kerjostunt.server.service import StuntServer
from kerjostunt.store import StoreError
from kerjostunt.store.realm import RealmMismatch

__all__ = ["StartGuard", "StartFailed", "describe", "start_line"]

log = Logger(namespace="kerjostunt.server")


class StartFailed(SystemExit):
    """Raised after the one line is logged: twistd ends with code 1 and no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message


def _database(db_url: str) -> str:
    """The database as an operator names it: the SQLite file's absolute path, else the URL's host part."""
    if db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///"):].split("?", 1)[0]
        if path.startswith("file:"):
            path = path[len("file:"):]
        return os.path.abspath(path) if path and path != ":memory:" else db_url
    return db_url.rpartition("@")[2] if "@" in db_url else db_url


def _store_message(error: StoreError, db_url: str) -> str:
    text, where = str(error), _database(db_url)
    if isinstance(error, RealmMismatch):
        return f"cannot start with --domain {error.wanted}: {text}"
    if "unable to open database file" in text or "cannot create database file" in text:
        folder = os.path.dirname(where)
        if db_url.startswith("sqlite:") and folder and not os.path.isdir(folder):
            return f"cannot open the database {where}: the directory {folder} does not exist"
        return f"cannot open the database {where}"
    if "file is not a database" in text or "malformed" in text:
        return f"the database {where} is not a usable SQLite database (corrupt, or another kind of file)"
    if "readonly database" in text or "read-only" in text:
        return f"the database {where} is read-only: the server writes to it (who is seen, NAT, call outcomes)"
    return f"cannot use the database {where}: {text}"


def describe(error: BaseException, db_url: str) -> str | None:
    """The one line for a start failure an operator can fix; None for a bug (keep its traceback)."""
    if isinstance(error, CannotListenError):
        cause = error.socketError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        where = error.interface or "all addresses"
        hint = " (another server running?)" if getattr(cause, "errno", None) == errno.EADDRINUSE else ""
        return f"cannot listen on port {error.port} ({where}): {reason.lower()}{hint}"
    if isinstance(error, StoreError):
        return _store_message(error, db_url)
    if isinstance(error, OSError):
        name = f" {error.filename}" if error.filename else ""
        return f"cannot start:{name} {error.strerror or error}".replace(": :", ":")
    return None


def _critical(message: str) -> None:
    log.critical("{line}", line=message)


def _stderr(message: str) -> None:
    # Before twistd starts its log (makeService), a log event would wait in its buffer forever.
    print(f"kerjostunt: error: {message}", file=sys.stderr)


@contextmanager
def one_line(db_url: str, emit: Callable[[str], None] = _critical) -> Iterator[None]:
    """Run a start step; a failure ``describe`` knows becomes one line and ``StartFailed``."""
    try:
        yield
    except Exception as error:
        message = describe(error, db_url)
        if message is None:
            raise
        emit(message)
        raise StartFailed(message) from None


def twistd_teller(twistd_options: Any) -> Callable[[str], None]:
    """What twistd itself does for a start failure it sees, for ours (which it does not see).

    A daemonized twistd's parent waits on the status pipe for ``1 REASON``
    (else it waits forever), and the pid file is removed.
    """

    def tell(message: str) -> None:
        if twistd_options is None:
            return
        pipe = twistd_options.get("statusPipe")
        if isinstance(pipe, int):
            try:
                os.write(pipe, b"1 " + message.encode("utf-8", "replace")[:98])
                os.close(pipe)
            except OSError:
                pass
        pidfile = twistd_options.get("pidfile")
        if pidfile:
            try:
                os.remove(pidfile)
            except OSError:
                pass

    return tell


class StartGuard(MultiService):
    """The server's parent for twistd: its start steps fail in one line."""

    def __init__(self, db_url: str, build: Callable[[], MultiService],
                 tell_twistd: Callable[[str], None] = lambda message: None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._db_url = db_url
        self._tell_twistd = tell_twistd
        with one_line(db_url, _stderr):
            self.server = build()
        self.server.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _report(self, message: str) -> None:
        _critical(message)
        self._tell_twistd(message)

    def privilegedStartService(self) -> None:
        with one_line(self._db_url, self._report):
            super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        with one_line(self._db_url, self._report):
            super().startService()  # type: ignore[no-untyped-call]
        server = self.server
        if isinstance(server, StuntServer):
            names = list(server.ports)
            gathered = gatherResults([server.ports[name] for name in names])
            gathered.addCallback(lambda ports: log.info("{line}", line=start_line(server, dict(zip(names, ports)))))
            gathered.addErrback(lambda _: None)  # a port that failed was reported in its own line


def _where(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        ip = host.host if host.host not in ("0.0.0.0", "::") else "*"
        return f"[{ip}]:{host.port}" if ":" in ip else f"{ip}:{host.port}"
    return str(host)


def start_line(server: StuntServer, ports: dict[str, IListeningPort]) -> str:
    """The one line an operator reads at start: version, realm, every port, database, CA."""
    settings = server.settings
    probes = " ".join(_where(port) for name, port in ports.items() if name.startswith("probe"))
    if settings.probe_alt_ip:
        probes += f" (alternate address {settings.probe_alt_ip})"
    parts = [f"signaling TLS {_where(ports['sip'])}", f"probes {probes}"]
    if "web" in ports:
        parts.append(f"web HTTPS {_where(ports['web'])}")
    certs = server.certificates
    trust = (f"CA {certs.ca.resolve()} SHA-256 {tls.fingerprint(certs.ca)}" if certs.ca is not None
             else f"certificate {certs.cert.resolve()} SHA-256 {tls.fingerprint(certs.cert)}")
    return (f"kerjostunt {__version__} serving {settings.domain}: {', '.join(parts)}; "
            f"database {_database(settings.db_url)}; {trust}")
