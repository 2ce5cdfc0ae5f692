"""SIP requests and responses (RFC 3261 §7).

A message keeps every header field as it was received: name spelling, order, folding and the
raw line. Only headers that the proxy edits are rebuilt on output, so everything it does not
touch passes through byte-exact. Structured values (Via, CSeq, tags, URIs) are built on first
use and cached; headers nobody reads are never parsed beyond the name.

Header keys are lower-case full names: compact forms are expanded (``v`` is ``via``).
"""

from __future__ import annotations

from typing import cast

from clearip.relay.sip.address import Address, parse_address, parse_address_list
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import split_commas
from clearip.relay.sip.uri import Uri, parse_uri
from clearip.relay.sip.via import Via, parse_via

COMPACT_FORMS = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "s": "subject",
    "k": "supported",
    "t": "to",
    "v": "via",
    "o": "event",
    "u": "allow-events",
    "x": "session-expires",
    "r": "refer-to",
    "b": "referred-by",
    "y": "identity",
}

# Spelling used when the proxy writes a header of its own.
CANONICAL_NAMES = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "p-asserted-identity": "P-Asserted-Identity",
    "content-length": "Content-Length",
}


def canonical_name(key: str) -> str:
    return CANONICAL_NAMES.get(key) or "-".join(part.capitalize() for part in key.split("-"))


#: One header field line: (name as written, key, value, raw line). ``raw`` is the received text
#: and None once the proxy wrote the line itself. A plain tuple of strings, not an object: the
#: garbage collector stops tracking such tuples, and a proxy holds tens of thousands of messages
#: in lingering transactions (RFC 6026's 32 s), each with a dozen headers.
Header = tuple[str, str, str, str | None]


def select_headers(headers: list[Header], keys: tuple[str, ...], *, keep: bool) -> list[Header]:
    """The headers whose key is in ``keys`` (``keep``) or not, in order: the same tuple
    objects. (Compiled, a Header read from a list is unboxed and one stored is boxed anew, so
    a comprehension over the headers would copy every tuple it keeps.)"""
    selected: list[object] = []
    for item in cast(list[object], headers):
        if (cast(tuple[object, ...], item)[1] in keys) == keep:
            selected.append(item)
    return cast(list[Header], selected)


class Message:
    """What requests and responses share: headers, body and cached structured values."""

    __slots__ = ("_cseq", "_from", "_to", "_top_via", "body", "headers", "source")

    def __init__(self, headers: list[Header] | None = None, body: bytes = b"") -> None:
        self.headers: list[Header] = headers if headers is not None else []
        self.body = body
        self._top_via: Via | None = None
        self._cseq: tuple[int, str] | None = None
        self._from: Address | None = None
        self._to: Address | None = None
        # Where the message came from (set by the transport): (transport, host, port).
        self.source: tuple[str, str, int] | None = None

    # -- reading ---------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        """The value of the first header with this key (lower-case full name), or None."""
        for header in self.headers:
            if header[1] == key:
                return header[2]
        return None

    def get_all(self, key: str) -> list[str]:
        """All values of a header, split at top-level commas, across lines, in order."""
        out: list[str] = []
        for _, hkey, value, _ in self.headers:
            if hkey == key:
                out.extend(split_commas(value))
        return out

    def has(self, key: str) -> bool:
        for header in self.headers:  # noqa: SIM110 (a loop; any() with a generator is slower)
            if header[1] == key:
                return True
        return False

    @property
    def call_id(self) -> str:
        return (self.get("call-id") or "").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        if self._cseq is None:
            text = self.get("cseq")
            if text is None:
                raise SipParseError("missing CSeq", "missing-header")
            number, _, method = text.strip().partition(" ")
            try:
                self._cseq = (int(number), method.strip())
            except ValueError:
                raise SipParseError("malformed CSeq", "cseq") from None
        return self._cseq

    @property
    def from_addr(self) -> Address:
        if self._from is None:
            self._from = parse_address(self._required("from"))
        return self._from

    @property
    def to_addr(self) -> Address:
        if self._to is None:
            self._to = parse_address(self._required("to"))
        return self._to

    @property
    def from_tag(self) -> str | None:
        return self.from_addr.tag

    @property
    def to_tag(self) -> str | None:
        return self.to_addr.tag

    @property
    def top_via(self) -> Via:
        if self._top_via is None:
            for _, key, value, _ in self.headers:
                if key == "via":
                    first = value.split(",", 1)[0] if '"' not in value else split_commas(value)[0]
                    self._top_via = parse_via(first)
                    break
            else:
                raise SipParseError("missing Via", "missing-header")
        return self._top_via

    def vias(self) -> list[Via]:
        return [parse_via(value) for value in self.get_all("via")]

    def addresses(self, key: str) -> list[Address]:
        """Contact, Route or Record-Route values, in order."""
        out: list[Address] = []
        for _, hkey, value, _ in self.headers:
            if hkey == key:
                if value.strip() == "*":
                    continue
                out.extend(parse_address_list(value))
        return out

    def _required(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise SipParseError(f"missing {canonical_name(key)}", "missing-header")
        return value

    # -- editing -----------------------------------------------------------------------------
    def set(self, name: str, value: str) -> None:
        """Replace every header of this name by one line with ``value`` (kept in place)."""
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        headers = self.headers
        for index, header in enumerate(headers):
            if header[1] == key:
                headers[index] = (header[0], key, value, None)
                for later in range(index + 1, len(headers)):
                    if headers[later][1] == key:  # more lines of it: drop them
                        headers[later:] = select_headers(headers[later:], (key,), keep=False)
                        break
                self._edited(key)
                return
        self.append(name, value)

    def append(self, name: str, value: str) -> None:
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        self.headers.append((name, key, value, None))
        self._edited(key)

    def insert(self, index: int, name: str, value: str) -> None:
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        self.headers.insert(index, (name, key, value, None))
        self._edited(key)

    def prepend(self, name: str, value: str) -> None:
        """Add a header line above the first of its kind (or at the top)."""
        key = name.lower()
        key = COMPACT_FORMS.get(key, key)
        for index, header in enumerate(self.headers):
            if header[1] == key:
                self.insert(index, name, value)
                return
        self.insert(0, name, value)

    def remove(self, key: str) -> int:
        before = len(self.headers)
        self.headers = select_headers(self.headers, (key,), keep=False)
        self._edited(key)
        return before - len(self.headers)

    def pop_first_value(self, key: str) -> str | None:
        """Remove the first value of a (possibly comma-separated) header, e.g. the top Via."""
        for index, header in enumerate(self.headers):
            if header[1] != key:
                continue
            values = split_commas(header[2])
            if len(values) == 1:
                del self.headers[index]
            else:
                self.headers[index] = (header[0], key, ", ".join(values[1:]), None)
            self._edited(key)
            return values[0]
        return None

    def _edited(self, key: str) -> None:
        if key == "via":
            self._top_via = None
        elif key == "cseq":
            self._cseq = None
        elif key == "from":
            self._from = None
        elif key == "to":
            self._to = None

    # -- output ------------------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Serialise; adds Content-Length when absent (mandatory on streams, harmless on UDP)."""
        lines = [self.start_line()]
        length = False
        for name, key, value, raw in self.headers:
            lines.append(raw if raw is not None else f"{name}: {value}")
            if key == "content-length":
                length = True
        if not length:
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body

    def copy(self) -> Message:
        raise NotImplementedError

    def _copy_into(self, other: Message) -> None:
        other.headers = self.headers.copy()  # the tuples are immutable: share them
        other.body = self.body
        other.source = self.source
        # So are these (the Via is not: the proxy edits it in place).
        other._cseq = self._cseq
        other._from = self._from
        other._to = self._to


class Request(Message):
    __slots__ = ("_uri", "method", "uri_text")

    def __init__(
        self,
        method: str,
        uri: str,
        headers: list[Header] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri_text = uri
        self._uri: Uri | None = None

    @property
    def uri(self) -> Uri:
        if self._uri is None:
            self._uri = parse_uri(self.uri_text)
        return self._uri

    def cache_uri(self, uri: Uri) -> None:
        """Keep the parser's parsed Request-URI so nobody parses it twice."""
        self._uri = uri

    def set_uri(self, uri: str) -> None:
        self.uri_text = uri
        self._uri = None

    def start_line(self) -> str:
        return f"{self.method} {self.uri_text} SIP/2.0"

    def copy(self) -> Request:
        other = Request(self.method, self.uri_text)
        self._copy_into(other)
        return other

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri_text} call-id={self.call_id!r}>"


class Response(Message):
    __slots__ = ("reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[Header] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def start_line(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"

    def copy(self) -> Response:
        other = Response(self.status, self.reason)
        self._copy_into(other)
        return other

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self.call_id!r}>"
