"""Why a call's race failed, in words a user can act on.

The race (``race.py``) notes each technique it started and how it ended;
the outcome INFO carries that list to the server (``tried=``, shown by
``kerjostunt attempts``), and the ``failed:`` line of the commands ends with
the technique that came closest and what to try. Pure: no Twisted.
"""

from __future__ import annotations

from collections.abc import Sequence

from kerjostunt.wire.kerjo import NO_TECHNIQUE_REASON
from kerjostunt.wire.prediction import RANDOM, NATDescription, no_technique

__all__ = ["word_of", "closest", "advice", "explain", "refusal_text"]

#: how close each result came to a connection, closest first
_CLOSENESS = ("connected", "handshake", "timeout", "reset", "refused", "unreachable", "failed", "cancelled",
              "skipped")


def refusal_text(code: int, reason: str) -> str:
    """A refused INVITE's ``failed:`` text: a 488 (no technique joins the NATs) says what would."""
    text = f"{code} {reason}"
    if code == 488 and reason.startswith(NO_TECHNIQUE_REASON):
        return f"{text}: a relay is needed"
    return text


def word_of(reason: str) -> str:
    """A failure's text as one of ``kerjo.TRIED_RESULTS``."""
    text = reason.lower()
    if "not tried" in text:
        return "skipped"
    if "handshake" in text:
        return "handshake"
    if "refused" in text:
        return "refused"
    if "unreachable" in text or "no route" in text:
        return "unreachable"
    if "reset" in text:
        return "reset"
    if "timed out" in text or "timeout" in text or "no connection within" in text or "no answer" in text:
        return "timeout"
    return "failed"


def closest(tried: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The attempt that got furthest (a handshake that failed beats a timeout beats a RST...)."""
    if not tried:
        return None
    return min(tried, key=lambda entry: _CLOSENESS.index(entry[1]) if entry[1] in _CLOSENESS else 99)


def advice(tried: Sequence[tuple[str, str]], own: NATDescription | None, peer: NATDescription | None) -> str:
    """What to try, from the closest attempt and the two NATs."""
    hopeless = no_technique(own, peer)
    if hopeless:
        return f"{hopeless}: a relay is needed"
    best = closest(tried)
    if best is None:
        return "nothing could be dialed: run `kerjostunt netcheck` on both sides"
    technique, result = best
    if result == "handshake":
        return "a connection came up but failed the peer handshake (another program on that port?)"
    if technique in ("punch", "birthday") and result == "timeout":
        if own is not None and own.allocation == RANDOM or peer is not None and peer.allocation == RANDOM:
            return "a NAT allocates ports at random and the prediction missed: try again, or use a relay"
        return "the punch got no answer: run `kerjostunt netcheck` on both sides (a NAT that drops SYNs and " \
               "moves ports fast needs a relay)"
    if technique == "public" and result in ("refused", "reset", "timeout"):
        return "the peer's public port is closed (a NAT or firewall in front of it): its NAT must be punched"
    return "run `kerjostunt netcheck` on both sides"


def explain(tried: Sequence[tuple[str, str]], own: NATDescription | None, peer: NATDescription | None) -> str:
    """``closest: punch (timeout); <advice>`` (or only the advice when nothing was tried)."""
    best = closest(tried)
    head = f"closest: {best[0]} ({best[1]}); " if best is not None else ""
    return head + advice(tried, own, peer)
