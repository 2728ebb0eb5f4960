"""
What both call directions share: the agent seam, the punch port, probing, the race, the outcome INFO.

A call gets its punch port ready in three steps, each an input of the
call's state machine so that a call stopped meanwhile ignores (or cleans
up after) a step that finishes late: ``registered`` (a registration with a
fresh probe token), ``port_taken`` (the agent's prepared port, or None),
``ready`` (bound and probed).  A step that fails feeds ``failed``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.client.calls.race import Dialer, DialerConfig
from kerjostunt.client.calls.setup import CallSetup, PeerConnection, build_offer, reason_of
from kerjostunt.client.nat.interfaces import preferred_ipv6
from kerjostunt.client.nat.probing import ProbeError, ProbeResult
from kerjostunt.client.nat.readyport import PreparedPort, ReadyPort
from kerjostunt.client.nat.sockets import SocketReactor, reusable_socket
from kerjostunt.client.signaling import Registration, SignalingClientProtocol
from kerjostunt.wire import kerjo
from kerjostunt.wire.sdp import SessionDescription
from kerjostunt.wire.sip.message import Request, Response

__all__ = ["CallAgent"]

log = Logger()


class CallAgent(Protocol):
    """What a call needs from its agent: exactly what ``PeerAgent`` offers it today.

    Calls never see the agent's class; anything with these members (a test
    double, the agent after a rework) can run calls.
    """

    @property
    def reactor(self) -> SocketReactor: ...

    @property
    def accept_factory(self) -> IProtocolFactory | None: ...

    @property
    def app_port(self) -> int | None: ...

    @property
    def punch_deadline(self) -> float: ...

    @property
    def low_ttl(self) -> int | None: ...

    @property
    def port_mapping(self) -> tuple[str, int] | None: ...

    @property
    def ready_port(self) -> ReadyPort: ...

    def fresh_registration(self) -> defer.Deferred[tuple[SignalingClientProtocol, Registration]]: ...

    def probe_punch_port(self, sig: SignalingClientProtocol, registration: Registration | None,
                         local: tuple[str, int], limit: int | None = None) -> defer.Deferred[list[ProbeResult]]: ...

    def call_started(self, call: CallBase) -> None: ...

    def call_ended(self, call: CallBase) -> None: ...

    def dialer_started(self, dialer: Dialer) -> None: ...

    def dialer_ended(self, dialer: Dialer) -> None: ...

    def peer_accepted(self, connection: PeerConnection) -> None: ...


class PreparingInputs(Protocol):
    """The inputs both call machines share: the steps that get the punch port ready."""

    def registered(self, sig: SignalingClientProtocol, registration: Registration) -> None:
        "A registration whose probe token is still good."

    def port_taken(self, prepared: PreparedPort | None) -> None:
        "The agent's prepared punch port (None: there was none)."

    def ready(self) -> None:
        "The punch port is bound (and probed, when there were probe servers)."

    def failed(self, failure: Failure) -> None:
        "A step failed."

    def phase(self) -> str:
        "The state's name (for agent.py's ``call.state`` until it calls ``signaling_lost``)."


class CallBase:
    """What both directions share: the punch port, probing, the race, the outcome INFO."""

    _life: PreparingInputs
    #: where a call finds its IPv6 address (tests hand in their own)
    find_ipv6: Callable[[], str | None] = staticmethod(preferred_ipv6)

    def __init__(self, agent: CallAgent, peer_id: str) -> None:
        self.agent = agent
        self.reactor = agent.reactor
        self.peer_id = peer_id
        self.call_id = ""
        self.holder: socket.socket | None = None
        self.v6_holder: socket.socket | None = None  # the IPv6 punch port (ipv6_punch)
        self.v6_tried = False
        self.punch_port = 0
        self.dialer: Dialer | None = None
        self.local_ip = "0.0.0.0"
        self.probe_results: list[ProbeResult] = []
        self.registered_sig: SignalingClientProtocol | None = None
        self.registration: Registration | None = None
        self._timer: IDelayedCall | None = None

    def phase(self) -> str:
        """The machine's state by name, for logs and tests; decisions ask the machine instead."""
        return self._life.phase()

    # what the agent asks of every call (each direction's machine answers) ------------

    def stop(self, why: str) -> None:
        raise NotImplementedError

    def peer_ended(self, request: Request) -> None:
        raise NotImplementedError

    def signaling_lost(self) -> None:
        raise NotImplementedError

    # getting the punch port ready --------------------------------------------------

    def _prepare(self) -> None:
        d = self.agent.fresh_registration()
        d.addCallback(lambda pair: self._life.registered(*pair))
        d.addErrback(self._life.failed)

    def _take_port(self, sig: SignalingClientProtocol, registration: Registration) -> None:
        """Output of ``registered``: ask the agent for its prepared punch port."""
        self.registered_sig, self.registration = sig, registration
        self.agent.ready_port.take().addCallback(self._life.port_taken).addErrback(self._life.failed)

    def _use_port(self, prepared: PreparedPort | None) -> None:
        """Output of ``port_taken``: the prepared port when it fits, else a fresh one probed now."""
        sig, registration = self.registered_sig, self.registration
        assert sig is not None
        local_ip = local_ip_of(sig)
        public_ip = registration.public_ip if registration is not None else None
        if prepared is not None and (prepared.local_ip, prepared.public_ip) == (local_ip, public_ip):
            self.local_ip, self.holder, self.punch_port = local_ip, prepared.holder, prepared.port
            self.probe_results = prepared.results
            log.debug("call {call}: punch port {port}, probed {age:.0f} ms ago", call=self.call_id,
                      port=self.punch_port, age=(self.reactor.seconds() - prepared.probed_at) * 1000.0)
            self._life.ready()
            return
        if prepared is not None:
            prepared.close()  # probed over another connection or address
        try:
            self.bind_punch_port(sig)
        except OSError:
            self._life.failed(Failure())
            return
        if self.agent.ready_port.failed_recently():
            log.warn("call {call}: no probe server answered lately; calling without probes", call=self.call_id)
            self._life.ready()
            return
        if self.probes_at_turn():
            self.probe_results = list(self.agent.ready_port.latest)  # what our NAT does (race.py)
            log.debug("call {call}: punch port {port}, to be probed at our turn", call=self.call_id,
                      port=self.punch_port)
            self._life.ready()
            return
        self.probe(sig, registration, self.probe_limit()).addCallback(lambda _: self._life.ready()).addErrback(
            self._life.failed)

    def probes_at_turn(self) -> bool:
        """Whether this call probes only when the server asks, at its turn (an outgoing call may)."""
        return False

    def probe_limit(self) -> int | None:
        """How many probe endpoints this call probes (None: all; an incoming call may be told fewer)."""
        return None

    @staticmethod
    def _drop_port(prepared: PreparedPort | None) -> None:
        """Output of ``port_taken`` once the call has ended: nobody needs the port."""
        if prepared is not None:
            prepared.close()

    def bind_punch_port(self, sig: SignalingClientProtocol) -> None:
        """A fresh reusable port, held bound until the punch (and the call) ends."""
        self.local_ip = local_ip_of(sig)
        holder = reusable_socket((self.local_ip, 0))
        self.holder = holder
        self.punch_port = holder.getsockname()[1]

    def probe(self, sig: SignalingClientProtocol, registration: Registration | None,
              limit: int | None = None) -> defer.Deferred[None]:
        def probed(results: list[ProbeResult]) -> None:
            # What our NAT does (race.py) from the newest probes of several endpoints: one probe
            # (X-Kerjo-Probes: 1) shows a port, not the mapping behaviour.
            latest = self.agent.ready_port.latest
            self.probe_results = results if len(results) > 1 or not latest else list(latest)
            if len(results) > 1:
                self.agent.ready_port.latest = list(results)
            log.debug("call {call}: probed from port {port}: {mapped}", call=self.call_id, port=self.punch_port,
                      mapped=", ".join(f"{r.mapped_ip}:{r.mapped_port}" for r in self.probe_results))

        def failed(failure: Failure) -> None:
            failure.trap(ProbeError, OSError)
            # The server then predicts from older observations, or not at all.
            log.warn("call {call}: probing failed: {why}", call=self.call_id, why=failure.getErrorMessage())

        d = defer.maybeDeferred(self.agent.probe_punch_port, sig, registration, (self.local_ip, self.punch_port),
                                limit)
        return d.addCallbacks(probed, failed)

    def offer(self, sig: SignalingClientProtocol) -> SessionDescription:
        return build_offer(sig.user_id, self.local_ip, self.punch_port, self.agent.app_port,
                           ipv6_punch=self.ipv6_punch(), mapped=self.usable_mapping())

    def usable_mapping(self) -> tuple[str, int] | None:
        """The gateway's mapping of our app port, when its address is the one the server sees.

        Behind two NATs the inner gateway grants an address that is still
        private: offering it would send the peer nowhere.
        """
        mapped = self.agent.port_mapping
        registration = self.registration
        if mapped is None or registration is None or mapped[0] != registration.public_ip:
            return None
        return mapped

    def ipv6_punch(self) -> tuple[str, int] | None:
        """Our IPv6 punch endpoint when we signal over IPv4 and have a global IPv6 address.

        Bound once per call, when the offer or the dialer first needs it, and
        held until the call ends; no probe: without a NAT the address and
        port are what the peer dials (docs/punching.rst, "ipv6").
        """
        if self.v6_holder is not None:
            return self.v6_holder.getsockname()[:2]  # type: ignore[no-any-return]
        if self.v6_tried or ":" in self.local_ip:
            return None
        self.v6_tried = True
        address = self.find_ipv6()
        if address is None:
            return None
        try:
            self.v6_holder = reusable_socket((address, 0))
        except OSError as e:
            log.info("call {call}: no IPv6 punch port on {ip}: {why}", call=self.call_id, ip=address, why=e)
            return None
        return self.v6_holder.getsockname()[:2]  # type: ignore[no-any-return]

    def make_dialer(self, setup: CallSetup, app_factory: IProtocolFactory, *, stunt_only: bool = False) -> Dialer:
        registration = self.registration
        self.dialer = Dialer(
            self.reactor, setup, app_factory,
            local_ip=self.local_ip, punch_port=self.punch_port,
            own_public_ip=registration.public_ip if registration is not None else None,
            config=DialerConfig(deadline=self.agent.punch_deadline, low_ttl=self.agent.low_ttl, stunt_only=stunt_only,
                                offered_mapping=self.usable_mapping() is not None),
            own_probes=self.probe_results, ipv6_punch=self.ipv6_punch(),
            server_ip=server_ip_of(self.registered_sig),
        )
        self.agent.dialer_started(self.dialer)
        return self.dialer

    # ending ----------------------------------------------------------------------

    def _end(self) -> None:
        """Output of every transition into ``done``: stop the call's timer and give back the punch port."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.release()

    def release(self) -> None:
        if self.dialer is not None:
            self.agent.dialer_ended(self.dialer)
        holder, self.holder = self.holder, None
        if holder is not None:
            holder.close()
        v6_holder, self.v6_holder = self.v6_holder, None
        if v6_holder is not None:
            v6_holder.close()
        self.agent.call_ended(self)

    def _elapsed_ms(self) -> float:
        return (self.dialer.elapsed() * 1000.0) if self.dialer else 0.0

    def _tried(self) -> tuple[tuple[str, str], ...]:
        """What the race attempted, for the outcome's ``tried=`` (``kerjostunt attempts`` shows it)."""
        return self.dialer.tried() if self.dialer else ()

    def report(self, sig: SignalingClientProtocol | None, body: bytes, from_tag: str | None, to_uri: str,
               to_tag: str | None) -> None:
        """Send the outcome INFO; a lost signaling connection only costs the record."""
        if sig is None or sig.disconnected.called:
            log.warn("call {call}: outcome not reported, signaling is down", call=self.call_id)
            return
        d = sig.request(
            "INFO", f"sips:{sig.domain}", to=to_uri, call_id=self.call_id,
            from_tag=from_tag, to_tag=to_tag,
            headers=[("Content-Type", kerjo.OUTCOME_CONTENT_TYPE)], body=body,
        )
        d.addCallbacks(self._reported, self._not_reported)

    def _reported(self, response: Response) -> None:
        if response.code != 200:
            log.warn("call {call}: outcome answered {code}", call=self.call_id, code=response.code)

    def _not_reported(self, failure: Failure) -> None:
        log.warn("call {call}: outcome not acknowledged: {why}", call=self.call_id, why=reason_of(failure))


def local_ip_of(sig: SignalingClientProtocol) -> str:
    """Our address on the signaling connection: the punch port binds there."""
    assert sig.transport is not None
    return cast("IPv4Address | IPv6Address", sig.transport.getHost()).host


def server_ip_of(sig: SignalingClientProtocol | None) -> str | None:
    """The server's address as we connected to it: never a candidate we dial."""
    if sig is None or sig.transport is None:
        return None
    peer = sig.transport.getPeer()
    return peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None
