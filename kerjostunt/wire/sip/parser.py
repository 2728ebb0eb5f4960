"""Incremental SIP stream framing and parsing with hard limits.

The signaling connection is a byte stream (TLS), so messages are framed by
their header section and Content-Length (RFC 3261 18.3), and RFC 5626 CRLF
keepalives may sit between them. Every input a peer can send ends in a
message, a keepalive, "need more bytes" or a ``SIPParseError`` carrying the
status code to answer with; nothing else may escape. docs/sip-syntax.rst
states the exact rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kerjostunt.wire.sip.headers import TOKEN_RE, parse_cseq
from kerjostunt.wire.sip.message import Headers, Request, Response, canonical_name

__all__ = [
    "Limits",
    "SIPParseError",
    "KeepAlivePing",
    "KeepAlivePong",
    "PING",
    "PONG",
    "StreamParser",
    "parse_message",
    "REQUIRED_HEADERS",
]

#: Headers every request and response must carry (RFC 3261 8.1.1).
REQUIRED_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq")
_SINGLE_HEADERS = ("From", "To", "Call-ID", "CSeq", "Max-Forwards")

_CTL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: the same check on a whole header section: a CR is allowed only before its LF
_CTL_TEXT_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_HEADER_RE = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*:[ \t]*(.*)", re.DOTALL)
_VERSION_RE = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
_STATUS_RE = re.compile(r"(SIP/[0-9]+\.[0-9]+) ([0-9]{3})(?: (.*))?", re.IGNORECASE | re.DOTALL)
_URI_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:.+", re.DOTALL)
_MAX_CL_DIGITS = 12


@dataclass(frozen=True)
class Limits:
    """Hard bounds on what one peer can make us buffer or parse."""

    #: whole message, header section plus body -> 513, fatal
    max_message_bytes: int = 65536
    #: start line + header lines + terminating empty line -> 513, fatal
    max_header_bytes: int = 16384
    #: one line, without its CRLF -> 513, fatal
    max_line_bytes: int = 4096
    #: header fields (continuation lines do not count) -> 513, fatal
    max_headers: int = 64
    #: Content-Length above this -> 413, fatal
    max_body_bytes: int = 32768


class SIPParseError(Exception):
    """Bad input, with the SIP status to answer it with.

    ``fatal`` means the stream can no longer be framed (or a limit was hit):
    answer if possible, then close. Otherwise the offending message was
    consumed whole and the stream goes on. ``message`` is the message as far
    as it was parsed (start line and headers), so the answer can copy Via,
    From, To, Call-ID and CSeq; None when the header section was unusable.
    ``preceding`` lists what ``StreamParser.feed`` had already completed in
    the same call before hitting this error; handle those first.
    """

    def __init__(
        self,
        code: int,
        reason: str,
        fatal: bool = False,
        message: Request | Response | None = None,
    ) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.fatal = fatal
        self.message = message
        self.preceding: list[Request | Response | KeepAlivePing | KeepAlivePong] = []

    def __str__(self) -> str:
        return f"{self.code} {self.reason}" + (" (fatal)" if self.fatal else "")


class KeepAlivePing:
    """CRLFCRLF between messages (RFC 5626 3.5.1); answer with a CRLF."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PING"


class KeepAlivePong:
    """A lone CRLF between messages: the answer to our ping."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PONG"


PING = KeepAlivePing()
PONG = KeepAlivePong()

_START = object()


def _fatal(code: int, reason: str, message: Request | Response | None = None) -> SIPParseError:
    return SIPParseError(code, reason, fatal=True, message=message)


def _split_lines(head: bytes) -> list[str]:
    """Decode the header section and split it into lines (without the
    terminating empty line); CRLF and bare LF both end a line."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise _fatal(400, "Bad Request: header section is not UTF-8") from None
    # One search over the section instead of one per line: a CR not before
    # its LF is what a line keeps after its line ending is stripped.
    if _CTL_TEXT_RE.search(text):
        raise _fatal(400, "Bad Request: control character in header section")
    lines = text.split("\n")
    # text ends with the empty line's LF: drop the empty line and the "" after it
    del lines[-2:]
    return [line[:-1] if line[-1:] == "\r" else line for line in lines]


def _parse_start_line(line: str) -> tuple[Request | Response, str | None]:
    """Returns the bare message and the SIP-Version if it is not 2.0."""
    if line[:4].upper() == "SIP/":
        m = _STATUS_RE.fullmatch(line)
        if m is None:
            raise _fatal(400, "Bad Request: malformed status line")
        code = int(m.group(2))
        if not 100 <= code <= 699:
            raise _fatal(400, "Bad Request: status code out of range")
        version = None if m.group(1).upper() == "SIP/2.0" else m.group(1)
        return Response(code, m.group(3) or "", Headers()), version
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _fatal(400, "Bad Request: malformed request line")
    method, uri, version = parts
    if TOKEN_RE.fullmatch(method) is None:
        raise _fatal(400, "Bad Request: malformed method")
    if version.upper() == "SIP/2.0":
        return Request(method, uri, Headers()), None
    if _VERSION_RE.fullmatch(version):
        return Request(method, uri, Headers()), version
    raise _fatal(400, "Bad Request: malformed SIP-Version")


def _parse_header_lines(lines: list[str]) -> Headers:
    """Header fields, names canonical; folded lines joined.

    The fields go into the ``Headers`` without ``Headers.add``'s checks,
    which would only repeat what was checked here: ``_HEADER_RE`` admits
    token names only, and ``_split_lines`` refused CR, LF and NUL.
    """
    items: list[tuple[str, str]] = []
    match = _HEADER_RE.fullmatch
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not items:
                raise _fatal(400, "Bad Request: continuation line before any header")
            folded = line.strip(" \t")
            if folded:
                name, value = items[-1]
                items[-1] = (name, (value + " " + folded).strip(" \t"))
            continue
        m = match(line)
        if m is None:
            raise _fatal(400, "Bad Request: malformed header line")
        name, value = m.groups()
        items.append((canonical_name(name), value.rstrip(" \t")))
    return Headers.trusted(items)


def _content_length(message: Request | Response) -> int:
    values = {v.strip() for n, v in message.headers.raw_items() if n == "Content-Length"}
    if not values:
        return 0  # lenient: RFC 3261 18.3 says MUST, we read a missing one as 0
    lengths = set()
    for value in values:
        if not (value.isascii() and value.isdigit()):
            raise _fatal(400, "Bad Request: invalid Content-Length", message)
        value = value.lstrip("0") or "0"
        lengths.add(int(value) if len(value) <= _MAX_CL_DIGITS else 10**_MAX_CL_DIGITS)
    if len(lengths) > 1:
        raise _fatal(400, "Bad Request: conflicting Content-Length", message)
    return lengths.pop()


def _semantic_error(message: Request | Response, version: str | None) -> SIPParseError | None:
    """Problems that do not affect framing: reported, then the stream goes on."""
    if version is not None:
        return SIPParseError(505, "Version Not Supported", message=message)
    if isinstance(message, Request) and not _URI_SCHEME_RE.fullmatch(message.uri):
        return SIPParseError(400, "Bad Request: malformed Request-URI", message=message)
    counts: dict[str, int] = {}
    cseq = ""
    for name, value in message.headers.raw_items():  # one pass instead of a lookup per name
        counts[name] = counts.get(name, 0) + 1
        if name == "CSeq" and not cseq:
            cseq = value
    for name in REQUIRED_HEADERS:
        if name not in counts:
            return SIPParseError(400, f"Bad Request: no {name}", message=message)
    for name in _SINGLE_HEADERS:
        if counts.get(name, 0) > 1:
            return SIPParseError(400, f"Bad Request: more than one {name}", message=message)
    try:
        _, method = parse_cseq(cseq)
    except ValueError:
        return SIPParseError(400, "Bad Request: malformed CSeq", message=message)
    if isinstance(message, Request) and method != message.method:
        return SIPParseError(400, "Bad Request: CSeq method does not match", message=message)
    return None


class StreamParser:
    """Incremental framing for a SIP stream (TLS/TCP): feed bytes, get
    complete messages; Content-Length framing (RFC 3261 18.3)."""

    # One per connection (15,000 on a server): no per-instance __dict__.
    __slots__ = ("limits", "_buf", "_start", "_dead", "_scan", "_line_start", "_nheaders",
                 "_head_end", "_message", "_error", "_body_len")

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._start = 0  # offset of the first unconsumed byte in _buf
        self._dead: SIPParseError | None = None
        self._reset()

    def _reset(self) -> None:
        # offsets below are relative to self._start (the message start)
        self._scan: int | None = None  # None: between messages
        self._line_start = 0
        self._nheaders = 0
        self._head_end: int | None = None
        self._message: Request | Response | None = None
        self._error: SIPParseError | None = None
        self._body_len = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message (slow-input limits use it)."""
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> list[Request | Response | KeepAlivePing | KeepAlivePong]:
        """Consume ``data``; return what it completed, in order.

        Raises SIPParseError. After a non-fatal one the bad message has been
        consumed and any bytes after it stay buffered: call ``feed(b"")`` to
        go on with them. After a fatal one every call raises again.
        """
        if self._dead is not None:
            raise _fatal(self._dead.code, self._dead.reason)
        self._buf += data
        out: list[Request | Response | KeepAlivePing | KeepAlivePong] = []
        try:
            while True:
                item = self._next()
                if item is None:
                    return out
                out.append(item)
        except SIPParseError as e:
            if e.fatal:
                self._die(e)
            e.preceding = out
            raise
        except Exception as e:  # a parser bug must not become a reactor traceback
            err = _fatal(400, "Bad Request: unparseable message")
            self._die(err)
            err.preceding = out
            raise err from e
        finally:
            self._compact()

    def feed_events(
        self, data: bytes
    ) -> list[Request | Response | KeepAlivePing | KeepAlivePong | SIPParseError]:
        """Like ``feed`` but never raises: errors come back in the list, in
        stream order; a fatal error is always the last item."""
        out: list[Request | Response | KeepAlivePing | KeepAlivePong | SIPParseError] = []
        while True:
            try:
                out.extend(self.feed(data))
                return out
            except SIPParseError as e:
                out.extend(e.preceding)
                out.append(e)
                if e.fatal:
                    return out
                data = b""

    def _die(self, error: SIPParseError) -> None:
        self._dead = error
        self._buf = bytearray()
        self._start = 0
        self._reset()

    def _compact(self) -> None:
        if self._start:
            del self._buf[: self._start]
            self._start = 0

    def _next(self) -> Request | Response | KeepAlivePing | KeepAlivePong | None:
        if self._scan is None:
            boundary = self._boundary()
            if boundary is not _START:
                return boundary  # type: ignore[return-value]
            self._scan = self._line_start = 0
        if self._head_end is None and not self._scan_head():
            return None
        return self._take_body()

    def _boundary(self) -> KeepAlivePing | KeepAlivePong | object | None:
        buf, s = self._buf, self._start
        while s < len(buf) and buf[s] == 0x0A:  # stray bare LFs are ignored
            s += 1
        self._start = s
        n = len(buf) - s
        if n == 0:
            return None
        if buf[s] != 0x0D:
            return _START
        if n == 1:
            return None
        if buf[s + 1] != 0x0A:
            return _START  # fails as a control character in the start line
        if n >= 4 and buf[s + 2] == 0x0D and buf[s + 3] == 0x0A:
            self._start += 4
            return PING
        if n == 3 and buf[s + 2] == 0x0D:
            return None  # maybe the rest of a ping
        self._start += 2
        return PONG

    def _scan_head(self) -> bool:
        """Find the end of the header section, enforcing the header limits."""
        if self._find_head():
            self._parse_head()
            return True
        buf, s, lim = self._buf, self._start, self.limits
        assert self._scan is not None
        while True:
            nl = buf.find(b"\n", s + self._scan)
            if nl < 0:
                self._scan = len(buf) - s
                if self._scan - self._line_start > lim.max_line_bytes + 1:
                    raise _fatal(513, "Message Too Large: line too long")
                if self._scan > lim.max_header_bytes:
                    raise _fatal(513, "Message Too Large: header section too large")
                return False
            nl -= s
            line_len = nl - self._line_start
            if line_len and buf[s + nl - 1] == 0x0D:
                line_len -= 1
            if line_len > lim.max_line_bytes:
                raise _fatal(513, "Message Too Large: line too long")
            if nl + 1 > lim.max_header_bytes:
                raise _fatal(513, "Message Too Large: header section too large")
            if line_len == 0:
                if self._line_start == 0:
                    raise _fatal(400, "Bad Request: empty start line")
                self._head_end = nl + 1
                self._parse_head()
                return True
            if self._line_start and buf[s + self._line_start] not in (0x20, 0x09):
                self._nheaders += 1
                if self._nheaders > lim.max_headers:
                    raise _fatal(513, "Message Too Large: too many header fields")
            self._line_start = self._scan = nl + 1

    def _find_head(self) -> bool:
        """The usual case in two searches: a whole header section that no limit can refuse.

        A section shorter than ``max_line_bytes`` has no line that is too
        long, one shorter than ``max_header_bytes`` is not too large, and one
        with few enough lines has not too many fields; anything else (and a
        section not complete yet) goes through the line-by-line scan, which
        finds the same end and raises the exact limit error.
        """
        buf, s, lim = self._buf, self._start, self.limits
        window = s + min(lim.max_line_bytes, lim.max_header_bytes)
        lf = buf.find(b"\n\n", s, window)
        crlf = buf.find(b"\n\r\n", s, window if lf < 0 else lf + 3)
        if crlf >= 0:
            end = crlf + 3
        elif lf >= 0:
            end = lf + 2
        else:
            return False
        if buf.count(b"\n", s, end) - 2 > lim.max_headers:
            return False
        self._head_end = end - s
        return True

    def _parse_head(self) -> None:
        assert self._head_end is not None
        head = bytes(self._buf[self._start : self._start + self._head_end])
        lines = _split_lines(head)
        message, version = _parse_start_line(lines[0])
        message.headers = _parse_header_lines(lines[1:])
        length = _content_length(message)
        if length > self.limits.max_body_bytes:
            raise _fatal(413, "Request Entity Too Large", message)
        if self._head_end + length > self.limits.max_message_bytes:
            raise _fatal(513, "Message Too Large", message)
        self._message = message
        self._body_len = length
        self._error = _semantic_error(message, version)

    def _take_body(self) -> Request | Response | None:
        assert self._head_end is not None and self._message is not None
        end = self._head_end + self._body_len
        if len(self._buf) - self._start < end:
            return None
        message, error = self._message, self._error
        message.body = bytes(self._buf[self._start + self._head_end : self._start + end])
        self._start += end
        self._reset()
        if error is not None:
            raise error
        return message


def parse_message(data: bytes, limits: Limits = Limits()) -> Request | Response:
    """Parse exactly one complete message (stream rules: a missing
    Content-Length means an empty body, so trailing bytes are an error)."""
    if len(data) > limits.max_message_bytes:
        raise _fatal(513, "Message Too Large")
    parser = StreamParser(limits)
    items = parser.feed(bytes(data))
    if len(items) != 1 or not isinstance(items[0], (Request, Response)):
        if not items and parser.buffered:
            raise _fatal(400, "Bad Request: incomplete message")
        raise _fatal(400, "Bad Request: not exactly one message")
    if parser.buffered:
        raise _fatal(400, "Bad Request: trailing data after the message", items[0])
    return items[0]
