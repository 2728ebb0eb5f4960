"""PostgreSQL LISTEN/NOTIFY as a message bus between server instances.

``Channels`` keeps one dedicated psycopg2 connection that LISTENs; its socket
is an ``IReadDescriptor`` on the reactor, so a notification is read when it
arrives and nothing waits on the database on the reactor thread (psycopg2's
``poll`` only consumes what the socket already holds). Sending goes through
a second connection in a one-thread pool of its own: one thread keeps the
order of what one instance sends, and everything queued while a round trip
is out goes in the next one, as one multi-statement query.

PostgreSQL folds identical notifications sent in one transaction into one,
so every payload the server sends carries a sequence number
(``server/cluster/envelope.py``). A payload is at most ``MAX_PAYLOAD``
bytes (PostgreSQL's limit is 8000).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import make_url
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorFromThreads, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

log = Logger()

MAX_PAYLOAD = 7900
SEND_BATCH = 200  # notifications per round trip at most


class IChannelsReactor(IReactorFDSet, IReactorFromThreads):
    """What the channels need of a reactor (typing only, as ``store.api.IStoreReactor``)."""


def libpq_dsn(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (driver suffix dropped)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(dsn: str, listen: Sequence[str]) -> Any:
    import psycopg2  # here: an install for SQLite only need not have it
    import psycopg2.extensions

    connection = psycopg2.connect(dsn)
    connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    with connection.cursor() as cursor:
        for channel in listen:
            cursor.execute(f'LISTEN "{channel}"')
    return connection


def _send(connection: Any, batch: list[tuple[str, str]]) -> None:
    with connection.cursor() as cursor:
        query = b";".join(cursor.mogrify("SELECT pg_notify(%s, %s)", item) for item in batch)
        cursor.execute(query)


@implementer(IReadDescriptor)
class Channels:
    """LISTEN on some channels, NOTIFY any; ``received(channel, payload)`` on the reactor thread.

    ``lost(reason)`` is called once when either connection fails; the owner
    makes a new ``Channels`` (and resynchronizes what it may have missed).
    """

    def __init__(self, reactor: IChannelsReactor, url: str, listen: Sequence[str],
                 received: Callable[[str, str], None], lost: Callable[[str], None]) -> None:
        self._reactor = reactor
        self._dsn = libpq_dsn(url)
        self._listen = tuple(listen)
        self._received = received
        self._lost = lost
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="kerjostunt-notify")
        self._listener: Any = None
        self._sender: Any = None
        self._queue: list[tuple[str, str]] = []
        self._sending = False
        self._failed = False
        self._flushed: list[Deferred[None]] = []

    def start(self) -> Deferred[None]:
        """Connect and LISTEN (in the thread); fires once notifications are being read."""
        self._pool.start()

        def both() -> tuple[Any, Any]:
            return _connect(self._dsn, self._listen), _connect(self._dsn, ())

        d = deferToThreadPool(self._reactor, self._pool, both)
        return d.addCallback(self._connected)

    def _connected(self, connections: tuple[Any, Any]) -> None:
        self._listener, self._sender = connections
        self._reactor.addReader(self)
        self._pump()

    def notify(self, channel: str, payload: str) -> None:
        """Queue one notification (in order with this instance's others)."""
        if len(payload.encode()) > MAX_PAYLOAD:
            log.warn("Dropped a {size}-byte notification to {channel}", size=len(payload), channel=channel)
            return
        self._queue.append((channel, payload))
        self._pump()

    def flushed(self) -> Deferred[None]:
        """Fires when everything queued so far has been sent (or sending failed)."""
        d: Deferred[None] = Deferred()
        if not self._queue and not self._sending:
            d.callback(None)
        else:
            self._flushed.append(d)
        return d

    def _pump(self) -> None:
        if self._sending or self._sender is None or self._failed:
            return
        if not self._queue:
            waiters, self._flushed = self._flushed, []
            for waiter in waiters:
                waiter.callback(None)
            return
        batch, self._queue = self._queue[:SEND_BATCH], self._queue[SEND_BATCH:]
        self._sending = True
        d = deferToThreadPool(self._reactor, self._pool, _send, self._sender, batch)
        d.addCallbacks(self._sent, self._send_failed)

    def _sent(self, _: None) -> None:
        self._sending = False
        self._pump()

    def _send_failed(self, failure: Failure) -> None:
        self._sending = False
        self._fail(f"sending: {failure.getErrorMessage()}")

    # -- IReadDescriptor -------------------------------------------------------------

    def fileno(self) -> int:
        return int(self._listener.fileno()) if self._listener is not None else -1

    def doRead(self) -> None:
        import psycopg2

        try:
            self._listener.poll()
        except psycopg2.Error as exc:
            self._fail(f"listening: {exc}")
            return
        notifies = self._listener.notifies
        while notifies:
            note = notifies.pop(0)
            try:
                self._received(note.channel, note.payload)
            except Exception:
                log.failure("Handling a notification on {channel} failed", channel=note.channel)

    def connectionLost(self, reason: Failure) -> None:
        self._fail(f"connection lost: {reason.getErrorMessage()}")

    def logPrefix(self) -> str:
        return "kerjostunt-channels"

    # -- ending ----------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self._failed:
            return
        log.warn("Cluster channels failed ({why})", why=why)
        self.close()
        self._lost(why)

    def close(self) -> None:
        """Stop reading, let the thread finish what it is sending, close both connections."""
        self._failed = True
        if self._listener is not None:
            self._reactor.removeReader(self)
        if self._pool.started:
            self._pool.stop()  # joins the thread: at most one round trip in flight
        for connection in (self._listener, self._sender):
            if connection is not None:
                try:
                    connection.close()
                except Exception:  # psycopg2.Error: closing a broken connection
                    log.debug("closing a channel connection failed")
        self._listener = self._sender = None
        waiters, self._flushed = self._flushed, []
        for waiter in waiters:
            waiter.callback(None)
