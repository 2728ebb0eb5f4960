"""The agent's probes: which server endpoints it probes, a punch port probed for the next call, one over IPv6.

Kept apart from the agent (agent.py) so that its life stays readable:
these are plain functions of the registration the server gave and the
local addresses we have.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from kerjostunt.client.nat.probing import ProbeResult, probe_from
from kerjostunt.client.nat.readyport import PreparedPort
from kerjostunt.client.nat.sockets import SocketReactor, reusable_socket
from kerjostunt.client.signaling import Registration, SignalingClientProtocol
from kerjostunt.wire.kerjo import ProbeOffer

__all__ = ["probe_servers", "probe_punch_port", "prepared_punch_port", "probe_other_family"]

log = Logger(namespace="kerjostunt.client.agent")


def probe_servers(sig: SignalingClientProtocol, offer: ProbeOffer) -> list[tuple[str, int]]:
    """The probe ports at the address we reach the server on, then the alternate IP."""
    servers = [(sig.server_ip, port) for port in offer.ports]
    if offer.alt_ip and offer.ports:
        servers.append((offer.alt_ip, offer.ports[0]))
    return servers


def probe_punch_port(reactor: SocketReactor, sig: SignalingClientProtocol, registration: Registration | None,
                     local: tuple[str, int], timeout: float,
                     limit: int | None = None) -> defer.Deferred[list[ProbeResult]]:
    """Probe ``local`` (a bound reusable port) from the first ``limit`` probe endpoints (None: all);
    fires with the results, [] when nothing to probe with."""
    offer = registration.probe if registration is not None else None
    servers = probe_servers(sig, offer)[:limit] if offer is not None else []
    if offer is None or not servers:
        if offer is None or not offer.ports:
            log.warn("the server offered no probe ports")
        return defer.succeed([])
    return probe_from(reactor, local, servers, username=offer.token, password=offer.password, timeout=timeout)


@defer.inlineCallbacks
def prepared_punch_port(reactor: SocketReactor, sig: SignalingClientProtocol, registration: Registration,
                        timeout: float) -> Generator[defer.Deferred[Any], Any, PreparedPort | None]:
    """For ReadyPort: a fresh reusable port, probed now, for the next call (None: nothing to probe with)."""
    local_ip = sig.local_ip
    holder = reusable_socket((local_ip, 0))
    port = holder.getsockname()[1]
    try:
        results = yield probe_punch_port(reactor, sig, registration, (local_ip, port), timeout)
    except BaseException:
        holder.close()
        raise
    if not results:
        holder.close()
        return None
    return PreparedPort(holder, local_ip, port, results, reactor.seconds(), registration.public_ip)


def probe_other_family(reactor: SocketReactor, registration: Registration, local_v6: str | None,
                       timeout: float) -> None:
    """One probe from our IPv6 address to the server's, when we signal over IPv4:
    the server then lists our IPv6 address too (registrar, trusted peers list)."""
    offer = registration.probe
    server_v6 = next((ip for ip in offer.ips if ":" in ip), None) if offer is not None else None
    if offer is None or server_v6 is None or local_v6 is None or not offer.ports:
        return
    d = probe_from(reactor, (local_v6, 0), [(server_v6, offer.ports[0])], username=offer.token,
                   password=offer.password, timeout=timeout)
    d.addErrback(lambda f: log.info("no probe over IPv6: {why}", why=f.getErrorMessage()))
