"""name-addr / addr-spec values with parameters: From, To, Contact, Route, Record-Route, PAI."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import (
    PARSE_CACHE_SIZE,
    address_re,
    find_param,
    split_commas,
    split_params,
)
from clearip.relay.sip.uri import Uri, parse_uri


@dataclass(frozen=True, slots=True)
class Address:
    """One address: optional display name, the URI text, and header parameters.

    Immutable and memoised by its text (shared between messages): never change one."""

    display: str | None
    uri_text: str
    params: list[tuple[str, str | None]] = field(default_factory=list)
    angle: bool = True

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


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def parse_address(text: str) -> Address:
    """Parse one name-addr or addr-spec with parameters; raise SipParseError if malformed."""
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


def parse_address_list(value: str) -> list[Address]:
    """A comma-separated list of addresses (Contact, Route, Record-Route)."""
    return [parse_address(part) for part in split_commas(value)]
