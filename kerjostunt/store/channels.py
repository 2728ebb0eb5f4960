"""PostgreSQL LISTEN/NOTIFY as a message bus between server instances.

``Channels`` keeps one dedicated psycopg2 connection in asynchronous mode
that LISTENs and sends; its socket is watched by the reactor, so a
notification is read when it arrives, a query's end is seen when it
comes, and nothing waits on the database on the reactor thread (psycopg2's
``poll`` only consumes what the socket already holds). One connection,
not a listener and a sender: PostgreSQL wakes every listening backend of
the database for each transaction that notifies, except the notifying one,
which reads its own at commit; with one connection an instance's sends
wake only the others' backends. One query at a time keeps the order of
what one instance sends: what is sent while a round trip is out goes in
the next one, packed per channel into as few notifications as fit
(``store/outbox.py``); the receiver splits them again, so ``received``
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
    """A connection in psycopg2's asynchronous mode, set up and LISTENing (in the thread: select waits here)."""
    import psycopg2

    connection = psycopg2.connect(dsn, async_=1)
    _wait(connection)
    for channel in listen:
        cursor = connection.cursor()
        cursor.execute(f'LISTEN "{channel}"')
        _wait(connection)
    return connection


def _wait(connection: Any) -> None:
    import select

    import psycopg2.extensions

    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        wait_read = state == psycopg2.extensions.POLL_READ
        select.select([connection] if wait_read else [], [] if wait_read else [connection], [], 10.0)


@implementer(IReadDescriptor, IWriteDescriptor)
class Channels:
    """LISTEN on some channels, NOTIFY any; ``received(channel, payload)`` on the reactor thread.

    ``lost(reason)`` is called once when the connection fails; the owner
    makes a new ``Channels`` (and resynchronizes what it may have missed).
    psycopg2's asynchronous mode runs one query at a time (the outbox sends
    the next batch once this one is done) and is always in autocommit: each
    batch is one implicit transaction.
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
        self._connection: Any = None
        self._cursor: Any = None  # the query in flight's; psycopg2 needs it alive until the poll says done
        self._outbox = Outbox(reactor, self._send, self._fail, spacing=spacing)
        self._failed = False
        self._delivery_due = False

    def start(self) -> Deferred[None]:
        """Connect and LISTEN (in the thread); fires once notifications are being read."""
        self._pool.start()
        d = deferToThreadPool(self._reactor, self._pool, _connect, self._dsn, self._listen)
        return d.addCallback(self._connected)

    def _connected(self, connection: Any) -> None:
        if self._failed:  # closed while connecting
            connection.close()
            return
        self._connection = connection
        self._reactor.addReader(self)
        self._outbox.start()
        self._poll()  # notifications that came while LISTEN was set up

    def notify(self, channel: str, payload: str) -> bool:
        """Queue one payload (in order with this instance's others to ``channel``); False: dropped."""
        return self._outbox.add(channel, payload)

    def flushed(self) -> Deferred[None]:
        """Fires when everything queued so far has been sent (or sending failed)."""
        return self._outbox.flushed()

    def _send(self, batch: list[tuple[str, str]]) -> None:
        if self._connection is None or self._failed:
            return
        self._cursor = cursor = self._connection.cursor()
        query = b";".join(cursor.mogrify("SELECT pg_notify(%s, %s)", item) for item in batch)
        cursor.execute(query)
        self._advance()
        # Not handed over here (we may be inside a handler of one), but what this poll read
        # off the socket is in ``notifies`` now, and the socket may never be readable again
        # for it: hand it over in a turn of its own. Left there, the last message of a
        # burst waited for whatever notification came next.
        if self._connection is not None and self._connection.notifies and not self._delivery_due:
            self._delivery_due = True
            self._reactor.callLater(0, self._deliver)

    def _advance(self) -> int | None:
        """Poll: the connection's state (None: it failed); a query's end lets the outbox send the next."""
        import psycopg2
        import psycopg2.extensions

        if self._connection is None:
            return None  # closed earlier in this reactor turn
        try:
            state: int = self._connection.poll()
        except psycopg2.Error as exc:
            self._fail(f"connection: {exc}")
            return None
        # The socket stays watched for reading (notifications, and a closed
        # connection is noticed at once), so a query costs no epoll changes.
        if state == psycopg2.extensions.POLL_WRITE:
            self._reactor.addWriter(self)
        else:
            self._reactor.removeWriter(self)
        if state == psycopg2.extensions.POLL_OK and self._cursor is not None:
            self._cursor = None
            self._outbox.sent()  # may send the next batch at once (its own _advance)
        return state

    def _poll(self) -> None:
        """Advance the query in flight, then hand over the notifications that came, in order."""
        if self._advance() is None:
            return
        self._deliver()

    def _deliver(self) -> None:
        self._delivery_due = False
        if self._connection is None:
            return
        notifies = self._connection.notifies
        while notifies and not self._failed:
            note = notifies.pop(0)
            for payload in unpack(note.payload):
                try:
                    self._received(note.channel, payload)
                except Exception:
                    log.failure("Handling a notification on {channel} failed", channel=note.channel)

    # -- IReadDescriptor, IWriteDescriptor ----------------------------------------------

    def fileno(self) -> int:
        connection = self._connection
        return int(connection.fileno()) if connection is not None and not connection.closed else -1

    def doRead(self) -> None:
        self._poll()

    def doWrite(self) -> None:
        self._poll()

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
        """Stop reading and sending (what is in flight may be lost), close the connection."""
        self._failed = True
        if self._connection is not None:
            self._reactor.removeReader(self)
            self._reactor.removeWriter(self)
            try:
                self._connection.close()
            except Exception:  # psycopg2.Error: closing a broken connection
                log.debug("closing the channel connection failed")
        if self._pool.started:
            self._pool.stop()  # only ever connects: idle but for a start in progress
        self._connection = self._cursor = None
        self._outbox.close()
