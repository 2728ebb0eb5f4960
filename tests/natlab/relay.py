"""coturn in the lab's server namespace, for the relay (docs/relay.rst, docs/nat-lab.rst).

``start_coturn(scenario, directory)`` writes a config (tests/turnserver.py's,
listening and relaying on the server's first address, port ``TURN_PORT``)
and the secret file, starts ``turnserver`` in the server namespace, waits
until it accepts TCP connections, and fires with the extra arguments for
``Scenario.start_server`` (``--relay ... --relay-secret-file ...``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer

from tests.natlab.scenario import _WAIT_LISTENING, Scenario
from tests.turnserver import TURNSERVER, config_text

#: coturn's port in the server namespace (3478/3479 are the probe ports there)
TURN_PORT = 3490
SECRET = b"lab-relay-secret"


class CoturnFailed(Exception):
    """coturn did not start listening."""


@defer.inlineCallbacks
def start_coturn(sc: Scenario, directory: Path, extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    s = sc.lab.server
    directory = directory.resolve()  # the lab's processes run in another directory
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "turnserver.conf"
    conf.write_text(config_text(listen=s.ip, port=TURN_PORT, relay=s.ip, secret=SECRET,
                                directory=str(directory), extra=extra))
    secret_file = directory / "relay-secret"
    secret_file.write_bytes(SECRET + b"\n")
    os.chmod(secret_file, 0o600)
    sc.spawn("server", [TURNSERVER, "-c", str(conf)], name="coturn", limit=3600)
    wait = sc.spawn("server", [sys.executable, "-c", _WAIT_LISTENING, "20", f"{s.ip}:{TURN_PORT}"],
                    name="wait-coturn", limit=30)
    code = yield wait.ended
    if code != 0:
        raise CoturnFailed("coturn did not listen\n" + sc.transcript())
    return ("--relay", f"turn:{s.ip}:{TURN_PORT}", "--relay-secret-file", str(secret_file))
