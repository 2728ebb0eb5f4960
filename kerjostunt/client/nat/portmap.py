"""Asking the gateway for a port mapping: PCP, then NAT-PMP, then UPnP-IGD.

A mapping makes the NAT vanish for one port, a random-port NAT included:
the peer connects to the external address the gateway granted, a plain
connect (technique ``port-mapping``, docs/punching.rst). The agent maps its
application port (the ``passive`` candidate) once, keeps the mapping alive
by renewing it at half its lifetime, and deletes it when it stops.

- PCP (RFC 6887) and NAT-PMP (RFC 6886) are one UDP exchange each with the
  gateway's port 5351 (codecs in ``wire/portmap.py``): retransmitted at
  250 ms, 500 ms, 1 s (the RFCs' 3 s and 250 ms-doubling-to-64 s schedules
  suit a daemon, not a client about to call), over a connected socket so an
  ICMP "port unreachable" (no such service) ends the try at once. A
  NAT-PMP-only gateway answers PCP with "unsupported version", and the
  NAT-PMP request follows at once.
- UPnP-IGD through miniupnpc's Python binding (the ``upnp`` extra), the
  library the miniupnpd authors keep: SSDP discovery, the IGD's SOAP
  description and ``AddPortMapping`` block, so they run in a daemon thread
  each (``in_daemon_thread``). Without the binding this method is skipped.

The mapper's life is a state machine (``idle -> asking -> held <->
renewing``, and ``released`` at the end); a grant arriving after the end
is deleted at once.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from automat import TypeMachineBuilder
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kerjostunt.wire import portmap as wire

__all__ = ["Mapping", "MappingFailed", "NATPMPGateway", "PCPGateway", "PortMapper", "UPnPGateway", "default_gateway",
           "in_daemon_thread", "mapper_for"]

log = Logger()

Endpoint = tuple[str, int]
T = TypeVar("T")

RETRANSMITS = (0.25, 0.5, 1.0)  # seconds to wait after each send
LIFETIME = 7200  # seconds asked for (RFC 6886 section 3.3's recommendation)
MIN_RENEW = 30.0  # never renew more often than this, whatever lifetime is granted


@dataclass(frozen=True)
class Mapping:
    method: str  # "pcp" | "nat-pmp" | "upnp"
    internal: Endpoint
    external: Endpoint
    lifetime: int
    #: what deleting it needs (the PCP nonce)
    token: bytes = b""


class MappingFailed(Exception):
    """No mapping from this method; the mapper tries the next."""


class Gateway(Protocol):
    """One way to ask the gateway (the mapper tries them in order)."""

    name: str

    def map(self, internal_port: int, lifetime: int, previous: Mapping | None) -> defer.Deferred[Mapping]: ...

    def unmap(self, mapping: Mapping) -> defer.Deferred[None]: ...


class UDPReactor(IReactorUDP, IReactorTime):
    """The reactor the UDP methods use (the global one; tests: it, with their own clock)."""


def default_gateway(route: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default route's gateway (Linux), None when there is none."""
    try:
        lines = route.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        words = line.split()
        if len(words) >= 3 and words[1] == "00000000" and words[2] != "00000000":
            try:
                raw = struct.pack("<I", int(words[2], 16))
            except (ValueError, struct.error):
                continue
            return ".".join(str(b) for b in raw)
    return None


class _Exchange(DatagramProtocol):
    """One request to the gateway, retransmitted; the first datagram ``decode`` accepts answers it.

    The request is built once the socket is connected: PCP's names our
    source address towards the gateway, which only then is known.
    """

    def __init__(self, clock: IReactorTime, request: Callable[[str], bytes], decode: Callable[[bytes], Any],
                 gateway: Endpoint) -> None:
        self.clock = clock
        self.build = request
        self.request = b""
        self.decode = decode
        self.gateway = gateway
        self.done: defer.Deferred[Any] = defer.Deferred(lambda _: self._close())
        self.local_ip = "0.0.0.0"
        self._timer: IDelayedCall | None = None
        self._sent = 0
        self._over = False
        self._port: Any = None

    def startProtocol(self) -> None:
        assert self.transport is not None
        self._port = self.transport  # doStop clears ``transport`` before stopProtocol
        try:
            self.transport.connect(*self.gateway)
            self.local_ip = self.transport.getHost().host
            self.request = self.build(self.local_ip)
        except Exception as e:  # no route to the gateway, an address the codec refuses
            self._finish(Failure(MappingFailed(str(e) or type(e).__name__)))
            return
        self._send()

    def _send(self) -> None:
        if self._sent >= len(RETRANSMITS) or self.transport is None:
            self._finish(Failure(MappingFailed("no answer")))
            return
        try:
            self.transport.write(self.request, self.gateway)
        except OSError as e:  # no route, network down
            self._finish(Failure(MappingFailed(str(e))))
            return
        self._timer = self.clock.callLater(RETRANSMITS[self._sent], self._send)
        self._sent += 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            answer = self.decode(data)
        except wire.UnsupportedVersion:
            self._finish(Failure(MappingFailed("the gateway answers NAT-PMP only")))
            return
        except wire.PortmapError:
            return  # not for us: wait for the real answer
        self._finish(answer)

    def connectionRefused(self) -> None:
        self._finish(Failure(MappingFailed("port unreachable")))

    def stopProtocol(self) -> None:
        """The socket closed under us: no more sends. Usually an ICMP error: the epoll reactor
        drops a connected UDP socket that has one pending, before any read could report
        it (so ``connectionRefused`` is not called); else the reactor shutting down."""
        code, sock = 0, getattr(self._port, "socket", None)  # still open during stopProtocol
        if sock is not None:
            try:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                code = 0
        why = "port unreachable" if code == errno.ECONNREFUSED else os.strerror(code) if code else "the socket closed"
        self._finish(Failure(MappingFailed(why)))

    def _close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.stopListening()

    def _finish(self, outcome: Any) -> None:
        if self._over:
            return
        self._over = True  # before closing: closing calls stopProtocol
        self._close()
        if self.done.called:  # cancelled
            return
        if isinstance(outcome, Failure):
            self.done.errback(outcome)
        else:
            self.done.callback(outcome)


def _exchange(reactor: UDPReactor, clock: IReactorTime, gateway: Endpoint, request: Callable[[str], bytes],
              decode: Callable[[bytes], T]) -> defer.Deferred[tuple[T, str]]:
    """Send ``request(local_ip)``; fires with (answer, local_ip)."""
    exchange = _Exchange(clock, request, decode, gateway)
    try:
        reactor.listenUDP(0, exchange, "", 8192)
    except Exception:
        return defer.fail(MappingFailed("no UDP socket"))
    return exchange.done.addCallback(lambda answer: (answer, exchange.local_ip))


class PCPGateway:
    """PCP MAP (RFC 6887 section 11), TCP, the external address the gateway picks."""

    name = "pcp"

    def __init__(self, reactor: UDPReactor, gateway_ip: str, port: int = wire.PORT,
                 clock: IReactorTime | None = None) -> None:
        self.reactor = reactor
        self.clock = clock or reactor  # the retransmission timer (tests: a Clock)
        self.gateway = (gateway_ip, port)

    def map(self, internal_port: int, lifetime: int, previous: Mapping | None) -> defer.Deferred[Mapping]:
        # A renewal repeats the nonce and suggests what was granted (section 11.2.1).
        nonce = previous.token if previous is not None else secrets.token_bytes(12)
        suggested = previous.external if previous is not None else ("::", 0)

        def request(local_ip: str) -> bytes:
            return wire.PCPMapRequest(nonce, local_ip, internal_port, lifetime, suggested[1],
                                      suggested[0]).to_bytes()

        def granted(pair: tuple[wire.PCPMapResponse, str]) -> Mapping:
            answer, local_ip = pair
            if answer.nonce != nonce:
                raise MappingFailed("an answer to another request")
            if not answer.ok:
                raise MappingFailed(answer.reason)
            return Mapping(self.name, (local_ip, internal_port), (answer.external_ip, answer.external_port),
                           answer.lifetime, nonce)

        d = _exchange(self.reactor, self.clock, self.gateway, request, wire.decode_pcp_response)
        return d.addCallback(granted)

    def unmap(self, mapping: Mapping) -> defer.Deferred[None]:
        request = wire.PCPMapRequest(mapping.token, mapping.internal[0], mapping.internal[1], 0).to_bytes()
        d = _exchange(self.reactor, self.clock, self.gateway, lambda _: request, wire.decode_pcp_response)
        return d.addCallback(lambda _: None)


class NATPMPGateway:
    """NAT-PMP (RFC 6886): the external address, then a TCP mapping."""

    name = "nat-pmp"

    def __init__(self, reactor: UDPReactor, gateway_ip: str, port: int = wire.PORT,
                 clock: IReactorTime | None = None) -> None:
        self.reactor = reactor
        self.clock = clock or reactor  # the retransmission timer (tests: a Clock)
        self.gateway = (gateway_ip, port)

    @defer.inlineCallbacks
    def map(self, internal_port: int, lifetime: int, previous: Mapping | None) -> Any:
        address_answer, _ = yield _exchange(self.reactor, self.clock, self.gateway,
                                            lambda _: wire.encode_natpmp_address_request(),
                                            wire.decode_natpmp_address_response)
        result, external_ip = address_answer
        if result != 0:
            raise MappingFailed(wire.NATPMP_RESULTS.get(result, f"result {result}"))
        suggested = previous.external[1] if previous is not None else 0
        request = wire.NATPMPMapRequest(internal_port, lifetime, suggested).to_bytes()
        answer, local_ip = yield _exchange(self.reactor, self.clock, self.gateway, lambda _: request,
                                           wire.decode_natpmp_map_response)
        if not answer.ok or answer.internal_port != internal_port:
            raise MappingFailed(answer.reason if not answer.ok else "a mapping of another port")
        return Mapping(self.name, (local_ip, internal_port), (external_ip, answer.external_port), answer.lifetime)

    def unmap(self, mapping: Mapping) -> defer.Deferred[None]:
        request = wire.NATPMPMapRequest(mapping.internal[1], 0, 0).to_bytes()
        d = _exchange(self.reactor, self.clock, self.gateway, lambda _: request, wire.decode_natpmp_map_response)
        return d.addCallback(lambda _: None)


class UPnPGateway:
    """UPnP-IGD's WANIPConnection through miniupnpc, in a thread (its calls block)."""

    name = "upnp"

    def __init__(self, in_thread: Callable[[Callable[[], Any]], defer.Deferred[Any]],
                 discover_ms: int = 500) -> None:
        self.in_thread = in_thread
        self.discover_ms = discover_ms
        self._igd: Any = None

    @staticmethod
    def available() -> bool:
        try:
            import miniupnpc  # type: ignore[import-not-found,unused-ignore]  # noqa: F401  # a C module, no stubs
        except ImportError:
            return False
        return True

    def _find(self) -> Any:
        import miniupnpc  # type: ignore[import-not-found,unused-ignore]  # a C module, no stubs

        igd = miniupnpc.UPnP()
        igd.discoverdelay = self.discover_ms
        try:
            found = igd.discover()
        except Exception as e:  # miniupnpc raises Exception with its own text ("Success": nobody answered)
            text = str(e)
            raise MappingFailed("no UPnP device answered" if text in ("", "Success")
                                else f"SSDP discovery failed ({text})") from None
        if found <= 0:
            raise MappingFailed("no UPnP device answered")
        try:
            igd.selectigd()
        except Exception as e:
            raise MappingFailed(f"no Internet gateway device: {e}") from None
        return igd

    def map(self, internal_port: int, lifetime: int, previous: Mapping | None) -> defer.Deferred[Mapping]:
        def blocking() -> Mapping:
            igd = self._igd = self._igd or self._find()
            external_ip = igd.externalipaddress()
            external_port = previous.external[1] if previous is not None else internal_port
            try:
                ok = igd.addportmapping(external_port, "TCP", igd.lanaddr, internal_port, "kerjostunt", "", lifetime)
            except Exception as e:
                raise MappingFailed(f"AddPortMapping: {e}") from None
            if not ok:
                raise MappingFailed("AddPortMapping refused")
            return Mapping(self.name, (igd.lanaddr, internal_port), (external_ip, external_port), lifetime)

        # A thread cannot be stopped: a mapping it makes after the caller gave up is deleted.
        abandoned: list[bool] = []
        result: defer.Deferred[Mapping] = defer.Deferred(lambda _: abandoned.append(True))

        def made(mapping: Mapping) -> None:
            if abandoned:
                self.unmap(mapping).addErrback(lambda f: None)
            else:
                result.callback(mapping)

        def failed(failure: Failure) -> None:
            if not abandoned:
                result.errback(failure)

        self.in_thread(blocking).addCallbacks(made, failed)
        return result

    def unmap(self, mapping: Mapping) -> defer.Deferred[None]:
        igd = self._igd

        def blocking() -> None:
            if igd is not None:
                igd.deleteportmapping(mapping.external[1], "TCP")

        return self.in_thread(blocking)


class _MapperInputs(Protocol):
    def start(self) -> None:
        "Map the port."

    def granted(self, mapping: Mapping) -> None:
        "A method granted (or renewed) the mapping."

    def failed(self, why: str) -> None:
        "Every method failed (or the renewal did)."

    def renew_due(self) -> None:
        "Half the lifetime has passed."

    def release(self) -> None:
        "Nobody needs the mapping any more: delete it."

    def phase(self) -> str:
        "The state's name, for logs and tests."


class PortMapper:
    """One port's mapping: the first method that grants it, renewed until released.

    ``mapping`` is the mapping held now (None while asking, after a
    failure, after release); ``on_change`` hears every change, so the agent
    offers the mapped address in its next call.
    """

    def __init__(self, clock: IReactorTime, gateways: Sequence[Gateway], internal_port: int,
                 lifetime: int = LIFETIME, on_change: Callable[[Mapping | None], None] | None = None) -> None:
        self.clock = clock
        self.gateways = list(gateways)
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.on_change = on_change
        self.mapping: Mapping | None = None
        self._told: Mapping | None = None
        self._attempt: defer.Deferred[Mapping] | None = None
        self.errors: list[str] = []
        self._timer: IDelayedCall | None = None
        self._waiting: list[defer.Deferred[Mapping | None]] = []
        self._life = _MapperMachine(self)

    def start(self) -> None:
        self._life.start()

    def settled(self) -> defer.Deferred[Mapping | None]:
        """Fires with the first ask's outcome: the mapping, or None (every method failed, or
        released first). For a one-off question (``kerjostunt netcheck``); the agent listens
        to ``on_change`` instead."""
        if self.phase() not in ("idle", "asking"):
            return defer.succeed(self.mapping)
        d: defer.Deferred[Mapping | None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def release(self) -> defer.Deferred[bool]:
        """Delete the mapping; fires True once the gateway answered (at once when none is
        held), False when deleting it failed (logged)."""
        held = self.mapping
        self._life.release()
        self._tell()
        self._settle()
        if held is None:
            return defer.succeed(True)
        return self._delete(held)

    def phase(self) -> str:
        return self._life.phase()

    # outputs ---------------------------------------------------------------------

    def _ask(self, previous: Mapping | None) -> None:
        gateways = [g for g in self.gateways if previous is None or g.name == previous.method]
        self.errors = []
        self._try(gateways, previous)

    def _try(self, gateways: list[Gateway], previous: Mapping | None) -> None:
        if not gateways:
            self._life.failed("; ".join(self.errors) or "no method")
            self._tell()
            self._settle()
            return
        gateway, rest = gateways[0], gateways[1:]

        def refused(failure: Failure) -> None:
            if failure.check(defer.CancelledError):
                return  # released meanwhile
            self.errors.append(f"{gateway.name}: {failure.getErrorMessage() or type(failure.value).__name__}")
            self._try(rest, previous)

        d = self._attempt = defer.maybeDeferred(gateway.map, self.internal_port, self.lifetime, previous)
        d.addCallbacks(self._granted, refused)

    def _granted(self, mapping: Mapping) -> None:
        self._life.granted(mapping)
        self._tell()
        self._settle()

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.mapping)

    def _tell(self) -> None:
        """``on_change`` once the machine's outputs have run (it may ask ``phase``)."""
        if self.mapping != self._told:
            self._told = self.mapping
            if self.on_change is not None:
                self.on_change(self.mapping)

    def _hold(self, mapping: Mapping) -> None:
        self.mapping = mapping
        log.info("port {port} mapped by {method} to {ip}:{external} for {lifetime} s", port=self.internal_port,
                 method=mapping.method, ip=mapping.external[0], external=mapping.external[1],
                 lifetime=mapping.lifetime)
        self._timer = self.clock.callLater(max(MIN_RENEW, mapping.lifetime / 2), self._life.renew_due)

    def _renew(self) -> None:
        self._timer = None
        self._ask(self.mapping)

    def _lose(self, why: str) -> None:
        log.info("no mapping of port {port}: {why}", port=self.internal_port, why=why)
        self.mapping = None

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.called:
            attempt.cancel()
        self.mapping = None

    def _delete(self, mapping: Mapping) -> defer.Deferred[bool]:
        def failed(failure: Failure) -> bool:
            log.info("deleting the mapping failed: {why}", why=failure.getErrorMessage())
            return False

        for gateway in self.gateways:
            if gateway.name == mapping.method:
                return defer.maybeDeferred(gateway.unmap, mapping).addCallbacks(lambda _: True, failed)
        return defer.succeed(False)

    def _late(self, mapping: Mapping) -> None:
        """A grant after release: nobody will use it."""
        self._delete(mapping)


def mapper_for(reactor: object, internal_port: int, gateway: str | None = None, *, port: int = wire.PORT,
               upnp: bool = True) -> PortMapper | None:
    """A mapper for ``internal_port`` at the default gateway (None: no default route).

    ``reactor`` is the global one: UDP, time and a thread pool (for miniupnpc).
    ``port`` and ``upnp``: tests' fake gateways (PCP and NAT-PMP at another port, no SSDP).
    """
    gateway = gateway or default_gateway()
    if gateway is None:
        return None
    udp = cast(UDPReactor, reactor)
    methods: list[Gateway] = [PCPGateway(udp, gateway, port), NATPMPGateway(udp, gateway, port)]
    if upnp and UPnPGateway.available():
        methods.append(UPnPGateway(partial(in_daemon_thread, cast(IReactorFromThreads, reactor))))
    return PortMapper(udp, methods, internal_port)


def in_daemon_thread(reactor: IReactorFromThreads, blocking: Callable[[], T]) -> defer.Deferred[T]:
    """``blocking()`` in a daemon thread of its own, the result back in the reactor thread.

    Not the reactor's pool, which its shutdown joins: miniupnpc's discovery
    takes 4 s where nothing answers, and every command that stopped sooner
    waited for it. An exit abandons the thread (its mapping expires).
    """
    result: defer.Deferred[T] = defer.Deferred()

    def run() -> None:
        try:
            value = blocking()
        except BaseException:
            reactor.callFromThread(result.errback, Failure())
        else:
            reactor.callFromThread(result.callback, value)

    threading.Thread(target=run, name="kerjostunt-upnp", daemon=True).start()
    return result


_mapper = TypeMachineBuilder(_MapperInputs, PortMapper)
_idle = _mapper.state("idle")
_asking = _mapper.state("asking")
_held = _mapper.state("held")
_renewing = _mapper.state("renewing")
_none = _mapper.state("none")
_released = _mapper.state("released")


@_idle.upon(_MapperInputs.start).to(_asking)
def _start(inputs: _MapperInputs, mapper: PortMapper) -> None:
    mapper._ask(None)


@_asking.upon(_MapperInputs.granted).to(_held)
@_renewing.upon(_MapperInputs.granted).to(_held)
def _granted(inputs: _MapperInputs, mapper: PortMapper, mapping: Mapping) -> None:
    mapper._hold(mapping)


@_asking.upon(_MapperInputs.failed).to(_none)
@_renewing.upon(_MapperInputs.failed).to(_none)
def _failed(inputs: _MapperInputs, mapper: PortMapper, why: str) -> None:
    mapper._lose(why)


@_held.upon(_MapperInputs.renew_due).to(_renewing)
def _renew_due(inputs: _MapperInputs, mapper: PortMapper) -> None:
    mapper._renew()


for _state in (_idle, _asking, _held, _renewing, _none):
    @_state.upon(_MapperInputs.release).to(_released)
    def _release(inputs: _MapperInputs, mapper: PortMapper) -> None:
        mapper._stop()


@_released.upon(_MapperInputs.granted).loop()
def _granted_late(inputs: _MapperInputs, mapper: PortMapper, mapping: Mapping) -> None:
    mapper._late(mapping)


_released.upon(_MapperInputs.release).loop().returns(None)
_released.upon(_MapperInputs.failed).loop().returns(None)
_released.upon(_MapperInputs.start).loop().returns(None)
_released.upon(_MapperInputs.renew_due).loop().returns(None)
for _state in (_asking, _held, _renewing, _none):
    _state.upon(_MapperInputs.start).loop().returns(None)
_none.upon(_MapperInputs.renew_due).loop().returns(None)
for _state in (_idle, _asking, _held, _renewing, _none, _released):
    _state.upon(_MapperInputs.phase).loop().returns(_state.name)

_MapperMachine = _mapper.build()
