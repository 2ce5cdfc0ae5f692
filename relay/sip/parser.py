"""Bytes to :class:`Request` / :class:`Response` (RFC 3261 §7, §25; RFC 4475 conformance).

The parser splits the header block, unfolds continuation lines, and strictly validates what a
proxy relies on: the start line, Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length,
Contact and Date. Every other header is kept as raw text and never parsed. Anything malformed
raises a :class:`SipParseError` subclass naming the problem; nothing else escapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from clearip.relay.sip.address import parse_address
from clearip.relay.sip.errors import IncompleteMessage, LimitExceeded, SipParseError
from clearip.relay.sip.grammar import (
    PARSE_CACHE_SIZE,
    cseq_re,
    date_re,
    digits_re,
    request_uri_scheme_re,
    split_commas,
    status_line_re,
    token_re,
)
from clearip.relay.sip.message import COMPACT_FORMS, Message, Request, Response
from clearip.relay.sip.uri import parse_sip_uri, parse_uri
from clearip.relay.sip.via import via_fields

MAX_CSEQ = 2**31 - 1
MAX_FORWARDS_LIMIT = 255


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on what a peer may send; exceeding one raises :class:`LimitExceeded`."""

    max_message_size: int = 65536
    max_headers: int = 128
    max_line_length: int = 8192
    max_uri_length: int = 2048


DEFAULT_LIMITS = Limits()

# Header-name spelling (as before the colon) -> (name, key); bounded so odd spellings from a
# peer cannot grow it forever.
_NAMES: dict[str, tuple[str, str]] = {}
_NAME_CACHE_LIMIT = 1024


def parse_message(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, datagram: bool = True
) -> Request | Response:
    """Parse one message.

    ``datagram=True``: the bytes are a whole UDP datagram; a missing Content-Length means the
    body is the rest, and octets beyond Content-Length are ignored (RFC 4475 §3.1.1.8).
    ``datagram=False``: framing was done by :mod:`framing`, Content-Length is required.
    """
    if len(data) > limits.max_message_size:
        raise LimitExceeded(f"message larger than {limits.max_message_size} bytes", "too-large")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise SipParseError("no empty line after the headers", "framing")
    head = data[:end].decode("utf-8", "surrogateescape")
    lines: list[str | tuple[str, str]]
    if "\r\n " in head or "\r\n\t" in head:
        lines = _unfold(head)
    else:
        lines = list(head.split("\r\n"))
    if len(lines) - 1 > limits.max_headers:
        raise LimitExceeded(f"more than {limits.max_headers} header lines", "too-many-headers")

    start = lines[0]
    if isinstance(start, tuple):
        raise SipParseError("folded start line", "start-line")
    if len(start) > limits.max_line_length:
        raise LimitExceeded("start line too long", "line-too-long")
    message: Request | Response
    if start.startswith("SIP/"):
        message = _parse_status_line(start)
    else:
        message = _parse_request_line(start, limits)

    headers = message.headers
    content_lengths: list[str] = []
    names = _NAMES
    for line in lines[1:]:
        if isinstance(line, tuple):
            raw_line, text = line
        else:
            raw_line = text = line
        if len(raw_line) > limits.max_line_length:
            raise LimitExceeded("header line too long", "line-too-long")
        # A token holds no ':', so the first one ends the name (no regex per line).
        spelled, colon, value = text.partition(":")
        if not colon:
            raise SipParseError(f"malformed header line {raw_line[:40]!r}", "header")
        known = names.get(spelled)
        if known is None:
            bare = spelled.rstrip(" \t")
            if token_re.fullmatch(bare) is None:
                raise SipParseError(f"malformed header line {raw_line[:40]!r}", "header")
            key = bare.lower()
            known = (bare, COMPACT_FORMS.get(key, key))
            if len(names) < _NAME_CACHE_LIMIT:
                names[spelled] = known
        name, key = known
        value = value.strip(" \t")
        headers.append((name, key, value, raw_line))
        if key == "content-length":
            content_lengths.append(value)

    _validate(message)
    message.body = _body(data, end + 4, content_lengths, datagram)
    return message


def _unfold(head: str) -> list[str | tuple[str, str]]:
    """Join continuation lines; returns raw text (for output) with the unfolded text."""
    out: list[str | tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and len(out) > 1:
            previous = out[-1]
            raw, unfolded = previous if isinstance(previous, tuple) else (previous, previous)
            out[-1] = (raw + "\r\n" + line, unfolded + " " + line.strip(" \t"))
        elif line[:1] in (" ", "\t"):
            raise SipParseError("continuation line without a header", "header")
        else:
            out.append(line)
    return out


def _parse_status_line(line: str) -> Response:
    m = status_line_re.fullmatch(line)
    if m is None:
        if not line.startswith("SIP/2.0 "):
            raise SipParseError("unsupported SIP version", "version")
        raise SipParseError("malformed status line", "start-line")
    return Response(int(m.group(1)), m.group(2))


def _parse_request_line(line: str, limits: Limits) -> Request:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError("malformed request line (want METHOD SP URI SP SIP/2.0)", "start-line")
    method, uri, version = parts
    if version != "SIP/2.0":
        if version.upper().startswith("SIP/"):
            raise SipParseError(f"unsupported SIP version {version[:16]}", "version")
        raise SipParseError("malformed request line (no SIP version)", "start-line")
    if token_re.fullmatch(method) is None:
        raise SipParseError("malformed method", "start-line")
    if len(uri) > limits.max_uri_length:
        raise LimitExceeded(f"Request-URI longer than {limits.max_uri_length}", "uri-too-long")
    if request_uri_scheme_re.fullmatch(uri) is None:
        raise SipParseError("malformed Request-URI", "uri")
    scheme = uri.partition(":")[0].lower()
    request = Request(method, uri)
    if scheme in ("sip", "sips"):
        parsed = parse_sip_uri(uri)
        if parsed.headers is not None:
            raise SipParseError("headers are not allowed in a Request-URI", "uri")
        request.cache_uri(parsed)
    elif scheme == "tel":
        request.cache_uri(parse_uri(uri))
    return request


def _validate(message: Request | Response) -> None:
    """Check the headers a proxy depends on; each instance of each is checked.

    The checks go through the memoised parsers, so a value seen in an earlier message of the
    call (From, To, Contact, a Via) costs a lookup, not a regular-expression match; headers
    nobody checks cost one dictionary lookup.
    """
    checks = _CHECKS
    for _, key, value, _ in message.headers:
        check = checks.get(key)
        if check is not None:
            check(message, value)


def _check_via(message: Message, value: str) -> None:
    if "," not in value:
        via_fields(value)
    else:
        for part in split_commas(value):
            via_fields(part)


def _check_address(message: Message, value: str) -> None:
    parse_address(value)


def _check_contact(message: Message, value: str) -> None:
    if value == "*":
        return
    if "," not in value:
        parse_address(value)
    else:
        for part in split_commas(value):
            parse_address(part)


def _check_cseq(message: Message, value: str) -> None:
    _, method = cseq_fields(value)
    if isinstance(message, Request) and method != message.method:
        raise SipParseError("CSeq method does not match the request method", "cseq")


def _check_max_forwards(message: Message, value: str) -> None:
    m = digits_re.fullmatch(value)
    if m is None or int(m.group(1)) > MAX_FORWARDS_LIMIT:
        raise SipParseError("malformed Max-Forwards", "max-forwards")


def _check_call_id(message: Message, value: str) -> None:
    if not value or " " in value or "\t" in value:
        raise SipParseError("malformed Call-ID", "call-id")


def _check_date(message: Message, value: str) -> None:
    if date_re.fullmatch(value) is None:
        raise SipParseError("malformed Date (RFC 1123 date in GMT required)", "date")


_CHECKS: dict[str, Callable[[Message, str], None]] = {
    "via": _check_via,
    "from": _check_address,
    "to": _check_address,
    "contact": _check_contact,
    "cseq": _check_cseq,
    "max-forwards": _check_max_forwards,
    "call-id": _check_call_id,
    "date": _check_date,
}


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def cseq_fields(value: str) -> tuple[int, str]:
    """A CSeq value as (number, method); raises SipParseError when malformed (memoised)."""
    m = cseq_re.fullmatch(value)
    if m is None:
        raise SipParseError("malformed CSeq", "cseq")
    if len(m.group(1)) > 10 or int(m.group(1)) > MAX_CSEQ:
        raise SipParseError("CSeq number too large", "cseq")
    return int(m.group(1)), m.group(2)


def _body(data: bytes, start: int, content_lengths: list[str], datagram: bool) -> bytes:
    available = len(data) - start
    if not content_lengths:
        if not datagram:
            raise SipParseError("Content-Length is required on stream transports", "framing")
        return data[start:]
    values = set()
    for text in content_lengths:
        if not text.isdigit() or not text.isascii():
            raise SipParseError(f"malformed Content-Length {text[:20]!r}", "content-length")
        values.add(int(text))
    if len(values) > 1:
        # RFC 4475 §3.3.9: the message parses; the proxy answers it 400 (see conflicts()).
        return data[start:]
    length = values.pop()
    if length > available:
        if datagram:
            raise SipParseError("Content-Length larger than the message", "content-length")
        raise IncompleteMessage("body not complete yet")
    return data[start : start + length]


def content_length_conflict(message: Message) -> bool:
    """True when the message carries several different Content-Length values."""
    values = {h[2] for h in message.headers if h[1] == "content-length"}
    return len(values) > 1
