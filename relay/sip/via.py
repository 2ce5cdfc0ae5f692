"""The Via header (RFC 3261 §20.42, §18.2.1; RFC 3581 rport)."""

from __future__ import annotations

from typing import Final, final

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.grammar import (
    COMPILED,
    digits_end,
    find_param,
    host_end,
    is_digits,
    is_host_name,
    is_token,
    params_end,
    simple_params,
    split_params,
    token_end,
    via_re,
)
from clearip.relay.sip.record import Record

MAGIC_COOKIE = "z9hG4bK"
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061, "sctp": 5060, "ws": 80, "wss": 443}
RELIABLE = frozenset(("tcp", "tls", "sctp", "ws", "wss"))
MAX_PORT: Final = 65535


@final
class Via(Record):
    """One Via value; editable (the proxy stamps ``received`` and ``rport`` in place)."""

    __slots__ = ("host", "params", "port", "transport")
    FIELDS = ("transport", "host", "port", "params")
    HASHABLE = False

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None,
        params: list[tuple[str, str | None]] | None = None,
    ) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params: list[tuple[str, str | None]] = [] if params is None else params

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
    """A Via value as a new (editable) :class:`Via`; raises SipParseError if malformed.

    Not memoised: a Via's branch is new in every transaction, so a cache keyed by the text
    would miss (and evict) on nearly every call.
    """
    via = _simple_via(text)
    if via is not None:
        return via
    m = via_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed Via {text.strip()[:60]!r}", "via")
    port = m.group(3)
    return Via(m.group(1), m.group(2), _port(port) if port else None, split_params(m.group(4)))


def check_via(text: str) -> None:
    """Raise SipParseError unless ``text`` is a well-formed Via value (what the parser checks
    for every Via; the object is built only when someone reads it)."""
    if _simple_via_ok(text) if COMPILED else _simple_via(text) is not None:
        return
    m = via_re.fullmatch(text)
    if m is None:
        raise SipParseError(f"malformed Via {text.strip()[:60]!r}", "via")
    port = m.group(3)
    if port:
        _port(port)


def _simple_via(text: str) -> Via | None:
    """``SIP/2.0/TRANSPORT host[:port]`` and ``;token[=token]`` parameters, with one space and
    no other whitespace, read with string methods (see :mod:`grammar`); None for any other
    shape, which ``via_re`` then decides."""
    if not text.startswith("SIP/2.0/"):
        return None
    space = text.find(" ", 8)
    if space < 0:
        return None
    transport = text[8:space]
    if not is_token(transport):
        return None
    semi = text.find(";", space)
    if semi < 0:
        hostport = text[space + 1 :]
        params: list[tuple[str, str | None]] | None = []
    else:
        hostport = text[space + 1 : semi]
        params = simple_params(text[semi:])
        if params is None:
            return None
    host, colon, port_text = hostport.partition(":")
    if not is_host_name(host):
        return None
    port: int | None = None
    if colon:
        if not is_digits(port_text, 5):
            return None
        port = _port(port_text)
    return Via(transport, host, port, params)


def _simple_via_ok(text: str) -> bool:
    """:func:`_simple_via` is not None, without building anything (compiled: a scan of the
    characters); raises as it does for a port out of range."""
    if not text.startswith("SIP/2.0/"):
        return False
    size = len(text)
    end = token_end(text, 8)
    if end == 8 or end >= size or ord(text[end]) != 32:  # the one space
        return False
    host = end + 1
    end = host_end(text, host)
    if end == host:
        return False
    if end < size and ord(text[end]) == 58:  # :port
        port_end = digits_end(text, end + 1)
        if not 0 < port_end - end - 1 <= 5:
            return False
        _port(text[end + 1 : port_end])
        end = port_end
    return params_end(text, end) == size


def _port(text: str) -> int:
    number = int(text)
    if not 0 < number <= MAX_PORT:
        raise SipParseError("Via port out of range", "via")
    return number
