"""SIP message model: headers multi-map, requests, responses, serialization.

Pure Python on purpose (no Twisted, no SQL) so that the server, the client
and the tests all share one definition of what goes on the wire.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kerjostunt.wire.sip.headers import TOKEN_RE, parse_cseq, parse_name_addr

__all__ = [
    "COMPACT_FORMS",
    "REASONS",
    "MULTI_VALUE_HEADERS",
    "Headers",
    "Request",
    "Response",
    "make_response",
    "stamp_source",
    "canonical_name",
    "split_header_values",
]

#: RFC 3261 7.3.3 (and extensions) compact header names.
COMPACT_FORMS: dict[str, str] = {
    "v": "Via",
    "f": "From",
    "t": "To",
    "i": "Call-ID",
    "m": "Contact",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "s": "Subject",
    "e": "Content-Encoding",
    "o": "Event",
    "u": "Allow-Events",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
}

#: Reason phrases: every code RFC 3261 21 defines, plus a few extensions.
REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    429: "Too Many Requests",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

#: Headers whose comma-separated values ``Headers.get_all`` splits.
MULTI_VALUE_HEADERS = frozenset(
    {
        "Via",
        "Contact",
        "Route",
        "Record-Route",
        "Allow",
        "Supported",
        "Require",
        "Proxy-Require",
        "Unsupported",
        "Allow-Events",
    }
)

_SPECIAL_NAMES = {
    n.lower(): n
    for n in (
        "Call-ID",
        "CSeq",
        "WWW-Authenticate",
        "MIME-Version",
        "RAck",
        "RSeq",
        "SIP-ETag",
        "SIP-If-Match",
        "Authentication-Info",
    )
}


@functools.lru_cache(maxsize=512)
def canonical_name(name: str) -> str:
    """Canonical spelling of a header name (compact forms expanded)."""
    lower = name.lower()
    if lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    if lower in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[lower]
    return "-".join(part.capitalize() for part in lower.split("-"))


def split_header_values(value: str) -> list[str]:
    """Split on commas that are outside quotes and outside ``<...>``."""
    parts: list[str] = []
    buf: list[str] = []
    in_quote = escaped = False
    depth = 0
    for ch in value:
        if in_quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif ch == "," and not depth:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _check_field(name: str, value: str) -> str:
    if TOKEN_RE.fullmatch(name) is None:
        raise ValueError(f"bad header name: {name!r}")
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"line break or NUL in header {name!r}")
    return canonical_name(name)


class Headers:
    """Ordered, case-insensitive multi-map of header fields.

    Names are canonicalized on insertion (compact forms expanded, e.g.
    'call-id'/'i' -> 'Call-ID') so lookups and serialization agree. Values
    containing CR, LF or NUL are refused: they would let a value forge
    further header lines.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = []
        for name, value in items:
            self.add(name, value)

    @classmethod
    def trusted(cls, items: list[tuple[str, str]]) -> Headers:
        """Headers from fields already checked and canonical (the parser's, another Headers' own).

        Skips ``add``'s per-field checks, which are most of the cost of
        parsing a message and of building a response from a request.
        """
        new = cls()
        new._items = items
        return new

    def raw_items(self) -> list[tuple[str, str]]:
        """The fields themselves, not a copy: for reading in hot paths, never to modify."""
        return self._items

    def get(self, name: str, default: str | None = None) -> str | None:
        key = canonical_name(name)
        for n, v in self._items:
            if n == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        key = canonical_name(name)
        values = [v for n, v in self._items if n == key]
        if key in MULTI_VALUE_HEADERS:
            return [part for v in values for part in split_header_values(v)]
        return values

    def add(self, name: str, value: str) -> None:
        self._items.append((_check_field(name, value), value))

    def prepend(self, name: str, value: str) -> None:
        key = _check_field(name, value)
        for i, (n, _) in enumerate(self._items):
            if n == key:
                self._items.insert(i, (key, value))
                return
        self._items.insert(0, (key, value))

    def set(self, name: str, value: str) -> None:
        key = _check_field(name, value)
        for i, (n, _) in enumerate(self._items):
            if n == key:
                self._items[i] = (key, value)
                self._items[i + 1 :] = [
                    item for item in self._items[i + 1 :] if item[0] != key
                ]
                return
        self._items.append((key, value))

    def replace_first(self, name: str, value: str) -> None:
        """The first field of ``name`` gets ``value``, unchecked (the caller built it from checked text);
        the others stay. Nothing happens without one."""
        key = canonical_name(name)
        for i, (n, _) in enumerate(self._items):
            if n == key:
                self._items[i] = (key, value)
                return

    def remove(self, name: str) -> None:
        key = canonical_name(name)
        self._items = [item for item in self._items if item[0] != key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical_name(name)
        return any(n == key for n, _ in self._items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def copy(self) -> Headers:
        new = Headers()
        new._items = list(self._items)
        return new

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


_BAD_URI_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")
_BAD_REASON_CHAR = re.compile(r"[\r\n\x00]")
_COPIED = ("From", "To", "Call-ID", "CSeq")


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    """Content-Length always reflects the body: it replaces any stale value
    in place, or is appended after the other headers."""
    lines = [start_line]
    length_written = False
    for name, value in headers.raw_items():
        if name == "Content-Length":
            if not length_written:
                lines.append(f"Content-Length: {len(body)}")
                length_written = True
            continue
        lines.append(f"{name}: {value}")
    if not length_written:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + bytes(body)


def _call_id(headers: Headers) -> str | None:
    return headers.get("Call-ID")


def _cseq(headers: Headers) -> tuple[int, str] | None:
    value = headers.get("CSeq")
    if value is None:
        return None
    try:
        return parse_cseq(value)
    except ValueError:
        return None


@dataclass
class Request:
    method: str
    uri: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        if TOKEN_RE.fullmatch(self.method) is None:
            raise ValueError(f"bad method: {self.method!r}")
        if not self.uri or _BAD_URI_CHAR.search(self.uri):
            raise ValueError(f"bad Request-URI: {self.uri!r}")
        return _serialize(f"{self.method} {self.uri} SIP/2.0", self.headers, self.body)

    @property
    def call_id(self) -> str | None:
        return _call_id(self.headers)

    @property
    def cseq(self) -> tuple[int, str] | None:
        return _cseq(self.headers)


@dataclass
class Response:
    code: int
    reason: str
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def to_bytes(self) -> bytes:
        if not 100 <= self.code <= 699:
            raise ValueError(f"bad status code: {self.code!r}")
        if _BAD_REASON_CHAR.search(self.reason):
            raise ValueError(f"bad reason phrase: {self.reason!r}")
        return _serialize(f"SIP/2.0 {self.code} {self.reason}", self.headers, self.body)

    @property
    def call_id(self) -> str | None:
        return _call_id(self.headers)

    @property
    def cseq(self) -> tuple[int, str] | None:
        return _cseq(self.headers)


def _has_tag(to_value: str) -> bool:
    if "tag" not in to_value.lower():
        return False  # no parse needed: neither check below can find one
    try:
        return parse_name_addr(to_value).tag is not None
    except ValueError:
        # Unparseable To: fall back to a textual check outside <...>.
        outside = re.sub(r"<[^>]*>", "", to_value)
        return re.search(r";\s*tag\s*=", outside, re.IGNORECASE) is not None


def make_response(
    request: Request,
    code: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
) -> Response:
    """Build a response per RFC 3261 8.2.6: Via (all, in order), From, To
    (with ``;tag=to_tag`` added unless it already has one), Call-ID, CSeq."""
    if reason is None:
        reason = REASONS.get(code, "Unknown")
    # One pass over the request's fields, copied as they are (a Headers
    # checked them when they went in); only an added tag is checked again.
    items: list[tuple[str, str]] = []
    copied: dict[str, str] = {}
    for item in request.headers.raw_items():
        name = item[0]
        if name == "Via":
            items.append(item)
        elif name in _COPIED and name not in copied:
            copied[name] = item[1]
    for name in _COPIED:
        value = copied.get(name)
        if value is None:
            continue
        if name == "To" and to_tag is not None and not _has_tag(value):
            value = f"{value};tag={to_tag}"
            _check_field(name, value)
        items.append((name, value))
    return Response(code, reason, Headers.trusted(items))


def stamp_source(response: Response, host: str, port: int) -> None:
    """Say in the top Via where the request came from: RFC 3261 18.2.1, RFC 3581 4.

    ``received=host`` when the sent-by host is not the source address, and
    ``rport=port`` when the Via asks with a bare ``rport``. Every answer
    gets this, not only REGISTER's 200 (whose Via is stamped in full before
    it gets here, so it is left as it is). Text work on the first Via
    line's first value, not a parse: it runs for every response sent.
    """
    line = response.headers.get("Via")
    if line is None:
        return
    first, comma, rest = line.partition(",")
    sent_by = _SENT_BY.match(first)
    if sent_by is None:
        return
    stamped = _BARE_RPORT.sub(f";rport={port}", first, count=1)
    if sent_by.group(1).strip("[]").lower() != host.lower() and ";received=" not in first.lower():
        stamped += f";received={host}"
    if stamped != first:
        response.headers.replace_first("Via", stamped + comma + rest)  # our digits, the socket's address


_SENT_BY = re.compile(r"SIP\s*/\s*2\.0\s*/\s*[A-Za-z0-9.!%*_+`'~-]+\s+(\[[^\]]*\]|[^\s:;,]+)", re.IGNORECASE)
_BARE_RPORT = re.compile(r";\s*rport\s*(?=;|$)", re.IGNORECASE)
