"""The peer manager: connect to every trusted peer, hold signaling only while needed.

The seed's rule (architecture section 1, issue 6): a peer keeps its signaling
connection to the STUNT server exactly as long as one of its trusted peers is
neither connected nor known to be unreachable. The manager owns that rule. It
does no networking itself; it drives three collaborators passed in, so tests
run it on a ``Clock`` with fakes:

- ``directory()``: fetches the group's trusted peers (``PeerEntry`` objects
  with ``user_id``, ``use_stunt``, ``ip``, ``port``, ``nat``, ``online``);
- ``agent``: ``start()`` / ``stop()`` the signaling connection,
  ``connect(peer_id, factory, timeout=...)`` dials a peer (direct first, then
  STUNT), ``signaling_up``; incoming peers are reported to
  ``PeerManager.peer_arrived`` (pass it as the agent's ``on_peer``);
- ``app_factory_for(peer_id)``: the application's protocol factory.

See docs/peer-manager.rst for the states and rules.
"""

from __future__ import annotations

import inspect
import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

PENDING = "pending"
CONNECTING = "connecting"
CONNECTED = "connected"
BACKOFF = "backoff"
UNREACHABLE = "unreachable"
STATES = (PENDING, CONNECTING, CONNECTED, BACKOFF, UNREACHABLE)
DONE_STATES = (CONNECTED, UNREACHABLE)

#: SIP statuses of a call to a peer that is not registered now (absent, not unreachable)
OFFLINE_CODES = (480,)

# Signaling connection states (the manager's view).
SIG_CLOSED = "closed"
SIG_OPENING = "opening"
SIG_OPEN = "open"
SIG_CLOSING = "closing"


@dataclass(frozen=True)
class PeerStateChanged:
    """One peer moved from ``old`` to ``new``; ``detail`` says why (human-readable)."""

    peer_id: str
    old: str | None
    new: str
    detail: str = ""
    technique: str | None = None
    incoming: bool = False
    delay: float | None = None


@dataclass(frozen=True)
class SignalingChanged:
    """The signaling connection opened (``is_open``) or closed; ``reason`` says why."""

    is_open: bool
    reason: str


@dataclass(frozen=True)
class PeerListLoaded:
    """A directory fetch finished: the peers now tracked (self excluded)."""

    peers: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]


Event = PeerStateChanged | SignalingChanged | PeerListLoaded


def peer_flag(entry: Any) -> str:
    """The server's "use STUNT" flag of a directory entry as a string.

    The directory carries ``unknown`` / ``direct`` / ``stunt`` / ``unreachable``;
    a bare boolean (True: needs STUNT) is accepted too.
    """
    value = getattr(entry, "use_stunt", None)
    if value is True:
        return "stunt"
    if value is False or value is None:
        return "unknown"
    return str(value).lower()


def backoff_delay(failures: int, base: float, maximum: float, jitter: float, rnd: float) -> float:
    """Exponential back-off, capped, with jitter taken off the top.

    ``failures`` >= 1; ``rnd`` in [0, 1). The result lies in
    ``[(1 - jitter) * d, d]`` with ``d = min(maximum, base * 2 ** (failures - 1))``,
    so it never exceeds ``maximum`` and two peers that failed together
    spread apart.
    """
    exponent = min(max(failures - 1, 0), 62)
    capped = min(maximum, base * (2.0 ** exponent))
    return capped * (1.0 - jitter * rnd)


class _WatchedProtocol(Protocol):
    """Wraps the application's protocol so the manager sees ``connectionLost``.

    The application protocol gets the real transport; only the three
    protocol callbacks pass through here.
    """

    def __init__(self, inner: Any, on_lost: Callable[[_WatchedProtocol, Failure], None]) -> None:
        self.inner = inner
        self._on_lost = on_lost
        self.lost = False

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = 0
        self.lost = True
        try:
            self.inner.connectionLost(reason)
        finally:
            self._on_lost(self, reason)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()


@implementer(IProtocolFactory)
class _WatchingFactory(Factory):
    """A factory whose protocols report their loss to the manager."""

    def __init__(self, app_factory: Any, on_lost: Callable[[_WatchedProtocol, Failure], None]) -> None:
        self.app_factory = app_factory
        self._on_lost = on_lost

    def doStart(self) -> None:
        self.app_factory.doStart()

    def doStop(self) -> None:
        self.app_factory.doStop()

    def buildProtocol(self, addr: Any) -> _WatchedProtocol | None:
        inner = self.app_factory.buildProtocol(addr)
        if inner is None:
            return None
        return _WatchedProtocol(inner, self._on_lost)


@dataclass
class _Peer:
    peer_id: str
    entry: Any
    state: str = PENDING
    failures: int = 0
    absences: int = 0
    timer: IDelayedCall | None = None
    dialing: defer.Deferred | None = None
    connection: Any = None  # the PeerConnection in use
    protocol: _WatchedProtocol | None = None
    incoming: bool = False
    retrying: bool = False  # this attempt is the long back-off's retry
    marked_by: str | None = None  # "server" or "local" when unreachable
    extras: list[_WatchedProtocol] = field(default_factory=list)

    @property
    def flag(self) -> str:
        return peer_flag(self.entry) if self.entry is not None else "unknown"


class PeerManager:
    """Connects to every trusted peer of a group; owns the signaling rule."""

    def __init__(
        self,
        clock: Any,
        *,
        group: str,
        user_id: str,
        directory: Callable[[], defer.Deferred],
        agent: Any,
        app_factory_for: Callable[[str | None], Any],
        refresh_interval: float = 300.0,
        unreachable_retry: float = 3600.0,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        jitter: float = 0.5,
        max_failures: int = 5,
        connect_timeout: float = 20.0,
        max_dials: int = 1,
        courtesy_delay: float = 3.0,
        random: Callable[[], float] = _random.random,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.clock = clock
        self.group = group
        self.user_id = user_id
        self._directory = directory
        self.agent = agent
        self._app_factory_for = app_factory_for
        self.refresh_interval = refresh_interval
        self.unreachable_retry = unreachable_retry
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.max_failures = max_failures
        self.connect_timeout = connect_timeout
        # One call at a time by default: concurrent calls from behind a
        # sequential NAT take ports out of each other's predicted windows.
        self.max_dials = max_dials
        # A peer with a lower user ID gets this long to call us first, so two
        # members starting together make one call, not two crossing ones.
        self.courtesy_delay = courtesy_delay
        self._random = random
        self._on_event = on_event
        self.peers: dict[str, _Peer] = {}
        self.signaling = SIG_CLOSED
        self.loaded = False
        self._running = False
        self._refresh_call: IDelayedCall | None = None
        self._signaling_retry: IDelayedCall | None = None
        self._signaling_failures = 0
        self._load_failures = 0
        self._fetching: defer.Deferred | None = None
        self._open_reason = "starting"
        #: the agent's factory for incoming peers (pass it as ``accept_factory``)
        self.accept_factory = _WatchingFactory(app_factory_for(None), self._lost)

    @property
    def stunt_hint(self) -> bool:
        """Whether ``agent.connect`` takes ``prefer_stunt`` (else stunt peers dial in the usual order)."""
        return _accepts_keyword(getattr(self.agent, "connect", None), "prefer_stunt")

    # -- public view --------------------------------------------------------

    def state_of(self, peer_id: str) -> str:
        return self.peers[peer_id].state

    def states(self) -> dict[str, str]:
        return {p.peer_id: p.state for p in self.peers.values()}

    def all_done(self) -> bool:
        return all(p.state in DONE_STATES for p in self.peers.values())

    def connection_of(self, peer_id: str) -> Any:
        return self.peers[peer_id].connection

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Load the list and begin; refreshes every ``refresh_interval`` seconds."""
        self._running = True
        self.refresh()

    def stop(self) -> defer.Deferred:
        """Cancel timers and dials, close peer connections and signaling."""
        self._running = False
        for call in (self._refresh_call, self._signaling_retry):
            if call is not None and call.active():
                call.cancel()
        self._refresh_call = self._signaling_retry = None
        if self._fetching is not None:
            self._fetching.cancel()
        for peer in self.peers.values():
            self._cancel_timer(peer)
            if peer.dialing is not None:
                peer.dialing.cancel()
            for proto in [peer.protocol, *peer.extras]:
                if proto is not None:
                    proto.close()
        if self.signaling in (SIG_OPEN, SIG_OPENING):
            return self._close_signaling("stopping")
        return defer.succeed(None)

    def refresh(self) -> defer.Deferred:
        """Fetch the trusted peers now (also run periodically)."""
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        d = defer.maybeDeferred(self._directory)
        self._fetching = d
        d.addCallbacks(self._loaded, self._load_failed)
        d.addBoth(self._fetched, d)
        return d

    def _fetched(self, result: Any, d: defer.Deferred) -> Any:
        if self._fetching is d:
            self._fetching = None
        return None

    def _schedule_refresh(self, delay: float) -> None:
        if self._running:
            self._refresh_call = self.clock.callLater(delay, self.refresh)

    def _load_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError) or not self._running:
            return
        self._load_failures += 1
        if self.loaded:
            delay = self.refresh_interval
        else:
            delay = self._backoff(self._load_failures)
        log.warn(
            "Could not load the trusted peers of {group}: {error}; again in {delay:.1f}s",
            group=self.group, error=failure.getErrorMessage(), delay=delay,
        )
        self._schedule_refresh(delay)

    def _loaded(self, entries: list[Any]) -> None:
        if not self._running:
            return
        self._load_failures = 0
        first = not self.loaded
        self.loaded = True
        fresh: dict[str, Any] = {}
        for entry in entries:
            if entry.user_id != self.user_id:
                fresh[entry.user_id] = entry
        added = [pid for pid in fresh if pid not in self.peers]
        removed = [pid for pid in self.peers if pid not in fresh]
        for pid in removed:
            self._forget(pid)
        changed: list[str] = []
        for pid, entry in fresh.items():
            peer = self.peers.get(pid)
            if peer is None:
                self.peers[pid] = peer = _Peer(pid, entry)
                self._emit(PeerStateChanged(pid, None, PENDING, f"listed, flag {peer.flag}"))
                if peer.flag == "unreachable":
                    self._mark_unreachable(peer, "server", "flagged unreachable by the server")
                elif pid < self.user_id and self.courtesy_delay > 0:
                    self._set(peer, BACKOFF, f"letting {pid} call first", delay=self.courtesy_delay)
                    peer.timer = self.clock.callLater(
                        self.courtesy_delay, self._timer_fired, peer, f"{pid} did not call first"
                    )
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
        self._schedule_refresh(self.refresh_interval)
        self._reconcile()

    def _flag_changed(self, peer: _Peer, old_flag: str) -> None:
        if peer.flag == "unreachable" and peer.state in (PENDING, BACKOFF):
            self._mark_unreachable(peer, "server", "flagged unreachable by the server")
        elif old_flag == "unreachable" and peer.state == UNREACHABLE and peer.marked_by == "server":
            # The server saw it reached since: try it now rather than in an hour.
            self._cancel_timer(peer)
            peer.failures = 0
            self._set(peer, PENDING, f"flag now {peer.flag}")

    def _forget(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id)
        self._cancel_timer(peer)
        if peer.dialing is not None:
            peer.dialing.cancel()
        for proto in [peer.protocol, *peer.extras]:
            if proto is not None:
                proto.close()
        self._emit(PeerStateChanged(peer_id, peer.state, "removed", "no longer in the list"))

    # -- the signaling rule ------------------------------------------------

    def _reconcile(self) -> None:
        """Open or close signaling as the rule says; dial whoever waits."""
        if not self._running or not self.loaded:
            return
        want = not self.all_done()
        if want and self.signaling == SIG_CLOSED and self._signaling_retry is None:
            self._open_signaling(self._open_reason)
        elif not want and self.signaling == SIG_OPEN:
            self._close_signaling(f"all {len(self.peers)} peers done")
        if self.signaling == SIG_OPEN:
            dialing = sum(1 for peer in self.peers.values() if peer.dialing is not None)
            for peer in list(self.peers.values()):
                if dialing >= self.max_dials:
                    break
                if peer.state == PENDING and peer.dialing is None:
                    self._dial(peer)
                    dialing += 1

    def _open_signaling(self, reason: str) -> None:
        self.signaling = SIG_OPENING
        d = defer.maybeDeferred(self.agent.start)

        def opened(_: Any) -> None:
            self._signaling_failures = 0
            if self.signaling != SIG_OPENING:
                return
            self.signaling = SIG_OPEN
            self._emit(SignalingChanged(True, reason))
            self._open_reason = "peers waiting"
            self._reconcile()

        def failed(failure: Failure) -> None:
            if self.signaling != SIG_OPENING:
                return
            self.signaling = SIG_CLOSED
            self._signaling_failures += 1
            delay = self._backoff(self._signaling_failures)
            log.warn(
                "Signaling did not open: {error}; again in {delay:.1f}s",
                error=failure.getErrorMessage(), delay=delay,
            )
            self._emit(SignalingChanged(False, f"open failed: {failure.getErrorMessage()}; again in {delay:.1f}s"))
            if self._running:
                self._signaling_retry = self.clock.callLater(delay, self._retry_signaling, reason)

        d.addCallbacks(opened, failed)

    def _retry_signaling(self, reason: str) -> None:
        self._signaling_retry = None
        self._open_reason = reason
        self._reconcile()

    def _close_signaling(self, reason: str) -> defer.Deferred:
        self.signaling = SIG_CLOSING
        d = defer.maybeDeferred(self.agent.stop)

        def closed(result: Any) -> None:
            self.signaling = SIG_CLOSED
            if isinstance(result, Failure):
                log.failure("Closing signaling failed", result)
            self._emit(SignalingChanged(False, reason))
            self._reconcile()

        return d.addBoth(closed)

    def signaling_lost(self, reason: str = "signaling connection lost") -> None:
        """The agent's signaling connection went away under us: reopen if needed."""
        if self.signaling in (SIG_OPEN, SIG_OPENING):
            self.signaling = SIG_CLOSED
            self._emit(SignalingChanged(False, reason))
            self._open_reason = f"reconnecting after: {reason}"
            self._reconcile()

    # -- dialing -------------------------------------------------------------

    def _dial(self, peer: _Peer) -> None:
        kwargs: dict[str, Any] = {"timeout": self.connect_timeout}
        stunt = peer.flag == "stunt"
        if stunt:
            if self.stunt_hint:
                kwargs["prefer_stunt"] = True
            else:
                log.info("Agent takes no STUNT hint; dialing {peer} in the usual order", peer=peer.peer_id)
        factory = _WatchingFactory(self._app_factory_for(peer.peer_id), self._lost)
        self._set(peer, CONNECTING, "dialing through STUNT" if stunt else "dialing")
        d = defer.maybeDeferred(self.agent.connect, peer.peer_id, factory, **kwargs)
        peer.dialing = d
        d.addCallbacks(self._dialed, self._dial_failed, callbackArgs=(peer, d), errbackArgs=(peer, d))

    def _current(self, peer: _Peer, d: defer.Deferred) -> bool:
        return self.peers.get(peer.peer_id) is peer and peer.dialing is d

    def _dialed(self, connection: Any, peer: _Peer, d: defer.Deferred) -> None:
        proto = connection.protocol
        if not self._current(peer, d) or not self._running:
            _close(proto)
            return
        peer.dialing = None
        self._adopt(peer, connection, incoming=False)
        self._reconcile()  # the next queued dial

    def _dial_failed(self, failure: Failure, peer: _Peer, d: defer.Deferred) -> None:
        if not self._current(peer, d) or not self._running:
            return
        peer.dialing = None
        try:
            self._after_dial_failure(failure, peer)
        finally:
            self._reconcile()  # the next queued dial

    def _after_dial_failure(self, failure: Failure, peer: _Peer) -> None:
        reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        if peer.state == CONNECTED:  # an incoming connection arrived meanwhile
            return
        if getattr(self.agent, "signaling_up", True) is False:
            # Not the peer's fault: signaling is down (the agent reconnects on
            # its own). Wait, but do not count it towards "unreachable".
            delay = self._backoff(max(1, peer.failures))
            self._set(peer, BACKOFF, f"failed without signaling ({reason}), again in {delay:.1f}s", delay=delay)
            peer.timer = self.clock.callLater(delay, self._timer_fired, peer, f"back-off of {peer.peer_id} over")
            return
        if getattr(failure.value, "code", None) in OFFLINE_CODES and not peer.retrying:
            # Not registered right now: absent, not unreachable. When it comes
            # online it calls us (our signaling stays open), so no count.
            peer.absences += 1
            delay = self._backoff(peer.absences)
            self._set(peer, BACKOFF, f"offline ({reason}), again in {delay:.1f}s", delay=delay)
            peer.timer = self.clock.callLater(delay, self._timer_fired, peer, f"back-off of {peer.peer_id} over")
            return
        peer.failures += 1
        if peer.retrying or peer.flag == "unreachable":
            self._mark_unreachable(peer, peer.marked_by or "server", f"retry failed ({reason})")
        elif peer.failures >= self.max_failures:
            self._mark_unreachable(peer, "local", f"{peer.failures} failures in a row ({reason})")
        else:
            delay = self._backoff(peer.failures)
            self._set(peer, BACKOFF, f"failed ({reason}), again in {delay:.1f}s", delay=delay)
            peer.timer = self.clock.callLater(delay, self._timer_fired, peer, f"back-off of {peer.peer_id} over")

    def _mark_unreachable(self, peer: _Peer, by: str, detail: str) -> None:
        self._cancel_timer(peer)
        peer.marked_by = by
        peer.retrying = False
        delay = self.unreachable_retry
        self._set(peer, UNREACHABLE, f"{detail}; retry in {delay:.0f}s", delay=delay)
        peer.timer = self.clock.callLater(delay, self._retry_unreachable, peer)

    def _retry_unreachable(self, peer: _Peer) -> None:
        peer.timer = None
        peer.retrying = True
        self._open_reason = f"retrying {peer.peer_id}"
        self._set(peer, PENDING, "long back-off over, retrying")
        self._reconcile()

    def _timer_fired(self, peer: _Peer, reason: str) -> None:
        peer.timer = None
        self._open_reason = reason
        self._set(peer, PENDING, "back-off over")
        self._reconcile()

    def _backoff(self, failures: int) -> float:
        return backoff_delay(failures, self.backoff_base, self.backoff_max, self.jitter, self._random())

    # -- connections -----------------------------------------------------

    def peer_arrived(self, connection: Any) -> None:
        """An incoming peer connection (the agent's ``on_peer``): counts as connected."""
        if not self._running:
            _close(connection.protocol)
            return
        peer = self.peers.get(connection.peer_id)
        if peer is None:
            # Not (yet) in our list: keep it, and ask the directory whether it is new.
            peer = self.peers[connection.peer_id] = _Peer(connection.peer_id, None)
            self._emit(PeerStateChanged(peer.peer_id, None, PENDING, "called us, not in the list yet"))
            self.clock.callLater(0, self.refresh)
        self._adopt(peer, connection, incoming=True)

    def _adopt(self, peer: _Peer, connection: Any, incoming: bool) -> None:
        proto = connection.protocol
        if not isinstance(proto, _WatchedProtocol):
            log.warn(
                "Connection with {peer} bypassed the manager's factory; its loss goes unseen",
                peer=peer.peer_id,
            )
        elif proto.lost:
            self._note_drop(peer, "connection closed at once")
            return
        if peer.state == CONNECTED and peer.connection is not None:
            if self._prefer(peer, incoming, peer.incoming):
                loser = peer.protocol
                peer.connection, peer.incoming = connection, incoming
                peer.protocol = proto if isinstance(proto, _WatchedProtocol) else None
            else:
                loser = proto
            if isinstance(loser, _WatchedProtocol):
                peer.extras.append(loser)
            log.info("Closing a duplicate connection with {peer}", peer=peer.peer_id)
            _close(loser)
            return
        self._cancel_timer(peer)
        peer.failures = peer.absences = 0
        peer.retrying = False
        peer.marked_by = None
        peer.connection, peer.incoming = connection, incoming
        peer.protocol = proto if isinstance(proto, _WatchedProtocol) else None
        technique = getattr(connection, "technique", None)
        detail = f"via {technique}" if technique else ""
        if incoming:
            detail = f"incoming, {detail}" if detail else "incoming"
        self._set(peer, CONNECTED, detail, technique=technique, incoming=incoming)
        self._reconcile()

    def _prefer(self, peer: _Peer, new_incoming: bool, old_incoming: bool) -> bool:
        """Whether a second connection to one peer replaces the first.

        Both ends keep the connection dialed by the lower user ID, so they
        close the same duplicate; of two in the same direction the newer wins.
        """
        if new_incoming == old_incoming:
            return True
        we_are_lower = self.user_id < peer.peer_id
        keep_incoming = not we_are_lower
        return new_incoming == keep_incoming

    def _lost(self, proto: _WatchedProtocol, reason: Failure) -> None:
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

    def _note_drop(self, peer: _Peer, detail: str) -> None:
        self._open_reason = f"{peer.peer_id} dropped"
        if peer.dialing is not None:
            self._set(peer, CONNECTING, f"{detail}; a dial is under way")
        else:
            self._set(peer, PENDING, detail)
        self._reconcile()

    # -- plumbing ------------------------------------------------------------

    def _set(self, peer: _Peer, state: str, detail: str = "", **extra: Any) -> None:
        old = peer.state
        peer.state = state
        self._emit(PeerStateChanged(peer.peer_id, old, state, detail, **extra))

    def _cancel_timer(self, peer: _Peer) -> None:
        if peer.timer is not None and peer.timer.active():
            peer.timer.cancel()
        peer.timer = None

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


class RestartingAgent:
    """Gives the manager an agent it can start again after stopping it.

    ``PeerAgent`` is one-shot (``start`` once, ``stop`` for good), while the
    manager opens and closes signaling many times; each ``start`` here makes
    a fresh agent with ``make_agent()``. Peer connections made by an earlier
    agent outlive it (stopping an agent leaves them up).
    """

    def __init__(self, make_agent: Callable[[], Any]) -> None:
        self._make_agent = make_agent
        self.current: Any = None

    @property
    def signaling_up(self) -> bool:
        return bool(self.current is not None and self.current.signaling_up)

    def start(self) -> defer.Deferred:
        self.current = agent = self._make_agent()

        def failed(failure: Failure) -> Failure:
            if self.current is agent:
                self.current = None
            return failure

        return defer.maybeDeferred(agent.start).addErrback(failed)

    def stop(self) -> defer.Deferred:
        agent, self.current = self.current, None
        if agent is None:
            return defer.succeed(None)
        return defer.maybeDeferred(agent.stop)

    def connect(self, peer_id: str, protocol_factory: Any, **kwargs: Any) -> defer.Deferred:
        if self.current is None:
            return defer.fail(RuntimeError("signaling is closed"))
        if "prefer_stunt" in kwargs and not _accepts_keyword(self.current.connect, "prefer_stunt"):
            del kwargs["prefer_stunt"]
            log.info("Agent takes no STUNT hint; dialing {peer} in the usual order", peer=peer_id)
        return self.current.connect(peer_id, protocol_factory, **kwargs)


def _close(proto: Any) -> None:
    transport = getattr(proto, "transport", None)
    if transport is not None:
        transport.loseConnection()


def _accepts_keyword(func: Any, name: str) -> bool:
    if func is None:
        return False
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
