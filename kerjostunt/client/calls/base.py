"""
What both call directions share: the punch port, probing, dialing, the outcome INFO.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from kerjostunt.client.calls.race import Dialer
from kerjostunt.client.calls.setup import CallSetup, _reason, build_offer
from kerjostunt.client.nat.probing import ProbeError
from kerjostunt.client.nat.sockets import reusable_socket
from kerjostunt.client.signaling import SignalingClientProtocol
from kerjostunt.wire import kerjo
from kerjostunt.wire.sdp import SessionDescription

log = Logger()


class _CallBase:
    """What both directions share: the punch port, probing, dialing, the outcome INFO."""

    def __init__(self, agent: Any, peer_id: str) -> None:
        self.agent = agent
        self.reactor = agent.reactor
        self.peer_id = peer_id
        self.call_id = ""
        self.holder: Any = None
        self.punch_port = 0
        self.dialer: Dialer | None = None
        self.local_ip = "0.0.0.0"
        self.probe_results: list[Any] = []
        self.state = "preparing"
        self._timer: Any = None

    def bind_punch_port(self, sig: SignalingClientProtocol) -> None:
        """A fresh reusable port, held bound until the punch (and the call) ends."""
        self.local_ip = sig.transport.getHost().host
        self.holder = reusable_socket((self.local_ip, 0))
        self.punch_port = self.holder.getsockname()[1]

    @defer.inlineCallbacks
    def take_punch_port(self, sig: SignalingClientProtocol, registration: Any):  # type: ignore[no-untyped-def]
        """The agent's prepared punch port when it fits, else a fresh one probed now."""
        ready_port = getattr(self.agent, "ready_port", None)
        prepared = (yield ready_port.take()) if ready_port is not None else None
        if self.state == "done":  # ended while a preparation was finishing
            if prepared is not None:
                prepared.close()
            return
        local_ip = sig.transport.getHost().host
        public_ip = registration.public_ip if registration is not None else None
        if prepared is not None and (prepared.local_ip, prepared.public_ip) == (local_ip, public_ip):
            self.local_ip, self.holder, self.punch_port = local_ip, prepared.holder, prepared.port
            self.probe_results = prepared.results
            log.debug("call {call}: punch port {port}, probed {age:.0f} ms ago", call=self.call_id,
                      port=self.punch_port, age=(self.reactor.seconds() - prepared.probed_at) * 1000.0)
            return
        if prepared is not None:
            prepared.close()  # probed over another connection or address
        self.bind_punch_port(sig)
        if ready_port is not None and ready_port.failed_recently():
            log.warn("call {call}: no probe server answered lately; calling without probes", call=self.call_id)
            return
        yield self.probe(sig, registration)

    @defer.inlineCallbacks
    def probe(self, sig: SignalingClientProtocol, registration: Any):  # type: ignore[no-untyped-def]
        try:
            self.probe_results = yield self.agent.probe_punch_port(sig, registration, (self.local_ip, self.punch_port))
            log.debug("call {call}: probed from port {port}: {mapped}", call=self.call_id, port=self.punch_port,
                      mapped=", ".join(f"{r.mapped_ip}:{r.mapped_port}" for r in self.probe_results))
        except (ProbeError, OSError) as e:
            # The server then predicts from older observations, or not at all.
            log.warn("call {call}: probing failed: {why}", call=self.call_id, why=str(e))

    def offer(self, sig: SignalingClientProtocol) -> SessionDescription:
        return build_offer(sig.user_id, self.local_ip, self.punch_port, self.agent.app_port)

    def make_dialer(self, setup: CallSetup, app_factory: IProtocolFactory, registration: Any) -> Dialer:
        self.dialer = Dialer(
            self.reactor, setup, app_factory,
            local_ip=self.local_ip, punch_port=self.punch_port,
            own_public_ip=registration.public_ip if registration is not None else None,
            deadline=self.agent.punch_deadline, low_ttl=self.agent.low_ttl,
        )
        self.dialer.stunt_only = getattr(self, "prefer_stunt", False)
        self.dialer.own_probes = self.probe_results
        self.agent.dialer_started(self.dialer)
        return self.dialer

    def _end(self) -> None:
        """Done: stop the call's timer and give back the punch port."""
        if self.state == "done":
            return
        self.state = "done"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.release()

    def release(self) -> None:
        if self.dialer is not None:
            self.agent.dialer_ended(self.dialer)
        if self.holder is not None:
            self.holder.close()
            self.holder = None
        self.agent.call_ended(self)

    def report(self, sig: SignalingClientProtocol | None, body: bytes, from_tag: str | None, to_uri: str, to_tag: str | None) -> None:
        """Send the outcome INFO; a lost signaling connection only costs the record."""
        if sig is None or sig.disconnected.called:
            log.warn("call {call}: outcome not reported, signaling is down", call=self.call_id)
            return
        d = sig.request(
            "INFO", f"sips:{sig.domain}", to=to_uri, call_id=self.call_id,
            from_tag=from_tag, to_tag=to_tag,
            headers=[("Content-Type", kerjo.OUTCOME_CONTENT_TYPE)], body=body,
        )
        d.addCallbacks(
            lambda r: r.code == 200 or log.warn("call {call}: outcome answered {code}", call=self.call_id, code=r.code),
            lambda f: log.warn("call {call}: outcome not acknowledged: {why}", call=self.call_id, why=_reason(f)),
        )

