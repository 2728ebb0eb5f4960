"""``twistd kerjostunt``: command-line options and ``makeService``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import cast

from twisted.application.service import IService
from twisted.logger import InvalidLogLevelError, LogLevel
from twisted.python import usage

from kerjostunt.server.limits import ConnectionLimits, WebLimits
from kerjostunt.server.logs import filter_log_level, global_observers, speed_up_log_files
from kerjostunt.server.reactor import IServerReactor
from kerjostunt.server.relay import RelaySettings, parse_relay_url, read_secret
from kerjostunt.server.service import ServerSettings, StuntServer, tune_gc
from kerjostunt.server.startup import StartGuard, twistd_teller


def _tcp(port: int, interface: str) -> str:
    """A TCP server endpoint string; IPv6 interfaces need their colons escaped."""
    # A deep backlog: thousands of peers reconnect at once after a restart.
    description = f"tcp:{port}:backlog=1024"
    if interface:
        description += ":interface=" + interface.replace(":", "\\:")
    return description


WILDCARDS = frozenset({"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"})


def split_interfaces(text: str) -> list[str]:
    """``--interface``'s comma-separated addresses; ``[""]`` (all IPv4) when empty.

    ``::`` alone is dual stack: on Linux (``net.ipv6.bindv6only = 0``) an
    IPv6 wildcard listener also accepts IPv4, whose peers show as
    IPv4-mapped addresses (``kerjostunt.tcp.host_port`` reads them as IPv4).
    A wildcard beside any other address of the same port fails with
    "Address already in use", so it has to stand alone. ValueError otherwise.
    """
    interfaces = [part.strip().strip("[]") for part in text.split(",") if part.strip()]
    if not interfaces:
        return [""]
    for interface in interfaces:
        ipaddress.ip_address(interface)
    if len(interfaces) > 1 and any(i.lower() in WILDCARDS for i in interfaces):
        raise ValueError("a wildcard (0.0.0.0 or ::) listens alone: '::' alone is dual stack")
    if len(set(interfaces)) != len(interfaces):
        raise ValueError("an address is named twice")
    return interfaces


def certificate_hosts(interfaces: list[str]) -> list[str]:
    """The explicit listening addresses, which the generated certificate must name
    (a client dialing ``[2001:db8::1]:5061`` checks that IP against it)."""
    return [i for i in interfaces if i.lower() not in WILDCARDS]


def probe_endpoints(ports: list[int], interface: str | list[str], alt_ip: str | None) -> list[str]:
    """The probe listeners: on each interface, and on ``alt_ip`` unless a wildcard covers it.

    A wildcard listener (no interface, ``0.0.0.0`` or ``::``) already
    receives the alternate address's connections; an explicit listener on
    the same port beside it fails with "Address already in use", so there
    is one wildcard listener or explicit ones, never both. The first
    interface's endpoints come first: their indices are ``ports``' indices.
    """
    interfaces = [interface] if isinstance(interface, str) else interface
    endpoints = [_tcp(p, i) for i in interfaces for p in ports]
    explicit = all(i.strip().lower() not in WILDCARDS for i in interfaces)
    if alt_ip and explicit and alt_ip not in interfaces:
        endpoints += [_tcp(p, alt_ip) for p in ports]
    return endpoints


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return port


class Options(usage.Options):
    """Every option has a default: ``twistd -n kerjostunt`` alone runs a server."""

    optParameters = [
        ["port", "p", 5061, "TLS SIP signaling port.", _port],
        ["interface", "i", "",
         "Addresses to listen on, comma-separated ('::' alone: IPv6 and IPv4; default: all IPv4)."],
        ["domain", "d", "kerjo.local", "SIP domain and digest realm (must be the database's, stored at its creation)."],
        ["db", None, "sqlite:///kerjostunt.sqlite", "SQLAlchemy database URL (sqlite:///FILE, postgresql://...)."],
        ["certs", None, "certs", "Directory of the generated CA and server certificate."],
        [
            "advertise", None, None,
            "Host name or address peers reach this instance at, told to the other instances of a cluster "
            "(PostgreSQL --db only; default: the machine's host name).",
        ],
        ["cert", None, None, "Use this server certificate (PEM) instead of generating one."],
        ["key", None, None, "Private key (PEM) for --cert (default: inside the --cert file)."],
        ["probe-ports", None, "3478,3479", "Comma-separated STUN-over-TCP probe ports (two or more)."],
        ["probe-alt-ip", None, None, "A second local address that also serves the probe ports."],
        ["probe-max-per-ip", None, 64, "Concurrent probe connections allowed from one IP, over all probe ports.",
         int],
        ["web-port", None, 8443, "HTTPS port for the trusted peers list, /metrics and /health (0 = off).", _port],
        ["max-per-ip", None, 1000, "Concurrent signaling connections allowed from one IP.", int],
        ["register-timeout", None, 30.0, "Seconds a connection may stay unregistered.", float],
        [
            "max-unregistered", None, ConnectionLimits.max_unregistered,
            "Signaling connections not (yet) registered allowed at once, from all IPs (TLS handshakes included).",
            int,
        ],
        ["web-max-connections", None, WebLimits.max_connections, "HTTPS connections allowed at once.", int],
        [
            "tls-groups", None, None,
            "TLS key-exchange groups the signaling port offers, in OpenSSL's list syntax (default: OpenSSL's, "
            "with the X25519MLKEM768 hybrid; X25519:P-256 saves about 8 KiB per connection, see docs/performance.rst).",
        ],
        [
            "log-level", None, "info",
            "Lowest level of the server's events written to the log: debug, info, warn, error or critical.",
        ],
        ["relay-secret-file", None, None, "File whose first line is coturn's static-auth-secret (with --relay)."],
        ["relay-lifetime", None, 600, "Seconds a per-call TURN credential stays valid.", int],
        [
            "digest-algorithms", None, "MD5,SHA-256",
            "Digest challenges: the first is offered to every client, the others to clients that ask "
            "(ours ask for SHA-256; baresip and sipp get MD5 only).",
        ],
    ]

    optFlags = [
        [
            "reuse-port", None,
            "Set SO_REUSEPORT on the signaling and web ports, so several instances on one host (a cluster on "
            "one PostgreSQL) share them; give each its own --probe-ports (docs/cluster.rst).",
        ],
        ["no-relay-fallback", None, "Relay only pairs no direct technique joins, not pairs whose calls failed."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["cert-host"] = []
        self["relay"] = []
        self["relay-user"] = []
        self["relay-group"] = []

    def opt_relay(self, url: str) -> None:
        """A TURN server for calls no direct technique joins: turn:IP[:PORT] (repeatable; docs/relay.rst)."""
        try:
            self["relay"].append(parse_relay_url(url))
        except ValueError as exc:
            raise usage.UsageError(f"--relay: {exc}") from None

    def opt_relay_user(self, user: str) -> None:
        """A user who may relay (repeatable; with --relay-group, members of those groups may too)."""
        self["relay-user"].append(user)

    def opt_relay_group(self, group: str) -> None:
        """A group whose members may relay (repeatable; default: every user may)."""
        self["relay-group"].append(group)

    def opt_cert_host(self, name: str) -> None:
        """Extra DNS name or IP for the generated server certificate (repeatable)."""
        self["cert-host"].append(name)

    def postOptions(self) -> None:
        try:
            ports = [_port(p) for p in self["probe-ports"].split(",") if p.strip()]
        except ValueError as exc:
            raise usage.UsageError(f"--probe-ports: {exc}") from None
        if len(ports) < 2:
            raise usage.UsageError("--probe-ports needs at least two ports")
        self["probe-ports"] = ports
        try:
            self["interfaces"] = split_interfaces(self["interface"])
        except ValueError as exc:
            raise usage.UsageError(f"--interface: {exc}") from None
        if self["probe-alt-ip"]:
            try:
                ipaddress.ip_address(self["probe-alt-ip"])
            except ValueError:
                raise usage.UsageError("--probe-alt-ip must be an IP address") from None
        algorithms = tuple(a.strip().upper() for a in self["digest-algorithms"].split(",") if a.strip())
        if not algorithms or any(a not in ("MD5", "SHA-256") for a in algorithms):
            raise usage.UsageError("--digest-algorithms takes MD5 and/or SHA-256")
        self["digest-algorithms"] = algorithms
        if self["key"] and not self["cert"]:
            raise usage.UsageError("--key needs --cert")
        self["relay-settings"] = self._relay_settings()
        try:
            self["log-level"] = LogLevel.levelWithName(str(self["log-level"]).strip().lower())
        except InvalidLogLevelError:
            raise usage.UsageError("--log-level takes debug, info, warn, error or critical") from None

    def _relay_settings(self) -> RelaySettings | None:
        if not self["relay"]:
            if self["relay-secret-file"]:
                raise usage.UsageError("--relay-secret-file needs --relay")
            return None
        if not self["relay-secret-file"]:
            raise usage.UsageError("--relay needs --relay-secret-file")
        try:
            secret = read_secret(self["relay-secret-file"])
        except (OSError, ValueError) as exc:
            raise usage.UsageError(f"--relay-secret-file: {exc}") from None
        if self["relay-lifetime"] < 60:
            raise usage.UsageError("--relay-lifetime must be at least 60 seconds")
        return RelaySettings(
            servers=tuple(self["relay"]), secret=secret, lifetime=self["relay-lifetime"],
            users=frozenset(self["relay-user"]) if self["relay-user"] else None,
            groups=frozenset(self["relay-group"]) if self["relay-group"] else None,
            fallback=not self["no-relay-fallback"],
        )

    def settings(self) -> ServerSettings:
        interfaces: list[str] = self["interfaces"]
        probes = probe_endpoints(self["probe-ports"], interfaces, self["probe-alt-ip"])
        web = [_tcp(self["web-port"], i) for i in interfaces] if self["web-port"] else []
        return ServerSettings(
            domain=self["domain"],
            db_url=self["db"],
            certs_dir=Path(self["certs"]),
            cert=Path(self["cert"]) if self["cert"] else None,
            key=Path(self["key"]) if self["key"] else None,
            cert_hosts=[*self["cert-host"], *certificate_hosts(interfaces)],
            sip_endpoint=_tcp(self["port"], interfaces[0]),
            sip_extra_endpoints=[_tcp(self["port"], i) for i in interfaces[1:]],
            probe_endpoints=probes,
            probe_ports=list(self["probe-ports"]),
            probe_alt_ip=self["probe-alt-ip"],
            probe_max_per_ip=self["probe-max-per-ip"],
            probe_interface=None if interfaces[0].lower() in WILDCARDS else interfaces[0],
            probe_ips=certificate_hosts(interfaces),
            web_endpoint=web[0] if web else None,
            web_extra_endpoints=web[1:],
            digest_algorithms=self["digest-algorithms"],
            tls_groups=self["tls-groups"] or None,
            limits=ConnectionLimits(max_per_ip=self["max-per-ip"], register_timeout=self["register-timeout"],
                                    max_unregistered=self["max-unregistered"]),
            web_limits=WebLimits(max_connections=self["web-max-connections"]),
            advertise=self["advertise"] or None,
            reuse_port=bool(self["reuse-port"]),
            relay=self.get("relay-settings"),
        )


def makeService(config: Options, reactor: IServerReactor | None = None) -> IService:
    """Build the whole server; twistd passes only ``config``."""
    if reactor is None:
        from twisted.internet import reactor as installed

        # The installed reactor provides every interface IServerReactor names;
        # its stub type lists only the common ones (no IReactorFromThreads).
        reactor = cast(IServerReactor, installed)
    filter_log_level(config["log-level"])
    # twistd starts its log file observer after makeService, before the reactor runs.
    reactor.callWhenRunning(lambda: speed_up_log_files(global_observers()))
    tune_gc(reactor)
    settings, running = config.settings(), reactor
    # twistd's own options (``parent``): its status pipe and pid file.
    tell = twistd_teller(getattr(config, "parent", None))
    return StartGuard(settings.db_url, lambda: StuntServer(settings, running), tell)
