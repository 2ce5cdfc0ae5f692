"""The Via header (RFC 3261 §20.42, §18.2.1; RFC 3581 rport)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import PARSE_CACHE_SIZE, find_param, split_params, via_re

MAGIC_COOKIE = "z9hG4bK"
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061, "sctp": 5060, "ws": 80, "wss": 443}


@dataclass(slots=True)
class Via:
    transport: str
    host: str
    port: int | None
    params: list[tuple[str, str | None]] = field(default_factory=list)

    def param(self, name: str) -> str | None:
        return find_param(self.params, name)

    def set_param(self, name: str, value: str | None) -> None:
        lname = name.lower()
        for index, (key, _) in enumerate(self.params):
            if key.lower() == lname:
                self.params[index] = (key, value)
                return
        self.params.append((name, value))

    @property
    def branch(self) -> str | None:
        return self.param("branch")

    @property
    def sent_by(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    def response_address(self) -> tuple[str, int]:
        """Where a response goes (§18.2.2 with RFC 3581): received/rport over sent-by."""
        host = self.param("received") or self.host
        rport = self.param("rport")
        if rport:
            port = int(rport)
        elif self.port is not None:
            port = self.port
        else:
            port = DEFAULT_PORTS.get(self.transport.lower(), 5060)
        return (host[1:-1] if host.startswith("[") else host), port

    def __str__(self) -> str:
        out = ["SIP/2.0/", self.transport.upper(), " ", self.sent_by]
        for name, value in self.params:
            out += [";", name] if value is None else [";", name, "=", value]
        return "".join(out)


def parse_via(text: str) -> Via:
    """A Via value as a new (editable) :class:`Via`; raises SipParseError if malformed."""
    transport, host, port, params = via_fields(text)
    return Via(transport, host, port, list(params))


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def via_fields(text: str) -> tuple[str, str, int | None, tuple[tuple[str, str | None], ...]]:
    """The parts of a Via value, memoised (a call's Vias recur in all its responses)."""
    m = via_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed Via {text.strip()[:60]!r}", "via")
    transport, host, port, params = m.groups()
    port_number = int(port) if port else None
    if port_number is not None and not 0 < port_number <= 65535:
        raise SipParseError("Via port out of range", "via")
    return transport, host, port_number, tuple(split_params(params))
