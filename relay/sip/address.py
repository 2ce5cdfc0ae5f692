"""name-addr / addr-spec values with parameters: From, To, Contact, Route, Record-Route, PAI."""

from __future__ import annotations

from typing import Final, final

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import (
    COMPILED,
    address_re,
    find_param,
    is_scheme,
    params_end,
    scheme_end,
    simple_params,
    split_commas,
    split_params,
)
from clearip.relay.sip.record import Record
from clearip.relay.sip.uri import Uri, parse_uri


@final
class Address(Record):
    """One address: optional display name, the URI text, and header parameters.

    Immutable: messages memoise the addresses they parsed and may share them."""

    __slots__ = ("angle", "display", "params", "uri_text")
    FIELDS = ("display", "uri_text", "params", "angle")

    def __init__(
        self,
        display: str | None,
        uri_text: str,
        params: list[tuple[str, str | None]] | None = None,
        angle: bool = True,
    ) -> None:
        self.display: Final = display
        self.uri_text: Final = uri_text
        self.params: Final[list[tuple[str, str | None]]] = [] if params is None else params
        self.angle: Final = angle

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

    @property
    def tag(self) -> str | None:
        return self.param("tag")

    @property
    def uri(self) -> Uri:
        return parse_uri(self.uri_text)

    @property
    def q(self) -> float:
        """The Contact q-value (1.0 when absent or unreadable)."""
        value = self.param("q")
        try:
            return min(1.0, max(0.0, float(value))) if value else 1.0
        except ValueError:
            return 1.0

    def __str__(self) -> str:
        out = []
        if self.display:
            out += [self.display, " "]
        out += ["<", self.uri_text, ">"] if self.angle or self.display else [self.uri_text]
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        return "".join(out)


def parse_address(text: str) -> Address:
    """Parse one name-addr or addr-spec with parameters; raise SipParseError if malformed.

    Not memoised: From and To carry tags new in every call (a message memoises its own)."""
    simple = _simple_address(text)
    if simple is not None:
        return simple
    m = address_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed address {text.strip()[:60]!r}", "address")
    display, bracketed, bare, params = m.group(1, 2, 3, 4)
    if bracketed is None:
        return Address(None, bare, split_params(params), angle=False)
    if display is None:
        # A quoted display name is not captured by group 1: recover it from the text.
        head = text[: m.start(2) - 1].strip()
        display = head or None
    return Address(display, bracketed, split_params(params))


def check_address(text: str) -> None:
    """Raise SipParseError unless ``text`` is one well-formed address (what the parser checks
    for From, To and each Contact; the object is built only when someone reads it)."""
    simple = _simple_address_ok(text) if COMPILED else _simple_address(text) is not None
    if not simple and address_re.fullmatch(text) is None:
        raise SipParseError(f"malformed address {text.strip()[:60]!r}", "address")


def _simple_address_ok(text: str) -> bool:
    """:func:`_simple_address` is not None, without building anything (compiled: a scan of
    the characters)."""
    size = len(text)
    if text.startswith("<"):
        start = 0
    elif text.startswith('"'):
        close = text.find('"', 1)
        if close < 0 or text.find("\\", 0, close) >= 0:
            return False
        if text.find("\r", 0, close) >= 0 or text.find("\n", 0, close) >= 0:
            return False
        start = close + 1
        while start < size and (ord(text[start]) == 32 or ord(text[start]) == 9):
            start += 1
        if start >= size or ord(text[start]) != 60:  # <
            return False
    else:
        return False
    end = text.find(">", start)
    if end < 0:
        return False
    colon = scheme_end(text, start + 1)
    if colon == start + 1 or colon >= end or ord(text[colon]) != 58:  # scheme:
        return False
    first = ord(text[start + 1])
    if not (65 <= first <= 90 or 97 <= first <= 122):  # the scheme starts with a letter
        return False
    if colon + 1 == end:
        return False
    for index in range(colon + 1, end):  # printable ASCII, no space, no <
        code = ord(text[index])
        if code < 33 or code > 126 or code == 60:
            return False
    return params_end(text, end + 1) == size


def _simple_address(text: str) -> Address | None:
    """``<uri>`` or ``"display" <uri>``, then ``;token[=token]`` parameters, read with string
    methods (see :mod:`grammar`): the URI a scheme and printable ASCII without spaces, the
    display name quoted without escapes. None for any other shape, which ``address_re`` then
    decides."""
    if text.startswith("<"):
        display: str | None = None
        start = 0
    elif text.startswith('"'):
        close = text.find('"', 1)
        if close < 0:
            return None
        display = text[: close + 1]
        if "\\" in display or "\r" in display or "\n" in display:
            return None
        start = close + 1
        while text[start : start + 1] in (" ", "\t"):
            start += 1
        if text[start : start + 1] != "<":
            return None
    else:
        return None
    end = text.find(">", start)
    if end < 0:
        return None
    uri = text[start + 1 : end]
    scheme, colon, rest = uri.partition(":")
    if (
        not colon
        or not is_scheme(scheme)
        or not rest
        or not rest.isascii()
        or not rest.isprintable()
        or " " in rest
        or "<" in rest
    ):
        return None
    params = simple_params(text[end + 1 :])
    if params is None:
        return None
    return Address(display, uri, params)


def parse_address_list(value: str) -> list[Address]:
    """A comma-separated list of addresses (Contact, Route, Record-Route)."""
    return [parse_address(part) for part in split_commas(value)]
