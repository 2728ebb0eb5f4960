"""PostgreSQL LISTEN/NOTIFY as a message bus between server instances.

``Channels`` keeps one dedicated psycopg2 connection that LISTENs; its socket
is an ``IReadDescriptor`` on the reactor, so a notification is read when it
arrives and nothing waits on the database on the reactor thread (psycopg2's
``poll`` only consumes what the socket already holds). Sending goes through
a second connection in psycopg2's asynchronous mode, polled from the
reactor the same way: one query at a time keeps the order of what one
instance sends. What is sent in one reactor turn, or while a round trip is
out, goes in the next one, packed per channel into as few notifications as
fit (``store/outbox.py``): the receiver splits them again, so ``received``
still sees one payload at a time. A thread of its own only connects
(libpq's connection set-up may resolve names and wait).

PostgreSQL folds identical notifications sent in one transaction into one,
so every payload the server sends carries a sequence number
(``server/cluster/envelope.py``). A payload is at most ``MAX_PAYLOAD``
bytes (PostgreSQL's limit is 8000) and has no newline (the separator).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import make_url
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorFromThreads,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from kerjostunt.store.outbox import MAX_PAYLOAD, SPACING, Outbox, unpack

log = Logger()

__all__ = ["MAX_PAYLOAD", "Channels", "IChannelsReactor", "libpq_dsn"]


class IChannelsReactor(IReactorFDSet, IReactorFromThreads, IReactorTime):
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


def _connect_async(dsn: str) -> Any:
    """A connection in psycopg2's asynchronous mode, set up (in the thread: select waits here)."""
    import select

    import psycopg2
    import psycopg2.extensions

    connection = psycopg2.connect(dsn, async_=1)
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return connection
        wait_read = state == psycopg2.extensions.POLL_READ
        select.select([connection] if wait_read else [], [] if wait_read else [connection], [], 10.0)


@implementer(IReadDescriptor, IWriteDescriptor)
class _Sender:
    """The sending connection, asynchronous, polled from the reactor: no thread hand-off per batch.

    psycopg2's asynchronous mode runs one query at a time (``Channels``
    sends the next batch once this one is done) and is always in
    autocommit: each batch is one implicit transaction.
    """

    def __init__(self, reactor: IChannelsReactor, connection: Any, sent: Callable[[], None],
                 failed: Callable[[str], None]) -> None:
        self._reactor = reactor
        self.connection = connection
        self._sent = sent
        self._failed = failed
        self._cursor: Any = None  # the query's; psycopg2 needs it alive until the poll says done

    def send(self, batch: list[tuple[str, str]]) -> None:
        self._cursor = cursor = self.connection.cursor()
        query = b";".join(cursor.mogrify("SELECT pg_notify(%s, %s)", item) for item in batch)
        cursor.execute(query)
        self._poll()

    def _poll(self) -> None:
        import psycopg2
        import psycopg2.extensions

        try:
            state = self.connection.poll()
        except psycopg2.Error as exc:
            self.stop_watching()
            self._failed(f"sending: {exc}")
            return
        # The socket stays watched for reading between queries (a closed
        # connection is noticed at once), so a query costs no epoll changes.
        if state == psycopg2.extensions.POLL_OK:
            self._reactor.removeWriter(self)
            if self._cursor is not None:
                self._cursor = None
                self._sent()
        elif state == psycopg2.extensions.POLL_READ:
            self._reactor.removeWriter(self)
        elif state == psycopg2.extensions.POLL_WRITE:
            self._reactor.addWriter(self)

    def stop_watching(self) -> None:
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)

    def doRead(self) -> None:
        self._poll()

    def doWrite(self) -> None:
        self._poll()

    def fileno(self) -> int:
        return int(self.connection.fileno()) if not self.connection.closed else -1

    def connectionLost(self, reason: Failure) -> None:
        self._failed(f"sending: {reason.getErrorMessage()}")

    def logPrefix(self) -> str:
        return "kerjostunt-notify"


@implementer(IReadDescriptor)
class Channels:
    """LISTEN on some channels, NOTIFY any; ``received(channel, payload)`` on the reactor thread.

    ``lost(reason)`` is called once when either connection fails; the owner
    makes a new ``Channels`` (and resynchronizes what it may have missed).
    """

    def __init__(self, reactor: IChannelsReactor, url: str, listen: Sequence[str],
                 received: Callable[[str, str], None], lost: Callable[[str], None],
                 spacing: float = SPACING) -> None:
        self._reactor = reactor
        self._dsn = libpq_dsn(url)
        self._listen = tuple(listen)
        self._received = received
        self._lost = lost
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="kerjostunt-notify")
        self._listener: Any = None
        self._sender: _Sender | None = None
        self._outbox = Outbox(reactor, self._send, self._fail, spacing=spacing)
        self._failed = False

    def start(self) -> Deferred[None]:
        """Connect and LISTEN (in the thread); fires once notifications are being read."""
        self._pool.start()

        def both() -> tuple[Any, Any]:
            return _connect(self._dsn, self._listen), _connect_async(self._dsn)

        d = deferToThreadPool(self._reactor, self._pool, both)
        return d.addCallback(self._connected)

    def _connected(self, connections: tuple[Any, Any]) -> None:
        self._listener, sender = connections
        self._sender = _Sender(self._reactor, sender, self._outbox.sent, self._fail)
        self._reactor.addReader(self._sender)
        self._reactor.addReader(self)
        self._outbox.start()

    def notify(self, channel: str, payload: str) -> bool:
        """Queue one payload (in order with this instance's others to ``channel``); False: dropped."""
        return self._outbox.add(channel, payload)

    def flushed(self) -> Deferred[None]:
        """Fires when everything queued so far has been sent (or sending failed)."""
        return self._outbox.flushed()

    def _send(self, batch: list[tuple[str, str]]) -> None:
        if self._sender is not None and not self._failed:
            self._sender.send(batch)

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
            for payload in unpack(note.payload):
                try:
                    self._received(note.channel, payload)
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
        """Stop reading and sending (what is in flight may be lost), close both connections."""
        self._failed = True
        if self._listener is not None:
            self._reactor.removeReader(self)
        if self._sender is not None:
            self._sender.stop_watching()
        if self._pool.started:
            self._pool.stop()  # only ever connects: idle but for a start in progress
        for connection in (self._listener, self._sender.connection if self._sender is not None else None):
            if connection is not None:
                try:
                    connection.close()
                except Exception:  # psycopg2.Error: closing a broken connection
                    log.debug("closing a channel connection failed")
        self._listener = self._sender = None
        self._outbox.close()
