"""Cluster presence in the database: each instance's lease, and which instance holds each user.

Blocking functions of a ``Database``, run in the store's thread pool with
``AsyncStore.run(presence.heartbeat, ...)``. Leases are kept in the
database's own clock (``now()``), so instances on machines whose clocks
disagree still agree on which of them is alive; what they read back is the
seconds each lease has left.

The rows are the start-up and recovery view only: while an instance runs,
it learns of bindings elsewhere from the other instances' broadcasts
(``server/cluster/``) and of their death from the leases here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert

from kerjostunt.store.database import Database
from kerjostunt.store.models import ClusterBinding, ClusterInstance
from kerjostunt.store.queries import translated

#: seconds a lease that ran out is kept before its instance's rows are deleted
FORGET_AFTER = 60.0

_NOW = func.extract("epoch", func.now())


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance tells the others about itself."""

    instance_id: str
    host: str
    sip_port: int
    probe_ports: tuple[int, ...]


@dataclass(frozen=True)
class Lease:
    """Another (or this) instance as the last heartbeat read it: ``remaining`` seconds of lease."""

    info: InstanceInfo
    remaining: float


@dataclass(frozen=True)
class BindingRow:
    """A user bound on an instance, from its public address."""

    user_id: str
    instance_id: str
    public_ip: str
    public_port: int
    bound_at: float


@translated
def heartbeat(database: Database, me: InstanceInfo, lease: float) -> list[Lease]:
    """Renew ``me``'s lease; forget instances dead for ``FORGET_AFTER``; every lease as it stands.

    One transaction: the read sees the renewal, and ``now()`` is one moment
    for all of it.
    """
    row = {"instance_id": me.instance_id, "host": me.host, "sip_port": me.sip_port,
           "probe_ports": ",".join(str(p) for p in me.probe_ports)}
    with database.engine.begin() as c:
        started = insert(ClusterInstance).values(**row, started_at=_NOW, lease_until=_NOW + lease)
        c.execute(started.on_conflict_do_update(
            index_elements=[ClusterInstance.instance_id], set_={"lease_until": _NOW + lease}))
        dead = select(ClusterInstance.instance_id).where(ClusterInstance.lease_until < _NOW - FORGET_AFTER)
        c.execute(delete(ClusterBinding).where(ClusterBinding.instance_id.in_(dead)))
        c.execute(delete(ClusterInstance).where(ClusterInstance.lease_until < _NOW - FORGET_AFTER))
        rows = c.execute(select(ClusterInstance.instance_id, ClusterInstance.host, ClusterInstance.sip_port,
                                ClusterInstance.probe_ports, ClusterInstance.lease_until - _NOW)).all()
    return [Lease(InstanceInfo(i, host, port, _ports(probes)), float(left))
            for i, host, port, probes, left in rows]


def _upsert() -> Any:
    statement = insert(ClusterBinding)
    return statement.on_conflict_do_update(
        index_elements=[ClusterBinding.user_id],
        set_={name: statement.excluded[name] for name in ("instance_id", "public_ip", "public_port", "bound_at")})


_UPSERT = _upsert()


@translated
def write_bindings(database: Database, instance_id: str, bound: Sequence[BindingRow],
                   unbound: Sequence[str]) -> None:
    """This instance's new bindings (taking a user over from any other) and the ones it lost.

    An unbind deletes only this instance's row: the user may be bound
    elsewhere already.
    """
    with database.engine.begin() as c:
        if unbound:
            c.execute(delete(ClusterBinding).where(ClusterBinding.user_id.in_(list(unbound)),
                                                   ClusterBinding.instance_id == instance_id))
        if bound:
            rows = [{"user_id": b.user_id, "instance_id": b.instance_id, "public_ip": b.public_ip,
                     "public_port": b.public_port, "bound_at": b.bound_at} for b in bound]
            c.execute(_UPSERT, rows)  # one cached statement, executemany (psycopg2: batched VALUES)


@translated
def load_bindings(database: Database, excluding: str) -> list[BindingRow]:
    """Every binding held by a live instance other than ``excluding``."""
    alive = select(ClusterInstance.instance_id).where(ClusterInstance.lease_until >= _NOW,
                                                       ClusterInstance.instance_id != excluding)
    with database.engine.connect() as c:
        rows = c.execute(select(ClusterBinding.user_id, ClusterBinding.instance_id, ClusterBinding.public_ip,
                                ClusterBinding.public_port, ClusterBinding.bound_at)
                         .where(ClusterBinding.instance_id.in_(alive))).all()
    return [BindingRow(*row) for row in rows]


@translated
def leave(database: Database, instance_id: str) -> None:
    """A clean stop: this instance's bindings and lease are gone for the others at once."""
    with database.engine.begin() as c:
        c.execute(delete(ClusterBinding).where(ClusterBinding.instance_id == instance_id))
        c.execute(update(ClusterInstance).where(ClusterInstance.instance_id == instance_id)
                  .values(lease_until=_NOW - FORGET_AFTER - 1))


@translated
def database_time(database: Database) -> float:
    """The database's clock (tests compare leases with it)."""
    with database.engine.connect() as c:
        return float(c.execute(text("SELECT extract(epoch from now())")).scalar_one())


def _ports(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip().isdigit())
