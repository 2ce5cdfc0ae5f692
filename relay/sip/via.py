"""The Via header (RFC 3261 §20.42, §18.2.1; RFC 3581 rport)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import PARSE_CACHE_SIZE, find_param, split_params, via_re

MAGIC_COOKIE = "z9hG4bK"
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061, "sctp": 5060, "ws": 80, "wss": 443}
RELIABLE = frozenset(("tcp", "tls", "sctp", "ws", "wss"))


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

    def response_address(self, source: tuple[str, int] | None = None) -> tuple[str, int]:
        """Where a response to the request that carried this Via goes (RFC 3261 §18.2.2 with
        RFC 3581), given the address and port the request came from (``source``), if known.

        - reliable transports: the ``received`` address (else the source, else sent-by host)
          and the sent-by port (default of the transport): where to open a new connection
          when the request's connection is gone; ``rport`` does not apply (RFC 3581 §4);
        - unreliable: ``maddr`` with the sent-by port when present; otherwise the
          ``received`` address with the ``rport`` value when the client asked for rport, and
          the sent-by port (5060 when absent) when it did not. Never the source port alone:
          a switch that sends from one port and listens on another is answered where it
          listens.
        """
        transport = self.transport.lower()
        port = self.port if self.port is not None else DEFAULT_PORTS.get(transport, 5060)
        received = self.param("received")
        host = received or (source[0] if source is not None else self.host)
        if host.startswith("["):
            host = host[1:-1]
        if transport in RELIABLE:
            return host, port
        maddr = self.param("maddr")
        if maddr:
            return (maddr[1:-1] if maddr.startswith("[") else maddr), port
        rport = self.param("rport")
        if rport:
            if rport.isdigit():
                return host, int(rport)
        elif rport == "" and source is not None:  # asked for rport, not yet stamped
            return host, source[1]
        return host, port

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
