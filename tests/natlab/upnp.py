"""miniupnpd on a lab NAT box (issue 17): the router grants port mappings.

``start(lab, "a", directory, pcp=True, upnp=True)`` after ``lab.build()``
moves NAT box ``a`` to a public-looking address (``public_ip``) and runs miniupnpd
(Debian's package, nftables backend) runs in NAT box ``a``'s namespace,
answering PCP and NAT-PMP (one switch in miniupnpd: ``enable_natpmp``) and
UPnP-IGD on the LAN side. Its rules live in tables of their own
(``inet miniupnpd`` for the forward accepts, ``inet miniupnpd_nat`` for the
DNAT), and the lab's forward chain accepts DNAT'ed connections
(``ct status dnat``): everything else arriving on the WAN side is still
dropped, so only a granted mapping opens the NAT. The lab's teardown stops
the daemon with the namespace.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

TABLES = """\
table inet miniupnpd {
    chain forward {
        type filter hook forward priority -1; policy accept;
        jump miniupnpd
    }
    chain miniupnpd {
    }
}
table inet miniupnpd_nat {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        jump postrouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
"""


def unavailable() -> str | None:
    """Why miniupnpd cannot run here (a skip reason), or None."""
    if shutil.which("miniupnpd") is None:
        return "miniupnpd is not installed (Debian package miniupnpd; .ci/run installs it)"
    return None


def public_ip(lab: object, name: str) -> str:
    """The routable-looking address ``readdress`` gives NAT box ``name``.

    miniupnpd refuses to map on a reserved address ("not public routable"),
    and the lab's 198.18.0.0/15 is one (RFC 2544); 11.0.0.0/8 is not, and
    inside the lab's namespaces it reaches nothing outside.
    """
    return f"11.0.{list(lab.nats).index(name) + 1}.2"  # type: ignore[attr-defined]


def readdress(lab: object, name: str) -> str:
    """Move NAT box ``name``'s WAN side to ``public_ip`` (before any traffic)."""
    k = list(lab.nats).index(name) + 1  # type: ignore[attr-defined]
    nat, core = lab.nats[name], lab.core  # type: ignore[attr-defined]
    new = public_ip(lab, name)
    for host, argv in (
        (core, ["ip", "addr", "add", f"11.0.{k}.1/24", "dev", f"n{name}"]),
        (nat, ["ip", "addr", "del", f"{nat.ip}/24", "dev", "wan"]),
        (nat, ["ip", "addr", "add", f"{new}/24", "dev", "wan"]),
        (nat, ["ip", "route", "add", "default", "via", f"11.0.{k}.1"]),
    ):
        done = lab.run(host, argv)  # type: ignore[attr-defined]
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return new


def config(lab: object, name: str, *, pcp: bool, upnp: bool) -> str:
    k = list(lab.nats).index(name) + 1  # type: ignore[attr-defined]
    return "\n".join([
        "ext_ifname=wan",
        f"ext_ip={public_ip(lab, name)}",
        "listening_ip=lan",
        "http_port=0",
        f"enable_natpmp={'yes' if pcp else 'no'}",
        f"enable_upnp={'yes' if upnp else 'no'}",
        "secure_mode=yes",
        "system_uptime=no",
        "min_lifetime=60",
        "max_lifetime=86400",
        "uuid=3f4e7a6c-1b2d-4c5e-8f90-a1b2c3d4e5f6",
        "upnp_table_name=miniupnpd",
        "upnp_nat_table_name=miniupnpd_nat",
        "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"allow 1024-65535 10.{k}.0.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])


def start(lab: object, name: str, directory: Path, *, pcp: bool = True, upnp: bool = True) -> subprocess.Popen:
    """Run miniupnpd on NAT box ``name`` (moved to ``public_ip`` first); returns once it listens."""
    readdress(lab, name)
    nat = lab.nats[name]  # type: ignore[attr-defined]
    run = lab.run  # type: ignore[attr-defined]
    for argv in (["nft", "-f", "-"],):
        done = run(nat, argv, input=TABLES)
        if done.returncode != 0:
            raise RuntimeError(f"miniupnpd tables: {done.stderr.strip()}")
    done = run(nat, ["nft", "insert", "rule", "inet", "natlab_filter", "forward", "ct", "status", "dnat", "accept"])
    if done.returncode != 0:
        raise RuntimeError(f"forward rule: {done.stderr.strip()}")
    conf = directory / f"miniupnpd-{name}.conf"
    conf.write_text(config(lab, name, pcp=pcp, upnp=upnp))
    log = open(directory / f"miniupnpd-{name}.log", "w")  # noqa: SIM115  # the process's, closed at teardown
    proc = lab.popen(nat, ["miniupnpd", "-d", "-f", str(conf), "-P", str(directory / f"miniupnpd-{name}.pid")],  # type: ignore[attr-defined]
                     stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"miniupnpd exited {proc.returncode}: {(directory / f'miniupnpd-{name}.log').read_text()}")
        listening = run(nat, ["ss", "-lun"]).stdout
        if ":5351" in listening or (not pcp and ":1900" in listening):
            return proc
        time.sleep(0.1)
    raise RuntimeError("miniupnpd did not start listening")


def mappings(lab: object, name: str) -> str:
    """The DNAT rules miniupnpd holds now (empty once every mapping is deleted)."""
    nat = lab.nats[name]  # type: ignore[attr-defined]
    out = lab.run(nat, ["nft", "list", "chain", "inet", "miniupnpd_nat", "prerouting_miniupnpd"]).stdout  # type: ignore[attr-defined]
    return "\n".join(line.strip() for line in out.splitlines() if "dnat" in line)
