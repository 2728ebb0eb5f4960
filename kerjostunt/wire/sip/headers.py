"""Parsers for the structured SIP header values kerjostunt relies on.

Every ``parse_*`` function raises ``ValueError`` (and nothing else) on bad
input, so callers handling peer input need a single ``except ValueError``.
Header parameter values are kept raw (a quoted value keeps its quotes) so
that ``str(parse_x(text))`` reproduces the parameter exactly; parameter
names are lowercased because RFC 3261 compares them case-insensitively.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

__all__ = [
    "URI",
    "NameAddr",
    "Via",
    "parse_uri",
    "parse_name_addr",
    "parse_via",
    "parse_cseq",
    "parse_auth",
    "format_auth",
    "parse_expires",
    "split_params",
    "TOKEN_RE",
]

#: RFC 3261 25.1 ``token``.
TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-.]*[A-Za-z0-9.])?")
# Characters allowed in URI user parts and URI parameter values: unreserved,
# escapes and the user/param-unreserved marks.  Deliberately excludes
# whitespace, quotes, '<', '>', '@', ';', '?' and control characters.
_URI_CHARS_RE = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,:/\[\]]*")
_PARAM_VALUE_RE = re.compile(r"[A-Za-z0-9\-_.!~*'()%&+$:/\[\]]+")
_QUOTED_RE = re.compile(r'"(?:[^"\\\r\n]|\\[^\r\n])*"')
_MAX_CSEQ = 2**31


def _is_token(text: str) -> bool:
    return TOKEN_RE.fullmatch(text) is not None


def _check_host(host: str) -> str:
    """Validate a host (IPv6 without brackets); returns it unchanged."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 host: {host!r}") from None
        return host
    if not host or _HOSTNAME_RE.fullmatch(host) is None or len(host) > 255:
        raise ValueError(f"bad host: {host!r}")
    return host


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 reference: {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise ValueError(f"bad IPv6 reference: {text!r}")
        _check_host(host)
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
        _check_host(host)
    if not rest:
        return host, None
    if not rest.startswith(":") or not rest[1:].isdigit() or not rest[1:].isascii():
        raise ValueError(f"bad port in {text!r}")
    if len(rest) > 6 or int(rest[1:]) > 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, int(rest[1:])


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on ``sep`` except inside double quotes (honouring backslashes)."""
    parts: list[str] = []
    buf: list[str] = []
    in_quote = False
    escaped = False
    for ch in text:
        if in_quote:
            buf.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
            buf.append(ch)
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if in_quote:
        raise ValueError("unterminated quoted string")
    parts.append("".join(buf))
    return parts


def split_params(text: str) -> dict[str, str | None]:
    """Parse ``;a=1;b;c="x y"`` into ``{'a': '1', 'b': None, 'c': '"x y"'}``.

    Names are lowercased; values are kept raw (quoted strings keep their
    quotes). Duplicate names are rejected: an ambiguous ``tag`` or
    ``branch`` is a matching hazard.
    """
    params: dict[str, str | None] = {}
    text = text.strip()
    if not text:
        return params
    if not text.startswith(";"):
        raise ValueError(f"parameters must start with ';': {text!r}")
    for raw in _split_outside_quotes(text[1:], ";"):
        name, eq, value = raw.partition("=")
        name = name.strip()
        if not _is_token(name):
            raise ValueError(f"bad parameter name: {name!r}")
        key = name.lower()
        if key in params:
            raise ValueError(f"duplicate parameter: {key!r}")
        if eq:
            value = value.strip()
            if not (
                _PARAM_VALUE_RE.fullmatch(value) or _QUOTED_RE.fullmatch(value)
            ):
                raise ValueError(f"bad value for parameter {key!r}: {value!r}")
            params[key] = value
        else:
            params[key] = None
    return params


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@dataclass
class URI:
    """A ``sip:``/``sips:`` URI. IPv6 hosts are stored without brackets."""

    scheme: str
    user: str | None
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    password: str | None = None
    headers: str | None = None  # raw text after '?', without the '?'

    def __str__(self) -> str:
        userinfo = ""
        if self.user is not None:
            userinfo = self.user
            if self.password is not None:
                userinfo += ":" + self.password
            userinfo += "@"
        port = "" if self.port is None else f":{self.port}"
        hdrs = "" if self.headers is None else "?" + self.headers
        return (
            f"{self.scheme}:{userinfo}{_format_host(self.host)}{port}"
            f"{_format_params(self.params)}{hdrs}"
        )


def parse_uri(text: str) -> URI:
    """Parse a SIP or SIPS URI (RFC 3261 19.1); other schemes are refused."""
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise ValueError(f"not a sip/sips URI: {text!r}")
    rest, qmark, headers = rest.partition("?")
    if qmark and not _URI_CHARS_RE.fullmatch(headers):
        raise ValueError(f"bad URI headers: {headers!r}")
    user: str | None = None
    password: str | None = None
    if "@" in rest:
        userinfo, _, rest = rest.partition("@")
        user, pcolon, pw = userinfo.partition(":")
        if not user or not _URI_CHARS_RE.fullmatch(user) or "@" in rest:
            raise ValueError(f"bad user part in {text!r}")
        if pcolon:
            if not _URI_CHARS_RE.fullmatch(pw):
                raise ValueError(f"bad password in {text!r}")
            password = pw
    hostport, semi, params_text = rest.partition(";")
    host, port = _parse_hostport(hostport)
    params = split_params(semi + params_text)
    if any(v is not None and v.startswith('"') for v in params.values()):
        raise ValueError("quoted values are not allowed in URI parameters")
    return URI(scheme, user, host, port, params, password, headers if qmark else None)


def _parse_quoted(text: str) -> tuple[str, str]:
    """Parse a leading quoted-string; returns (unescaped content, rest)."""
    m = _QUOTED_RE.match(text)
    if m is None:
        raise ValueError(f"bad quoted string: {text!r}")
    return re.sub(r"\\(.)", r"\1", m.group()[1:-1]), text[m.end() :]


@dataclass
class NameAddr:
    """A From/To/Contact value: optional display name, URI, header params."""

    display: str | None
    uri: URI
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        prefix = ""
        if self.display is not None:
            escaped = self.display.replace("\\", "\\\\").replace('"', '\\"')
            prefix = f'"{escaped}" '
        return f"{prefix}<{self.uri}>{_format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr:
    """Parse ``"Bob" <sips:bob@x>;tag=1``, ``<sips:bob@x>`` or ``sips:bob@x;tag=1``.

    In the bare form everything after the first ';' is a header parameter,
    as RFC 3261 20.10 requires.
    """
    if "\r" in text or "\n" in text:
        raise ValueError("line break in name-addr")
    text = text.strip()
    display: str | None = None
    if text.startswith('"'):
        display, text = _parse_quoted(text)
        text = text.lstrip()
        if not text.startswith("<"):
            raise ValueError("display name without <URI>")
    if "<" in text:
        before, _, after = text.partition("<")
        before = before.strip()
        if before:
            if display is not None or not all(_is_token(w) for w in before.split()):
                raise ValueError(f"bad display name: {before!r}")
            display = " ".join(before.split())
        uri_text, gt, rest = after.partition(">")
        if not gt:
            raise ValueError("missing '>'")
        uri = parse_uri(uri_text)
        return NameAddr(display, uri, split_params(rest))
    uri_text, semi, rest = text.partition(";")
    if "?" in uri_text or "," in uri_text:
        raise ValueError("a URI with '?' or ',' must be enclosed in <>")
    return NameAddr(None, parse_uri(uri_text), split_params(semi + rest))


@dataclass
class Via:
    """One Via value (``SIP/2.0/TLS host:port;branch=...;rport;received=...``)."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The filled-in rport, or None (also when only requested: ``;rport``)."""
        value = self.params.get("rport")
        return int(value) if value is not None and value.isdigit() else None

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return (
            f"SIP/2.0/{self.transport} {_format_host(self.host)}{port}"
            f"{_format_params(self.params)}"
        )


_VIA_RE = re.compile(
    r"\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s+([^;\s]+)\s*(;.*)?",
    re.IGNORECASE | re.DOTALL,
)


def parse_via(text: str) -> Via:
    """Parse a single Via value (use ``Headers.get_all('Via')`` to split)."""
    m = _VIA_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad Via: {text!r}")
    host, port = _parse_hostport(m.group(2))
    params = split_params(m.group(3) or "")
    for key in ("received", "rport"):
        value = params.get(key)
        if value is not None and value.startswith('"'):
            raise ValueError(f"quoted {key} in Via")
    return Via(m.group(1).upper(), host, port, params)


def parse_cseq(text: str) -> tuple[int, str]:
    """``'1 REGISTER'`` -> ``(1, 'REGISTER')``; the number is below 2**31."""
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f"bad CSeq: {text!r}")
    number, method = parts
    if not number.isascii() or not number.isdigit() or len(number) > 10:
        raise ValueError(f"bad CSeq number: {number!r}")
    if int(number) >= _MAX_CSEQ:
        raise ValueError(f"CSeq number too large: {number}")
    if not _is_token(method):
        raise ValueError(f"bad CSeq method: {method!r}")
    return int(number), method


def parse_auth(text: str) -> tuple[str, dict[str, str]]:
    """Parse a challenge or credentials value: ``Digest realm="x", nonce="y"``.

    Returns the scheme as sent and the parameters with lowercased names
    and unquoted values. Duplicate parameters are rejected.
    """
    if "\r" in text or "\n" in text:
        raise ValueError("line break in auth header")
    text = text.strip()
    m = TOKEN_RE.match(text)
    if m is None:
        raise ValueError(f"bad auth scheme: {text!r}")
    scheme, rest = m.group(), text[m.end() :]
    if rest and not rest[0].isspace():
        raise ValueError(f"bad auth scheme: {text!r}")
    params: dict[str, str] = {}
    rest = rest.strip()
    if not rest:
        return scheme, params
    for item in _split_outside_quotes(rest, ","):
        item = item.strip()
        if not item:
            continue  # RFC 7235 allows empty list elements
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not _is_token(name):
            raise ValueError(f"bad auth parameter: {item!r}")
        if value.startswith('"'):
            value, tail = _parse_quoted(value)
            if tail.strip():
                raise ValueError(f"junk after quoted value: {item!r}")
        elif not _is_token(value):
            raise ValueError(f"bad auth parameter value: {item!r}")
        key = name.lower()
        if key in params:
            raise ValueError(f"duplicate auth parameter: {key!r}")
        params[key] = value
    return scheme, params


_ALWAYS_QUOTED = {"realm", "nonce", "opaque", "uri", "response", "username", "cnonce", "domain"}
_NEVER_QUOTED = {"algorithm", "nc", "stale"}


def format_auth(scheme: str, params: dict[str, str], challenge: bool = True) -> str:
    """Format a WWW-Authenticate (``challenge=True``) or Authorization value.

    ``qop`` is quoted in challenges (a list of options) and bare in
    credentials (the chosen one), as RFC 3261 25.1 has it. Unknown
    parameters are quoted unless they are tokens.
    """
    if not _is_token(scheme):
        raise ValueError(f"bad auth scheme: {scheme!r}")
    out = []
    for name, value in params.items():
        if not _is_token(name):
            raise ValueError(f"bad auth parameter name: {name!r}")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"line break in auth parameter {name!r}")
        key = name.lower()
        if key == "qop":
            quote = challenge
        elif key in _ALWAYS_QUOTED:
            quote = True
        elif key in _NEVER_QUOTED:
            quote = False
        else:
            quote = not _is_token(value)
        if not quote and not _is_token(value):
            raise ValueError(f"value of {name!r} must be a token: {value!r}")
        if quote:
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{name}={value}")
    return f"{scheme} " + ", ".join(out) if out else scheme


def parse_expires(text: str) -> int:
    """Expires header or parameter: delta-seconds, capped at 2**32-1."""
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"bad Expires: {text!r}")
    if len(text) > 10:
        return 2**32 - 1
    return min(int(text), 2**32 - 1)
