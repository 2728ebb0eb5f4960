"""What a ``PeerAgent`` is told: the server, the account, the timings, the ports.

Twenty loose keyword arguments made every caller (the CLI, the tests, an
application) repeat the whole list and made it easy to mix up two floats.
The settings are plain values, so they live in frozen dataclasses grouped
by what they are about; the collaborators the agent calls (``accept_factory``,
``on_peer``) stay arguments of ``PeerAgent`` itself.

Two ways to build one::

    AgentConfig(
        server=ServerConfig("stunt.example.org", 5061, domain="kerjo.local", ca_path="ca.pem"),
        account=Account("alice", "wonderland"),
        ports=Ports(listen_port=7000),
    )
    AgentConfig.of(server=("stunt.example.org", 5061), user_id="alice", password="wonderland",
                   domain="kerjo.local", ca_path="ca.pem", listen_port=7000)

the second with the flat keyword names ``PeerAgent`` has always taken (and
still takes: ``PeerAgent(reactor, server=..., user_id=..., ...)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, NotRequired, Required, TypedDict, TypeVar, Unpack

from kerjostunt.client.backoff import Backoff

__all__ = ["Account", "AgentConfig", "AgentSettings", "ServerConfig", "Ports", "Timeouts", "DEFAULT_PORT"]

DEFAULT_PORT = 5061


@dataclass(frozen=True)
class ServerConfig:
    """Where the STUNT server is and how to trust it."""

    host: str
    port: int = DEFAULT_PORT
    #: the SIP domain, the digest realm
    domain: str = "kerjo.local"
    #: the CA file the server certificate must verify against
    ca_path: str = ""
    #: the name the certificate must carry (None: ``host``)
    tls_hostname: str | None = None
    #: more servers of the same cluster, tried in order after ``host:port`` (docs/cluster.rst)
    alternates: tuple[tuple[str, int], ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every server, in the order they are tried."""
        return ((self.host, self.port), *self.alternates)

    def at(self, index: int) -> ServerConfig:
        """This config for the ``index``-th server of ``addresses`` (wrapping round)."""
        host, port = self.addresses[index % len(self.addresses)]
        return replace(self, host=host, port=port)

    @property
    def expected_name(self) -> str:
        return self.tls_hostname or self.host


@dataclass(frozen=True)
class Account:
    """Who we are at the server; the password is left out of ``repr``, so logs never show it."""

    user_id: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Timeouts:
    """How long things may take and how often they are repeated (seconds)."""

    #: the REGISTER expiry asked for; the agent re-registers at 80 % of what is granted
    register_expires: int = 3600
    #: the TCP connect to the server, and then its TLS handshake, each (a silent port fails after it)
    connect_timeout: float = 10.0
    #: our own CRLFCRLF ping to the server, and how long its answer may take
    keepalive_interval: float = 60.0
    keepalive_timeout: float = 30.0
    #: one probe (STUN Binding) of a punch port
    probe_timeout: float = 5.0
    #: how long a call's dial may punch before giving up
    punch_deadline: float = 10.0
    #: on stop: how long the unregistering REGISTER may wait for its answer, then how long
    #: the TLS close may take before the connection is aborted (a server gone silent answers
    #: neither; the stop used to wait for ever, issue 13)
    stop_unregister: float = 2.0
    stop_close: float = 1.0


@dataclass(frozen=True)
class Ports:
    """The local ports: the application port, the punch SYN's TTL, the prepared punch port."""

    #: the application port for direct connections (0: any, None: none)
    listen_port: int | None = 0
    #: TTL of the first SYN to each punch candidate: our NAT is hop 1, so 2 leaves it (None: the default TTL)
    low_ttl: int | None = 2
    #: how old a prepared punch port may be (readyport.py); 0 turns preparing off
    punch_port_max_age: float = 30.0
    #: ask the gateway to map the application port (PCP, NAT-PMP, UPnP-IGD: nat/portmap.py)
    port_mapping: bool = True


@dataclass(frozen=True)
class AgentConfig:
    """Everything a ``PeerAgent`` needs to know, grouped; see the module docstring."""

    server: ServerConfig
    account: Account
    timeouts: Timeouts = Timeouts()
    ports: Ports = Ports()
    #: reconnecting after a lost signaling connection: 1 s doubling to 60 s, each times 0.5..1.5
    reconnect: Backoff = Backoff(1.0, 60.0)

    @classmethod
    def of(cls, **settings: Unpack[AgentSettings]) -> AgentConfig:
        """The config from ``PeerAgent``'s flat keyword names (the CLI's and earlier versions')."""
        unknown = set(settings) - set(AgentSettings.__annotations__)
        if unknown:
            raise TypeError(f"unexpected PeerAgent settings: {', '.join(sorted(unknown))}")
        host, port = settings["server"]
        server = ServerConfig(
            host, port, domain=settings["domain"], ca_path=settings["ca_path"],
            tls_hostname=settings.get("tls_hostname"),
        )
        return cls(
            server=server,
            account=Account(settings["user_id"], settings["password"]),
            timeouts=_pick(Timeouts(), settings),
            ports=_pick(Ports(), settings),
            reconnect=Backoff(
                settings.get("backoff_initial", 1.0), settings.get("backoff_max", 60.0), low=0.5, high=1.5
            ),
        )


_Group = TypeVar("_Group", Timeouts, Ports)


class AgentSettings(TypedDict):
    """The flat keywords of ``AgentConfig.of`` (and ``PeerAgent(reactor, **settings)``)."""

    server: Required[tuple[str, int]]
    user_id: Required[str]
    password: Required[str]
    domain: Required[str]
    ca_path: Required[str]
    tls_hostname: NotRequired[str | None]
    listen_port: NotRequired[int | None]
    punch_deadline: NotRequired[float]
    low_ttl: NotRequired[int | None]
    register_expires: NotRequired[int]
    keepalive_interval: NotRequired[float]
    keepalive_timeout: NotRequired[float]
    backoff_initial: NotRequired[float]
    backoff_max: NotRequired[float]
    probe_timeout: NotRequired[float]
    punch_port_max_age: NotRequired[float]
    port_mapping: NotRequired[bool]


def _pick(defaults: _Group, settings: AgentSettings) -> _Group:
    """``defaults`` with every field that ``settings`` names replaced."""
    names = {f.name for f in dataclasses.fields(defaults)}
    chosen: dict[str, Any] = {key: value for key, value in settings.items() if key in names}
    return dataclasses.replace(defaults, **chosen)
