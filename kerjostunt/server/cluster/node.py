"""One instance of a cluster: its lease, its broadcasts, and the calls that cross instances.

Built by ``service.py`` when the database is PostgreSQL (SQLite stays one
instance and none of this runs). The node

- renews this instance's lease every ``HEARTBEAT`` seconds and reads
  everyone's (``store/presence.py``): a dead instance's users leave the view
  when its lease runs out, ``LEASE`` seconds after its last renewal;
- broadcasts every new or ended binding here (``bound`` / ``gone``,
  gathered for ``GATHER`` seconds) and writes them to the presence rows;
- takes over the users other instances bind: a local binding of the same
  user, older, is dropped and its connection closed (one binding per user
  across the cluster, as the registrar keeps it on one instance);
- stands in for users bound elsewhere when a call here reaches them
  (``legs.py``), and relays the calls other instances run down its own
  connections.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.server.calls import CallManager
from kerjostunt.server.calls.dialing import parse_offer
from kerjostunt.server.cluster.envelope import (
    BROADCAST,
    Envelope,
    EnvelopeError,
    channel_of,
    decode,
    encode,
    sender_of,
)
from kerjostunt.server.cluster.legs import Relays, RemoteLeg
from kerjostunt.server.cluster.view import ClusterView, RemoteBinding
from kerjostunt.server.reactor import IServerReactor
from kerjostunt.server.registrar import Registrar, SignalingConnection
from kerjostunt.store import presence
from kerjostunt.store.channels import Channels
from kerjostunt.wire.prediction import Prediction
from kerjostunt.wire.sdp import SDPError
from kerjostunt.wire.sip.message import Request, Response

log = Logger(namespace="kerjostunt.server.cluster")

HEARTBEAT = 2.0   # seconds between lease renewals
LEASE = 6.0       # seconds a renewal keeps an instance alive: dead ones vanish within LEASE + HEARTBEAT
GATHER = 0.05     # seconds new bindings wait to share one broadcast and one write
GATHER_MAX = 100  # bindings per broadcast (about 60 bytes each, under NOTIFY's 8000)
RECONNECT = 1.0   # seconds before the bus is tried again after it failed


class PresenceStore(Protocol):
    """The async store as the node uses it: blocking presence functions in its pool."""

    def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


@dataclass
class NodeSettings:
    """What the node tells the others; the service fills in the ports once they listen."""

    url: str                  # the PostgreSQL URL the bus connects to
    host: str                 # --advertise: where peers reach this instance
    sip_port: int = 0
    probe_ports: Sequence[int] = ()


class ClusterNode(Service):
    """This instance's part in the cluster (see the module docstring)."""

    def __init__(self, reactor: IServerReactor, settings: NodeSettings, store: PresenceStore,
                 registrar: Registrar, calls: CallManager, counter: Callable[[str], None]) -> None:
        self._reactor = reactor
        self.settings = settings
        self._store = store
        self.registrar = registrar
        self.calls = calls
        self.count = counter
        self.instance_id = secrets.token_hex(8)
        self.view = ClusterView(reactor, self.instance_id, LEASE)
        self.view.subscribe(self._moved)
        self.relays = Relays(reactor)
        self.legs: dict[tuple[str, str], RemoteLeg] = {}
        self.bus_rtt = 0.0
        self._seq = 0
        self._bound: dict[str, presence.BindingRow] = {}
        self._unbound: set[str] = set()
        self._gather: Any = None
        self._channels: Channels | None = None
        self._heartbeat = LoopingCall(self._tick)
        self._heartbeat.clock = reactor
        self._sweep = LoopingCall(self.relays.sweep)
        self._sweep.clock = reactor
        self._stopping = False
        self._timers: list[IDelayedCall] = []
        self.ready: Deferred[None] = Deferred()
        #: called after every notification and heartbeat handled (tests wait on the view with it)
        self.observers: list[Callable[[], None]] = []
        registrar.subscribe(self._registrar_changed)
        calls.elsewhere = self

    # -- life ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        log.info("Cluster instance {id} ({host}:{port})", id=self.instance_id, host=self.settings.host,
                 port=self.settings.sip_port)
        self._connect()
        self._sweep.start(30.0, now=False)

    def _connect(self) -> None:
        channels = Channels(self._reactor, self.settings.url, [channel_of(self.instance_id), BROADCAST],
                            self._received, self._bus_lost)
        self._channels = channels
        d: Deferred[Any] = channels.start()
        d.addCallback(lambda _: self._beat())
        d.addCallback(lambda _: self._store.run(presence.load_bindings, self.instance_id))
        d.addCallback(self._loaded)
        d.addErrback(self._start_failed, channels)

    def _loaded(self, rows: list[presence.BindingRow]) -> None:
        self.view.replace_all(rows)
        self._republish()
        # Bindings broadcast just before our LISTEN whose rows were not written yet at the load
        # (they are written behind): one more read, adding only users the broadcasts did not bring.
        self._after(HEARTBEAT, self._load_missing)
        if not self._heartbeat.running:
            self._heartbeat.start(HEARTBEAT, now=False)
        log.info("Cluster: {n} users bound on {m} other instances", n=len(self.view), m=len(self.view.instances()))
        if not self.ready.called:
            self.ready.callback(None)

    def _after(self, delay: float, f: Callable[[], None]) -> None:
        """``f`` in ``delay`` seconds, unless the node stops first."""
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self._reactor.callLater(delay, f))

    def _load_missing(self) -> None:
        if self._stopping:
            return
        d = self._store.run(presence.load_bindings, self.instance_id)
        d.addCallbacks(self.view.add_missing,
                       lambda f: log.failure("Could not read the cluster bindings", f))

    def _start_failed(self, failure: Failure, channels: Channels) -> None:
        log.failure("Cluster bus or presence unavailable; retrying", failure)
        channels.close()
        if self._channels is channels:
            self._bus_lost("start failed")

    def _bus_lost(self, why: str) -> None:
        self._channels = None
        if not self._stopping:
            self.count("cluster_bus_lost")
            self._after(RECONNECT, self._reconnect)

    def _reconnect(self) -> None:
        if not self._stopping and self._channels is None:
            self._connect()

    def _republish(self) -> None:
        """Every local binding again (after start or a lost bus: the others may have missed some)."""
        for binding in self.registrar:
            self._registrar_changed(binding.user_id, True)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._stopping:
            return succeed(None)
        self._stopping = True
        for loop in (self._heartbeat, self._sweep):
            if loop.running:
                loop.stop()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        users = [b.user_id for b in self.registrar]
        channels, self._channels = self._channels, None
        if channels is not None and users:
            for chunk in range(0, len(users), GATHER_MAX * 2):
                self._broadcast(channels, Envelope("gone", self.instance_id, users=users[chunk:chunk + GATHER_MAX * 2]))
        if self._gather is not None and self._gather.active():
            self._gather.cancel()
        left = self._store.run(presence.leave, self.instance_id)
        left.addErrback(lambda f: log.failure("Could not leave the cluster cleanly", f))
        flushed = channels.flushed() if channels is not None else succeed(None)

        def close(_: object) -> None:
            if channels is not None:
                channels.close()

        return flushed.addCallback(lambda _: left).addBoth(close)

    # -- heartbeat ---------------------------------------------------------------------

    def _beat(self) -> Deferred[None]:
        me = presence.InstanceInfo(self.instance_id, self.settings.host, self.settings.sip_port,
                                   tuple(self.settings.probe_ports))
        d = self._store.run(presence.heartbeat, me, LEASE)
        d.addCallback(self._leases_read)
        if self._channels is not None:
            self._send(self._channels, self.instance_id, Envelope("ping", self.instance_id,
                                                                  sent_at=self._reactor.seconds()))
        return d

    def _tick(self) -> None:
        """The heartbeat loop's step: a failure is logged, and the loop goes on (the lease may still
        be renewed in time by the next one)."""
        def failed(failure: Failure) -> None:
            self.count("cluster_heartbeat_failures")
            log.failure("Cluster heartbeat failed", failure)

        self._beat().addErrback(failed)

    def _leases_read(self, leases: list[presence.Lease]) -> None:
        for instance_id in self.view.leases_read(leases):
            log.warn("Cluster instance {id} is gone (its lease ran out)", id=instance_id)
            self.count("cluster_instances_lost")
        self._observed()

    # -- bindings here -----------------------------------------------------------------

    def _registrar_changed(self, user_id: str, online: bool) -> None:
        if self._stopping:
            return  # the goodbye broadcast and leave() cover every binding
        binding = self.registrar.lookup(user_id) if online else None
        if binding is not None:
            self.view.bound_here(user_id)
            ip, port = binding.connection.peer
            self._bound[user_id] = presence.BindingRow(user_id, self.instance_id, ip, port, binding.registered_at)
            self._unbound.discard(user_id)
        else:
            self._bound.pop(user_id, None)
            self._unbound.add(user_id)
        if len(self._bound) + len(self._unbound) >= GATHER_MAX:
            self._publish()
        elif self._gather is None:
            self._gather = self._reactor.callLater(GATHER, self._publish)

    def _publish(self) -> None:
        if self._gather is not None and self._gather.active():
            self._gather.cancel()
        self._gather = None
        bound, self._bound = list(self._bound.values()), {}
        unbound, self._unbound = sorted(self._unbound), set()
        if self._channels is not None:
            if bound:
                rows = [(b.user_id, b.public_ip, b.public_port, b.bound_at) for b in bound]
                self._broadcast(self._channels, Envelope("bound", self.instance_id, bindings=rows))
            if unbound:
                self._broadcast(self._channels, Envelope("gone", self.instance_id, users=unbound))
        d = self._store.run(presence.write_bindings, self.instance_id, bound, unbound)
        d.addErrback(lambda f: log.failure("Could not write {n} cluster bindings", f, n=len(bound) + len(unbound)))

    # -- the bus ---------------------------------------------------------------------

    def _broadcast(self, channels: Channels, envelope: Envelope) -> None:
        self._seq += 1
        envelope.seq = self._seq
        channels.notify(BROADCAST, encode(envelope))

    def _send(self, channels: Channels | None, instance_id: str, envelope: Envelope) -> bool:
        """False when it could not go: no bus right now, or too large for one notification."""
        if channels is None:
            self.count("cluster_unsent")
            return False
        self._seq += 1
        envelope.seq = self._seq
        return channels.notify(channel_of(instance_id), encode(envelope))

    def _received(self, channel: str, payload: str) -> None:
        self._receive(channel, payload)
        self._observed()

    def _observed(self) -> None:
        for observer in list(self.observers):
            observer()

    def _receive(self, channel: str, payload: str) -> None:
        if channel == BROADCAST and sender_of(payload) == self.instance_id:
            return  # our own broadcast: nothing in it for us (every instance hears its own)
        try:
            envelope = decode(payload)
        except EnvelopeError as exc:
            log.warn("Cluster: {why} on {channel}", why=str(exc), channel=channel)
            return
        if envelope.sender == self.instance_id:
            if envelope.kind == "ping" and envelope.sent_at is not None:
                self.bus_rtt = max(0.0, self._reactor.seconds() - envelope.sent_at)
            return
        self.view.heard_from(envelope.sender)
        handler = self._handlers.get(envelope.kind)
        if handler is None:
            log.debug("Cluster: ignored a {kind} from {sender}", kind=envelope.kind, sender=envelope.sender)
            return
        handler(self, envelope)

    def _on_bound(self, envelope: Envelope) -> None:
        rows = [presence.BindingRow(u, envelope.sender, ip, port, at) for u, ip, port, at in envelope.bindings]
        for row in rows:
            self._take_over(row)
        self.view.bound(rows)

    def _take_over(self, row: presence.BindingRow) -> None:
        """Another instance bound a user bound here too: the later binding wins (ties: the higher ID)."""
        local = self.registrar.lookup(row.user_id)
        if local is None:
            return
        if (row.bound_at, row.instance_id) < (local.registered_at, self.instance_id):
            return  # ours is newer: the other instance will drop its own
        conn = local.connection
        log.info("{user} registered on instance {other}: binding here dropped", user=row.user_id,
                 other=row.instance_id)
        self.count("cluster_takeovers")
        self.registrar.unbind(row.user_id, conn)
        if not conn.user_ids:
            conn.close()

    def _on_gone(self, envelope: Envelope) -> None:
        self.view.gone(envelope.sender, envelope.users)

    # -- calls that cross instances ----------------------------------------------------

    def connection_of(self, user_id: str) -> SignalingConnection | None:
        """``Elsewhere``: the stand-in for a user bound on another live instance."""
        binding = self.view.where(user_id)
        if binding is None:
            return None
        key = (binding.instance_id, user_id)
        leg = self.legs.get(key)
        if leg is None:
            leg = self.legs[key] = RemoteLeg(binding.instance_id, user_id,
                                             (binding.public_ip, binding.public_port), self._to_remote)
        leg.bus_rtt = self.bus_rtt
        return leg

    def prediction_of(self, conn: SignalingConnection) -> Prediction | None:
        return conn.prediction if isinstance(conn, RemoteLeg) else None

    def _to_remote(self, leg: RemoteLeg, message: Request | Response) -> None:
        """A message down a stand-in; one that cannot go ends the leg's calls as a lost connection would."""
        self.count("cluster_sent")
        envelope = Envelope("to", self.instance_id, user=leg.user_id, message=message)
        if not self._send(self._channels, leg.instance_id, envelope) and self.legs.get(leg.key) is leg:
            del self.legs[leg.key]
            self._reactor.callLater(0, self.calls.connection_lost, leg)  # not inside the call's own step

    def _moved(self, user_id: str, old: RemoteBinding) -> None:
        """A user left the instance ``old`` names: calls through its stand-in lost their leg."""
        leg = self.legs.pop((old.instance_id, user_id), None)
        if leg is not None:
            self.calls.connection_lost(leg)

    def _on_lost(self, envelope: Envelope) -> None:
        leg = self.legs.pop((envelope.sender, envelope.user), None)
        if leg is not None:
            self.calls.connection_lost(leg)

    def _on_to(self, envelope: Envelope) -> None:
        """Another instance's call sends a message down one of our connections."""
        binding = self.registrar.lookup(envelope.user)
        if binding is None:
            self._send(self._channels, envelope.sender, Envelope("lost", self.instance_id, user=envelope.user))
            return
        message = envelope.message
        if message is None:
            log.warn("Cluster: a to without a message for {user} from {sender}", user=envelope.user,
                     sender=envelope.sender)
            return
        self.count("cluster_delivered")
        self.relays.delivered(message.call_id or "", envelope.sender, envelope.user, binding.connection)
        binding.connection.send(message)

    def _on_from(self, envelope: Envelope) -> None:
        """A callee on another instance answered in a call run here."""
        leg = self.legs.get((envelope.sender, envelope.user))
        if leg is None:
            log.debug("Cluster: a message from {user} on {sender} for no call", user=envelope.user,
                      sender=envelope.sender)
            return
        message = envelope.message
        if message is None:
            log.warn("Cluster: a from without a message from {user} on {sender}", user=envelope.user,
                     sender=envelope.sender)
            return
        if _answers_invite(message):  # this answer's prediction, never an earlier call's
            leg.prediction = envelope.prediction
        if envelope.rtt is not None:
            leg.reported_rtt = envelope.rtt
        leg.bus_rtt = self.bus_rtt
        if isinstance(message, Request):
            self.calls.handle_request(leg, message)
        else:
            self.calls.handle_response(leg, message)

    _handlers: dict[str, Callable[[ClusterNode, Envelope], None]] = {
        "bound": _on_bound, "gone": _on_gone, "to": _on_to, "from": _on_from, "lost": _on_lost,
    }

    # -- the router's side: messages from our own connections --------------------------

    def relayed(self, conn: SignalingConnection, message: Request | Response) -> bool:
        """Send ``message`` to the instance running its call, if another one does."""
        relay = self.relays.of(conn, message.call_id or "")
        if relay is None:
            return False
        envelope = Envelope("from", self.instance_id, user=relay.user_id, message=message)
        if _answers_invite(message):
            envelope.prediction = self._predict(relay.user_id, message, conn)
            envelope.rtt = conn.rtt
        self.count("cluster_relayed")
        self._send(self._channels, relay.origin, envelope)
        return True

    def _predict(self, user_id: str, answer: Response, conn: SignalingConnection) -> Prediction | None:
        """The callee's prediction, made here where its probes are (None: the answer has no usable SDP)."""
        try:
            sdp = parse_offer(answer.body)
        except SDPError:
            return None
        return self.calls.prediction_for(user_id, sdp, conn)

    def connection_lost(self, conn: SignalingConnection) -> None:
        for relay in self.relays.lost(conn):
            self._send(self._channels, relay.origin, Envelope("lost", self.instance_id, user=relay.user_id))


def _answers_invite(message: Request | Response) -> TypeGuard[Response]:
    """A 2xx to an INVITE: the callee's answer, which carries its prediction across."""
    return isinstance(message, Response) and 200 <= message.code < 300 and message.cseq is not None \
        and message.cseq[1] == "INVITE"


class ClusterCalls:
    """The router's call handler on a cluster: relayed calls to their instance, the rest here."""

    def __init__(self, node: ClusterNode, calls: CallManager) -> None:
        self.node = node
        self.calls = calls

    def handle_request(self, conn: SignalingConnection, request: Request) -> None:
        if not self.node.relayed(conn, request):
            self.calls.handle_request(conn, request)

    def handle_response(self, conn: SignalingConnection, response: Response) -> None:
        if not self.node.relayed(conn, response):
            self.calls.handle_response(conn, response)

    def connection_lost(self, conn: SignalingConnection) -> None:
        self.node.connection_lost(conn)
        self.calls.connection_lost(conn)
