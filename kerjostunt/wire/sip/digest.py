"""HTTP Digest arithmetic for SIP (RFC 3261 22, RFC 2617, RFC 8760).

Only the math and header building live here; nonce management and the
password store belong to the server's auth module. The server keeps HA1
values only, one per algorithm, which is why ``ha1`` is separate.
"""

from __future__ import annotations

import hashlib

from kerjostunt.wire.sip.headers import format_auth, parse_auth

__all__ = [
    "ALGORITHMS",
    "normalize_algorithm",
    "ha1",
    "digest_response",
    "authorization",
    "choose_challenge",
]

#: Supported algorithms, strongest first (RFC 8760 order of preference).
ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

_HASHES = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}


def normalize_algorithm(algorithm: str | None) -> str:
    """Canonical algorithm name; a missing one means MD5 (RFC 2617)."""
    if algorithm is None:
        return "MD5"
    name = algorithm.strip().upper()
    if name not in _HASHES:
        raise ValueError(f"unsupported digest algorithm: {algorithm!r}")
    return name


def _h(algorithm: str, text: str) -> str:
    return _HASHES[normalize_algorithm(algorithm)](text.encode("utf-8")).hexdigest()


def ha1(username: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """H(username ":" realm ":" password), hex."""
    return _h(algorithm, f"{username}:{realm}:{password}")


def digest_response(
    ha1: str,
    method: str,
    uri: str,
    nonce: str,
    algorithm: str = "MD5",
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The request-digest (RFC 2617 3.2.2.1); ``qop`` is None or "auth"."""
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop is None:
        return _h(algorithm, f"{ha1}:{nonce}:{ha2}")
    if qop != "auth":
        raise ValueError(f"unsupported qop: {qop!r}")
    if nc is None or cnonce is None:
        raise ValueError("qop=auth needs nc and cnonce")
    return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def authorization(
    challenge: dict[str, str],
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str,
    nc: int = 1,
) -> str:
    """Client side: the full ``Digest ...`` Authorization value answering a
    parsed WWW-Authenticate challenge (qop=auth when offered)."""
    realm = challenge.get("realm")
    nonce = challenge.get("nonce")
    if realm is None or nonce is None:
        raise ValueError("challenge lacks realm or nonce")
    algorithm = normalize_algorithm(challenge.get("algorithm"))
    offered = [q.strip() for q in challenge.get("qop", "").split(",")]
    qop = "auth" if "auth" in offered else None
    nc_text = f"{nc:08x}" if qop else None
    response = digest_response(
        ha1(username, realm, password, algorithm),
        method,
        uri,
        nonce,
        algorithm,
        qop,
        nc_text,
        cnonce if qop else None,
    )
    params = {
        "username": username,
        "realm": realm,
        "nonce": nonce,
        "uri": uri,
        "response": response,
        "algorithm": algorithm,
    }
    if qop and nc_text:
        params.update({"cnonce": cnonce, "qop": qop, "nc": nc_text})
    if "opaque" in challenge:
        params["opaque"] = challenge["opaque"]
    return format_auth("Digest", params, challenge=False)


def choose_challenge(values: list[str]) -> dict[str, str]:
    """Pick the strongest usable Digest challenge among WWW-Authenticate
    values (a server offers SHA-256 and MD5 side by side, RFC 8760 2.4)."""
    best: tuple[int, dict[str, str]] | None = None
    for value in values:
        try:
            scheme, params = parse_auth(value)
            algorithm = normalize_algorithm(params.get("algorithm"))
        except ValueError:
            continue
        if scheme.lower() != "digest" or "realm" not in params or "nonce" not in params:
            continue
        rank = ALGORITHMS.index(algorithm)
        if best is None or rank < best[0]:
            best = (rank, params)
    if best is None:
        raise ValueError("no usable Digest challenge")
    return best[1]
