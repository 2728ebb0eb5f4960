"""The peer manager: connect to every trusted peer, hold signaling only while needed.

The seed's rule (architecture section 1, issue 6): a peer keeps its signaling
connection to the STUNT server exactly as long as one of its trusted peers is
neither connected nor known to be unreachable. The manager owns that rule. It
does no networking itself; it drives three collaborators passed in (seams.py),
so tests run it on a ``Clock`` with fakes:

- ``directory()``: fetches the group's trusted peers (``PeerEntry`` objects
  with ``user_id``, ``use_stunt``, ...);
- ``agent``: ``start()`` / ``stop()`` the signaling connection,
  ``connect(peer_id, factory, timeout=..., prefer_stunt=...)`` dials a peer
  (direct first, then STUNT), ``signaling_up``; incoming peers are reported
  to ``PeerManager.peer_arrived`` (pass it as the agent's ``on_peer``);
- ``app_factory_for(peer_id)``: the application's protocol factory.

Each peer's life is the machine in peer.py, the signaling connection's the
one in rule.py; this module holds the rules that connect them. See
docs/peer-manager.rst for the states and rules.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.backoff import Backoff
from kerjostunt.client.calls import ConnectFailed
from kerjostunt.client.manager.events import (
    Event,
    PeerListLoaded,
    PeerState,
    PeerStateChanged,
    SignalingChanged,
    SignalingState,
)
from kerjostunt.client.manager.peer import TrackedPeer
from kerjostunt.client.manager.rule import new_rule
from kerjostunt.client.manager.seams import DirectoryEntry, ManagedAgent, ManagedConnection, ManagerClock
from kerjostunt.client.manager.watching import WatchedProtocol, WatchingFactory, close_protocol
from kerjostunt.wire import kerjo

__all__ = ["OFFLINE_CODES", "ManagerConfig", "PeerManager"]

log = Logger()

#: SIP statuses of a call to a peer that is not registered now (absent, not unreachable)
OFFLINE_CODES = (480,)


@dataclass(frozen=True)
class ManagerConfig:
    """The manager's timings and limits (seconds, counts)."""

    #: how often the trusted peers list is reloaded
    refresh_interval: float = 300.0
    #: the long back-off before an unreachable peer is tried again
    unreachable_retry: float = 3600.0
    #: redials, reopening signaling, reloading a list that never loaded: 1 s doubling to 300 s, up to half off
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.5
    #: failed dials in a row before a peer counts as unreachable: 8 with the back-off above is
    #: about two minutes of trying (5, half a minute, gave up birthday pairs on loaded hosts)
    max_failures: int = 8
    connect_timeout: float = 20.0
    #: calls at once: the server orders the calls through one sequential NAT (its NAT lanes),
    #: so concurrent calls no longer take ports out of each other's predicted windows
    max_dials: int = 8
    #: a peer with a lower user ID gets this long to call us first, so two members starting
    #: together make one call, not two crossing ones
    courtesy_delay: float = 3.0

    @property
    def backoff(self) -> Backoff:
        return Backoff.capped(self.backoff_base, self.backoff_max, self.jitter)


class PeerManager:
    """Connects to every trusted peer of a group; owns the signaling rule."""

    def __init__(
        self,
        clock: ManagerClock,
        *,
        group: str,
        user_id: str,
        directory: Callable[[], defer.Deferred[list[Any]]],
        agent: ManagedAgent,
        app_factory_for: Callable[[str | None], IProtocolFactory],
        config: ManagerConfig = ManagerConfig(),
        random: Callable[[], float] = _random.random,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.clock = clock
        self.group = group
        self.user_id = user_id
        self._directory = directory
        self.agent = agent
        self._app_factory_for = app_factory_for
        self.config = config
        self._backoff_of = config.backoff
        self._random = random
        self._on_event = on_event
        self.peers: dict[str, TrackedPeer] = {}
        self._rule, self._rule_core = new_rule(self)
        self.loaded = False
        self._running = False
        self._refresh_call: IDelayedCall | None = None
        self._signaling_retry: IDelayedCall | None = None
        self._signaling_failures = 0
        self._load_failures = 0
        self._fetching: defer.Deferred[Any] | None = None
        self._open_reason = "starting"
        #: the agent's factory for incoming peers (pass it as ``accept_factory``)
        self.accept_factory = WatchingFactory(app_factory_for(None), self._lost)

    @property
    def unreachable_retry(self) -> float:
        return self.config.unreachable_retry

    # -- public view --------------------------------------------------------

    @property
    def signaling(self) -> SignalingState:
        """The signaling connection as the manager sees it: closed, opening, open, closing."""
        return self._rule_core.state

    def state_of(self, peer_id: str) -> PeerState | None:
        return self.peers[peer_id].state

    def states(self) -> dict[str, PeerState | None]:
        return {p.peer_id: p.state for p in self.peers.values()}

    def all_done(self) -> bool:
        return all(p.done for p in self.peers.values())

    def connection_of(self, peer_id: str) -> ManagedConnection | None:
        return self.peers[peer_id].connection

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Load the list and begin; refreshes every ``refresh_interval`` seconds."""
        self._running = True
        self.refresh()

    def stop(self) -> defer.Deferred[None]:
        """Cancel timers and dials, close peer connections and signaling."""
        self._running = False
        for call in (self._refresh_call, self._signaling_retry):
            if call is not None and call.active():
                call.cancel()
        self._refresh_call = self._signaling_retry = None
        if self._fetching is not None:
            self._fetching.cancel()
        for peer in self.peers.values():
            self._let_go(peer)
        done: defer.Deferred[None] = defer.Deferred()
        self._rule.shut("stopping", done)
        return done

    def _let_go(self, peer: TrackedPeer) -> None:
        peer.cancel_timer()
        if peer.dialing is not None:
            peer.dialing.cancel()
        for proto in [peer.protocol, *peer.extras]:
            if proto is not None:
                proto.close()

    def refresh(self) -> defer.Deferred[Any]:
        """Fetch the trusted peers now (also run periodically)."""
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        d: defer.Deferred[Any] = defer.maybeDeferred(self._directory)
        self._fetching = d
        d.addCallbacks(self._loaded, self._load_failed)
        d.addBoth(self._fetched, d)
        return d

    def _fetched(self, result: object, d: defer.Deferred[Any]) -> None:
        if self._fetching is d:
            self._fetching = None

    def _schedule_refresh(self, delay: float) -> None:
        if self._running:
            self._refresh_call = self.clock.callLater(delay, self.refresh)

    def _load_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) or not self._running:
            return
        self._load_failures += 1
        if self.loaded:
            delay = self.config.refresh_interval
        else:
            delay = self._backoff(self._load_failures)
        log.warn(
            "Could not load the trusted peers of {group}: {error}; again in {delay:.1f}s",
            group=self.group, error=failure.getErrorMessage(), delay=delay,
        )
        self._schedule_refresh(delay)

    def _loaded(self, entries: list[DirectoryEntry]) -> None:
        if not self._running:
            return
        self._load_failures = 0
        first = not self.loaded
        self.loaded = True
        fresh = {entry.user_id: entry for entry in entries if entry.user_id != self.user_id}
        added = [pid for pid in fresh if pid not in self.peers]
        removed = [pid for pid in self.peers if pid not in fresh]
        for pid in removed:
            self._forget(pid)
        changed: list[str] = []
        for pid, entry in fresh.items():
            peer = self.peers.get(pid)
            if peer is None:
                self._track(pid, entry)
            else:
                old_flag, peer.entry = peer.flag, entry
                if old_flag != peer.flag:
                    self._flag_changed(peer, old_flag)
                    changed.append(pid)
        self._emit(PeerListLoaded(tuple(sorted(fresh)), tuple(added), tuple(removed)))
        if first:
            self._open_reason = "starting"
        elif added:
            self._open_reason = f"list changed: new peer {', '.join(added)}"
        elif changed:
            self._open_reason = f"list changed: {', '.join(changed)}"
        self._schedule_refresh(self.config.refresh_interval)
        self._reconcile()

    def _track(self, pid: str, entry: DirectoryEntry) -> None:
        """A peer new in the list: pending, unless the server says unreachable or it is its turn to call."""
        peer = self.peers[pid] = TrackedPeer(pid, entry, self)
        peer.life.listed(f"listed, flag {peer.flag}")
        courtesy = self.config.courtesy_delay
        if peer.flag == "unreachable":
            peer.life.flagged()
        elif pid < self.user_id and courtesy > 0:
            peer.life.courtesy(f"letting {pid} call first", courtesy)

    def _flag_changed(self, peer: TrackedPeer, old_flag: str) -> None:
        if peer.flag == "unreachable":
            peer.life.flagged()
        elif old_flag == "unreachable" and peer.marked_by == "server":
            peer.life.unflagged(peer.flag)

    def _forget(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id)
        self._let_go(peer)
        self._emit(PeerStateChanged(peer_id, peer.state, "removed", "no longer in the list"))

    # -- the signaling rule ------------------------------------------------

    def _reconcile(self) -> None:
        """Open or close signaling as the rule says; dial whoever waits."""
        if not self._running or not self.loaded:
            return
        if not self.all_done():
            if self._signaling_retry is None:
                self._rule.open(self._open_reason)
        else:
            self._rule.settle(f"all {len(self.peers)} peers done")
        self._rule.dial_waiting()

    def start_agent(self, reason: str) -> None:
        """For the rule: open signaling (``opened`` or ``open_failed`` follows)."""

        def opened(_: object) -> None:
            self._signaling_failures = 0
            self._rule.opened(reason)

        def failed(failure: Failure) -> None:
            self._rule.open_failed(failure, reason)

        defer.maybeDeferred(self.agent.start).addCallbacks(opened, failed)

    def signaling_opened(self, reason: str) -> None:
        self._emit(SignalingChanged(True, reason))
        self._open_reason = "peers waiting"
        self._reconcile()

    def signaling_failed(self, failure: Failure, reason: str) -> None:
        self._signaling_failures += 1
        delay = self._backoff(self._signaling_failures)
        log.warn(
            "Signaling did not open: {error}; again in {delay:.1f}s",
            error=failure.getErrorMessage(), delay=delay,
        )
        self._emit(SignalingChanged(False, f"open failed: {failure.getErrorMessage()}; again in {delay:.1f}s"))
        if self._running:
            self._signaling_retry = self.clock.callLater(delay, self._retry_signaling, reason)

    def _retry_signaling(self, reason: str) -> None:
        self._signaling_retry = None
        self._open_reason = reason
        self._reconcile()

    def stop_agent(self, reason: str, done: defer.Deferred[None] | None) -> None:
        """For the rule: close signaling (``closed`` follows); ``done`` fires after."""

        def closed(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("Closing signaling failed", result)
            self._rule.closed(reason)
            if done is not None:
                done.callback(None)

        defer.maybeDeferred(self.agent.stop).addBoth(closed)

    def signaling_closed(self, reason: str) -> None:
        self._emit(SignalingChanged(False, reason))
        self._reconcile()

    def signaling_lost(self, reason: str = "signaling connection lost") -> None:
        """The agent's signaling connection went away under us: reopen if needed."""
        self._rule.lost(reason)

    def signaling_dropped(self, reason: str) -> None:
        """For the rule: it was open or opening when lost."""
        self._emit(SignalingChanged(False, reason))
        self._open_reason = f"reconnecting after: {reason}"
        self._reconcile()

    def dial_waiting(self) -> None:
        """For the rule, while open: dial pending peers, at most ``max_dials`` at a time.

        Peers behind our own public address first: on our LAN they connect
        at once, while a call through a sequential NAT may wait its turn
        there for a long time (``182 Queued``), its dial slot with it (the NAT
        lab's 40-peer group: 21 of the 28 LAN pairs of its sequential site
        never dialed in 150 s).
        """
        dialing = sum(1 for peer in self.peers.values() if peer.dialing is not None)
        own = self.agent.public_ip
        on_our_lan = [p for p in self.peers.values() if own is not None and p.entry is not None and p.entry.ip == own]
        for peer in on_our_lan + [p for p in self.peers.values() if p not in on_our_lan]:
            if dialing >= self.config.max_dials:
                break
            if peer.dialable:
                self._dial(peer)
                dialing += 1

    # -- dialing -------------------------------------------------------------

    def _dial(self, peer: TrackedPeer) -> None:
        stunt = peer.flag == "stunt"
        factory = WatchingFactory(self._app_factory_for(peer.peer_id), self._lost)
        peer.life.dial("dialing through STUNT" if stunt else "dialing")
        connecting: defer.Deferred[Any] = defer.maybeDeferred(
            self.agent.connect, peer.peer_id, factory, timeout=self.config.connect_timeout, prefer_stunt=stunt
        )
        peer.dialing = connecting
        connecting.addCallbacks(
            self._dialed, self._dial_failed, callbackArgs=(peer, connecting), errbackArgs=(peer, connecting)
        )

    def _current(self, peer: TrackedPeer, d: defer.Deferred[Any]) -> bool:
        return self.peers.get(peer.peer_id) is peer and peer.dialing is d

    def _dialed(self, connection: ManagedConnection, peer: TrackedPeer, d: defer.Deferred[Any]) -> None:
        if not self._current(peer, d) or not self._running:
            close_protocol(connection.protocol)
            return
        peer.dialing = None
        self._adopt(peer, connection, incoming=False)
        self._reconcile()  # the next queued dial

    def _dial_failed(self, failure: Failure, peer: TrackedPeer, d: defer.Deferred[Any]) -> None:
        if not self._current(peer, d) or not self._running:
            return
        peer.dialing = None
        try:
            peer.life.dial_failed(failure)
        finally:
            self._reconcile()  # the next queued dial

    def judge_failure(self, peer: TrackedPeer, failure: Failure) -> None:
        """For a peer's machine: after a failed dial, back off or give up (the counting rules)."""
        exc = failure.value
        reason = (exc.reason if isinstance(exc, ConnectFailed) else "") or failure.getErrorMessage()
        code = exc.code if isinstance(exc, ConnectFailed) else None
        if not self.agent.signaling_up:
            # Not the peer's fault: signaling is down (the agent reconnects on
            # its own). Wait, but do not count it towards "unreachable".
            delay = self._backoff(max(1, peer.failures))
            peer.life.back_off(f"failed without signaling ({reason}), again in {delay:.1f}s", delay)
            return
        if code == 491:
            # The peer's own call to us waits at the server and will connect us (or count on
            # its side): look again later, counting nothing.
            delay = self._backoff(1 + peer.absences)
            peer.absences += 1
            peer.life.back_off(f"the peer is calling us ({reason}), again in {delay:.1f}s", delay)
            return
        if code == 488 and kerjo.NO_TECHNIQUE_REASON in reason:
            # The server knows both NATs: nothing would join them. Unreachable until something
            # changes (the long retry, the list), on both sides alike.
            peer.failures += 1
            peer.life.give_up("server", reason)
            return
        if code in OFFLINE_CODES and kerjo.PAIR_FAILED_REASON in reason:
            # Offline because it gave the pair up after failed calls: the pair is unreachable
            # until something changes (the long retry, the list), as on the other side.
            peer.failures += 1
            peer.life.give_up("server", f"the pair failed and the peer is offline ({reason})")
            return
        if code in OFFLINE_CODES and not peer.retrying:
            # Not registered right now: absent, not unreachable. When it comes
            # online it calls us (our signaling stays open), so no count.
            peer.absences += 1
            delay = self._backoff(peer.absences)
            peer.life.back_off(f"offline ({reason}), again in {delay:.1f}s", delay)
            return
        peer.failures += 1
        if peer.retrying or peer.flag == "unreachable":
            peer.life.give_up(peer.marked_by or "server", f"retry failed ({reason})")
        elif peer.failures >= self.config.max_failures:
            peer.life.give_up("local", f"{peer.failures} failures in a row ({reason})")
        else:
            delay = self._backoff(peer.failures)
            peer.life.back_off(f"failed ({reason}), again in {delay:.1f}s", delay)

    def _backoff(self, failures: int) -> float:
        return self._backoff_of.delay(failures - 1, self._random())

    def reopen_for(self, reason: str) -> None:
        """For a peer's timer: it waits again; open signaling for it, saying why."""
        self._open_reason = reason
        self._reconcile()

    def later(self, delay: float, f: Callable[..., object], *args: object) -> IDelayedCall:
        return self.clock.callLater(delay, f, *args)

    # -- connections -----------------------------------------------------

    def peer_arrived(self, connection: ManagedConnection) -> None:
        """An incoming peer connection (the agent's ``on_peer``): counts as connected."""
        if not self._running:
            close_protocol(connection.protocol)
            return
        peer = self.peers.get(connection.peer_id)
        if peer is None:
            # Not (yet) in our list: keep it, and ask the directory whether it is new.
            peer = self.peers[connection.peer_id] = TrackedPeer(connection.peer_id, None, self)
            peer.life.listed("called us, not in the list yet")
            self.clock.callLater(0, self.refresh)
        self._adopt(peer, connection, incoming=True)

    def _adopt(self, peer: TrackedPeer, connection: ManagedConnection, incoming: bool) -> None:
        proto = connection.protocol
        if not isinstance(proto, WatchedProtocol):
            log.warn(
                "Connection with {peer} bypassed the manager's factory; its loss goes unseen",
                peer=peer.peer_id,
            )
        elif proto.lost:
            self._note_drop(peer, "connection closed at once")
            return
        peer.life.connected(connection, incoming)
        self._reconcile()

    def keep_one(self, peer: TrackedPeer, connection: ManagedConnection, incoming: bool) -> None:
        """For a connected peer's machine: a second connection; keep one, close the other."""
        if peer.connection is None:
            peer.adopt(connection, incoming)
            return
        proto = connection.protocol
        loser: object
        if self._prefer(peer, incoming, peer.incoming):
            loser = peer.protocol
            peer.connection, peer.incoming = connection, incoming
            peer.protocol = proto if isinstance(proto, WatchedProtocol) else None
        else:
            loser = proto
        if isinstance(loser, WatchedProtocol):
            peer.extras.append(loser)
        log.info("Closing a duplicate connection with {peer}", peer=peer.peer_id)
        close_protocol(loser)

    def _prefer(self, peer: TrackedPeer, new_incoming: bool, old_incoming: bool) -> bool:
        """Whether a second connection to one peer replaces the first.

        Both ends keep the connection dialed by the lower user ID, so they
        close the same duplicate; of two in the same direction the newer wins.
        """
        if new_incoming == old_incoming:
            return True
        we_are_lower = self.user_id < peer.peer_id
        keep_incoming = not we_are_lower
        return new_incoming == keep_incoming

    def _lost(self, proto: WatchedProtocol, reason: Failure) -> None:
        for peer in self.peers.values():
            if proto in peer.extras:
                peer.extras.remove(proto)
                return
            if peer.protocol is proto:
                peer.protocol = None
                peer.connection = None
                if self._running:
                    self._note_drop(peer, f"dropped ({reason.getErrorMessage()})")
                return

    def _note_drop(self, peer: TrackedPeer, detail: str) -> None:
        self._open_reason = f"{peer.peer_id} dropped"
        if peer.dialing is not None:
            peer.life.dropped_while_dialing(detail)
        else:
            peer.life.dropped(detail)
        self._reconcile()

    # -- plumbing ------------------------------------------------------------

    def emit_change(self, event: PeerStateChanged) -> None:
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if isinstance(event, PeerStateChanged):
            log.info(
                "peer {peer_id}: {old} -> {new} {detail}",
                peer_id=event.peer_id, old=event.old, new=event.new, detail=event.detail,
                group=self.group,
            )
        elif isinstance(event, SignalingChanged):
            log.info(
                "signaling {what} ({reason})",
                what="opened" if event.is_open else "closed", reason=event.reason, group=self.group,
            )
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.failure("on_event callback failed")
