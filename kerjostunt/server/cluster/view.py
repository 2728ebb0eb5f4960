"""What one instance knows of the others: their leases, and the users bound on each.

Kept in memory so routing an INVITE never waits on the database. It is
filled at start-up from the presence rows (``store/presence.py``), then from
the others' ``bound`` / ``gone`` broadcasts; a lease read by the heartbeat
(or any message from an instance) keeps that instance alive, and a lease
that runs out takes all its users out of the view at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kerjostunt.server.calls.seams import Clock
from kerjostunt.store.presence import BindingRow, Lease


@dataclass(frozen=True)
class RemoteBinding:
    user_id: str
    instance_id: str
    public_ip: str
    public_port: int
    bound_at: float


#: ``listener(user_id, old)``: the user is no longer bound where ``old`` said
Moved = Callable[[str, RemoteBinding], None]


class ClusterView:
    """Users bound on other instances, as far as their leases go."""

    def __init__(self, clock: Clock, me: str, lease: float) -> None:
        self._clock = clock
        self.me = me
        self._lease = lease
        self._expires: dict[str, float] = {}  # instance -> when its lease runs out, our clock
        self._bindings: dict[str, RemoteBinding] = {}
        self._by_instance: dict[str, set[str]] = {}
        self._moved: list[Moved] = []

    def subscribe(self, listener: Moved) -> None:
        self._moved.append(listener)

    def where(self, user_id: str) -> RemoteBinding | None:
        """The user's binding on another live instance, or None."""
        binding = self._bindings.get(user_id)
        if binding is None or not self.alive(binding.instance_id):
            return None
        return binding

    def alive(self, instance_id: str) -> bool:
        return self._expires.get(instance_id, 0.0) > self._clock.seconds()

    def instances(self) -> list[str]:
        return sorted(i for i in self._expires if i != self.me and self.alive(i))

    def __len__(self) -> int:
        return len(self._bindings)

    def heard_from(self, instance_id: str) -> None:
        """A message from an instance proves it alive for a lease more."""
        if instance_id != self.me:
            until = self._clock.seconds() + self._lease
            self._expires[instance_id] = max(self._expires.get(instance_id, 0.0), until)

    def leases_read(self, leases: Iterable[Lease]) -> list[str]:
        """The heartbeat read every lease: returns the instances found dead (their users are dropped)."""
        now = self._clock.seconds()
        seen = {lease.info.instance_id: now + lease.remaining for lease in leases}
        for instance_id, until in seen.items():
            if instance_id != self.me:
                self._expires[instance_id] = until
        for instance_id in list(self._expires):
            if instance_id not in seen:
                self._expires[instance_id] = min(self._expires[instance_id], now)
        dead = [i for i in list(self._expires) if not self.alive(i) and self._by_instance.get(i)]
        for instance_id in dead:
            self.drop_instance(instance_id)
        return dead

    def bound(self, rows: Iterable[BindingRow]) -> None:
        for row in rows:
            if row.instance_id == self.me:
                continue
            self._set(RemoteBinding(row.user_id, row.instance_id, row.public_ip, row.public_port, row.bound_at))

    def gone(self, instance_id: str, users: Iterable[str]) -> None:
        """``instance_id`` no longer holds these users (one that moved elsewhere meanwhile stays)."""
        for user_id in users:
            binding = self._bindings.get(user_id)
            if binding is not None and binding.instance_id == instance_id:
                self._remove(binding)

    def bound_here(self, user_id: str) -> None:
        """This instance bound the user: any other instance's binding is over."""
        binding = self._bindings.get(user_id)
        if binding is not None:
            self._remove(binding)

    def drop_instance(self, instance_id: str) -> None:
        for user_id in list(self._by_instance.get(instance_id, ())):
            binding = self._bindings.get(user_id)
            if binding is not None:
                self._remove(binding)
        self._by_instance.pop(instance_id, None)

    def replace_all(self, rows: Iterable[BindingRow]) -> None:
        """A full reload (start-up, or the bus was lost and notifications may be missing)."""
        fresh = {r.user_id: r for r in rows if r.instance_id != self.me}
        for user_id, binding in list(self._bindings.items()):
            row = fresh.get(user_id)
            if row is None or row.instance_id != binding.instance_id:
                self._remove(binding)
        self.bound(fresh.values())

    def add_missing(self, rows: Iterable[BindingRow]) -> None:
        """Rows of users the view does not know (a second read at start-up): never overrides news."""
        self.bound(r for r in rows if r.user_id not in self._bindings)

    def _set(self, binding: RemoteBinding) -> None:
        old = self._bindings.get(binding.user_id)
        if old is not None and old.instance_id != binding.instance_id:
            self._remove(old)
        self._bindings[binding.user_id] = binding
        self._by_instance.setdefault(binding.instance_id, set()).add(binding.user_id)

    def _remove(self, binding: RemoteBinding) -> None:
        del self._bindings[binding.user_id]
        users = self._by_instance.get(binding.instance_id)
        if users is not None:
            users.discard(binding.user_id)
        for listener in self._moved:
            listener(binding.user_id, binding)
