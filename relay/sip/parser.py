"""Bytes to :class:`Request` / :class:`Response` (RFC 3261 §7, §25; RFC 4475 conformance).

The parser splits the header block, unfolds continuation lines, and strictly validates what a
proxy relies on: the start line, Via, From, To, Call-ID, CSeq, Max-Forwards, Content-Length,
Contact and Date. Every other header is kept as raw text and never parsed. Anything malformed
raises a :class:`SipParseError` subclass naming the problem; nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from clearip.relay.sip.address import check_address, parse_address
from clearip.relay.sip.errors import IncompleteMessage, LimitExceeded, SipParseError
from clearip.relay.sip.grammar import (
    cseq_re,
    date_re,
    digits_re,
    is_digits,
    is_scheme,
    is_token,
    request_uri_scheme_re,
    split_commas,
    status_line_re,
)
from clearip.relay.sip.message import COMPACT_FORMS, Message, Request, Response
from clearip.relay.sip.uri import parse_sip_uri, parse_uri
from clearip.relay.sip.via import check_via, parse_via

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
    # The lines as the parser reads them; and, when some were folded, as received (raws).
    raws: list[str] | None = None
    lines = head.split("\r\n")
    for index in range(1, len(lines)):
        line = lines[index]
        if line and _blank(ord(line[0])):
            lines, raws = _unfold(head)
            break
    if len(lines) - 1 > limits.max_headers:
        raise LimitExceeded(f"more than {limits.max_headers} header lines", "too-many-headers")

    start = lines[0]  # never folded: _unfold refuses a continuation of the start line
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
    for index in range(1, len(lines)):
        text = lines[index]
        raw_line = text if raws is None else raws[index]
        if len(raw_line) > limits.max_line_length:
            raise LimitExceeded("header line too long", "line-too-long")
        # A token holds no ':', so the first one ends the name (no regex per line).
        colon = text.find(":")
        if colon < 0:
            raise SipParseError(f"malformed header line {raw_line[:40]!r}", "header")
        spelled = text[:colon]
        known = names.get(spelled)
        if known is None:
            bare = spelled.rstrip(" \t")
            if not is_token(bare):
                raise SipParseError(f"malformed header line {raw_line[:40]!r}", "header")
            key = bare.lower()
            known = (bare, COMPACT_FORMS.get(key, key))
            if len(names) < _NAME_CACHE_LIMIT:
                names[spelled] = known
        name, key = known
        # The value without the spaces and tabs around it (str.strip with characters is
        # slow compiled).
        first = colon + 1
        last = len(text)
        while first < last and _blank(ord(text[first])):
            first += 1
        while last > first and _blank(ord(text[last - 1])):
            last -= 1
        value = text[first:last]
        headers.append((name, key, value, raw_line))
        if key == "content-length":
            content_lengths.append(value)

    _validate(message)
    message.body = _body(data, end + 4, content_lengths, datagram)
    return message


def _blank(code: int) -> bool:
    return code == 32 or code == 9  # noqa: PLR1714 (ints, compared natively when compiled)


def _unfold(head: str) -> tuple[list[str], list[str]]:
    """Join continuation lines; returns the unfolded lines and the same lines as received
    (for output)."""
    lines: list[str] = []
    raws: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and len(lines) > 1:
            lines[-1] = lines[-1] + " " + line.strip(" \t")
            raws[-1] = raws[-1] + "\r\n" + line
        elif line[:1] in (" ", "\t"):
            raise SipParseError("continuation line without a header", "header")
        else:
            lines.append(line)
            raws.append(line)
    return lines, raws


def _parse_status_line(line: str) -> Response:
    # SIP/2.0 SP 3DIGIT SP reason, read with string methods (see grammar); else the regex.
    if len(line) >= 12 and line.startswith("SIP/2.0 ") and line[11] == " ":
        code = line[8:11]
        reason = line[12:]
        if (
            is_digits(code, 3)
            and "1" <= code[0] <= "6"
            and "\r" not in reason
            and "\n" not in reason
        ):
            return Response(int(code), reason)
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
    if not is_token(method):
        raise SipParseError("malformed method", "start-line")
    if len(uri) > limits.max_uri_length:
        raise LimitExceeded(f"Request-URI longer than {limits.max_uri_length}", "uri-too-long")
    scheme, _, rest = uri.partition(":")
    simple = is_scheme(scheme) and bool(rest) and rest.isascii() and rest.isprintable()
    if not simple and request_uri_scheme_re.fullmatch(uri) is None:
        raise SipParseError("malformed Request-URI", "uri")
    scheme = scheme.lower()
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

    Checking only matches the grammar (regular expressions, in C): the structured values are
    built later, when someone reads them, and most never are. Headers nobody checks cost one
    dictionary lookup.
    """
    checks = _CHECKS
    request = isinstance(message, Request)
    top_via = True
    for header in message.headers:
        check = checks.get(header[1], 0)
        if check == 0:
            continue
        value = header[2]
        if check == _VIA:
            parts = [value] if "," not in value else split_commas(value)
            for part in parts:
                if top_via:
                    # Everybody reads the top Via (transaction keys): parse it once, here.
                    message._top_via = parse_via(part)
                    top_via = False
                else:
                    check_via(part)
        elif check == _ADDRESS:
            if request and header[1] == "to" and message._to is None:
                message._to = parse_address(value)  # the core reads every request's To tag
            elif request and header[1] == "from" and message._from is None:
                message._from = parse_address(value)  # and the From tag of an INVITE
            else:
                check_address(value)
        elif check == _CONTACT:
            if value == "*":
                continue
            if "," not in value:
                check_address(value)
            else:
                for part in split_commas(value):
                    check_address(part)
        elif check == _CSEQ:
            _, method = cseq_fields(value)
            if isinstance(message, Request) and method != message.method:
                raise SipParseError("CSeq method does not match the request method", "cseq")
        elif check == _MAX_FORWARDS:
            if is_digits(value, 10):
                hops = int(value)
            else:
                m = digits_re.fullmatch(value)
                hops = MAX_FORWARDS_LIMIT + 1 if m is None else int(m.group(1))
            if hops > MAX_FORWARDS_LIMIT:
                raise SipParseError("malformed Max-Forwards", "max-forwards")
        elif check == _CALL_ID:
            if not value or " " in value or "\t" in value:
                raise SipParseError("malformed Call-ID", "call-id")
        elif check == _DATE:
            if date_re.fullmatch(value) is None:
                raise SipParseError("malformed Date (RFC 1123 date in GMT required)", "date")


# What _validate checks, by header key (ints: dispatch without a call per header).
_VIA: Final = 1
_ADDRESS: Final = 2
_CONTACT: Final = 3
_CSEQ: Final = 4
_MAX_FORWARDS: Final = 5
_CALL_ID: Final = 6
_DATE: Final = 7
_CHECKS: Final = {
    "via": _VIA,
    "from": _ADDRESS,
    "to": _ADDRESS,
    "contact": _CONTACT,
    "cseq": _CSEQ,
    "max-forwards": _MAX_FORWARDS,
    "call-id": _CALL_ID,
    "date": _DATE,
}


def cseq_fields(value: str) -> tuple[int, str]:
    """A CSeq value as (number, method); raises SipParseError when malformed."""
    number, space, method = value.partition(" ")
    if not (space and number.isascii() and number.isdigit() and is_token(method)):
        m = cseq_re.fullmatch(value)
        if m is None:
            raise SipParseError("malformed CSeq", "cseq")
        number, method = m.group(1), m.group(2)
    if len(number) > 10 or int(number) > MAX_CSEQ:
        raise SipParseError("CSeq number too large", "cseq")
    return int(number), method


def _body(data: bytes, start: int, content_lengths: list[str], datagram: bool) -> bytes:
    available = len(data) - start
    if not content_lengths:
        if not datagram:
            raise SipParseError("Content-Length is required on stream transports", "framing")
        return data[start:]
    length = -1
    conflict = False
    for text in content_lengths:
        if not text.isdigit() or not text.isascii():
            raise SipParseError(f"malformed Content-Length {text[:20]!r}", "content-length")
        value = int(text)
        if length < 0:
            length = value
        elif value != length:
            conflict = True
    if conflict:
        # RFC 4475 §3.3.9: the message parses; the proxy answers it 400 (see conflicts()).
        return data[start:]
    if length > available:
        if datagram:
            raise SipParseError("Content-Length larger than the message", "content-length")
        raise IncompleteMessage("body not complete yet")
    return data[start : start + length]


def content_length_conflict(message: Message) -> bool:
    """True when the message carries several different Content-Length values."""
    values = {h[2] for h in message.headers if h[1] == "content-length"}
    return len(values) > 1
