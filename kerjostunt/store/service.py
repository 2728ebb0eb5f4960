"""The store as a twistd service: the upgrade before the reactor runs, the queued writes at the stop."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from kerjostunt.store.api import AsyncStore

__all__ = ["StoreService"]


class StoreService(Service):
    """Owns an ``AsyncStore`` for ``twistd``.

    ``startService`` runs the Alembic upgrade synchronously: twistd calls it
    before the reactor runs, so no request is ever served against an old
    schema, and a failing upgrade stops the start with a clear error instead
    of a half-working server. It makes the database's files private (0600,
    a warning for each that was not) and queues the records a previous run
    left in the pending file. With ``realm`` it then claims the database's
    realm (store/realm.py): another stored realm, or a read-only database,
    stops the start too. ``stopService`` waits for queued writes.
    """

    def __init__(self, store: AsyncStore, upgrade: bool = True, realm: str | None = None) -> None:
        self.store = store
        self._upgrade = upgrade
        self._realm = realm

    def startService(self) -> None:
        for warning in self.store.database.secure_files():  # before SQLite makes -wal and -shm like it
            self.store.log.warn("{problem}", problem=warning)
        if self._upgrade:
            self.store.database.upgrade()
        if self._realm is not None:
            # The database's realm must be the server's (RealmMismatch), and the
            # database writable: claim_realm always writes.
            self.store.database.claim_realm(self._realm, self._realm)
        self.store.start()
        self.store.replay_pending()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.store.stop()
