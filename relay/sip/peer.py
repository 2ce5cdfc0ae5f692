"""Who a message came from or goes to, and which of our addresses it uses.

Rules of this module:

- A :class:`Peer` or :class:`LocalAddress` is a value: compared and hashed by its fields, never
  changed after it is made (make another). They are plain compiled classes, not dataclasses:
  several are made per message, and under mypyc a dataclass's generated ``__init__`` stays
  interpreted (about ten times the cost).
- Where responses go (:func:`response_peer`) is RFC 3261 §18.2.2, decided here once.
"""

from __future__ import annotations

from typing import Final, final

from clearip.relay.sip.message import Request

STREAM_TRANSPORTS: Final = frozenset(("tcp", "tls"))


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@final
class Peer:
    """A remote SIP element: transport, address and port; ``conn`` names a stream connection."""

    def __init__(self, transport: str, host: str, port: int, conn: int | None = None) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.conn = conn

    @property
    def reliable(self) -> bool:
        return self.transport in STREAM_TRANSPORTS

    def without_conn(self) -> Peer:
        return Peer(self.transport, self.host, self.port)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Peer):
            return NotImplemented
        return (
            self.port == other.port
            and self.host == other.host
            and self.transport == other.transport
            and self.conn == other.conn
        )

    def __hash__(self) -> int:
        return hash((self.transport, self.host, self.port, self.conn))

    def __repr__(self) -> str:
        return (
            f"Peer(transport={self.transport!r}, host={self.host!r}, port={self.port!r}, "
            f"conn={self.conn!r})"
        )

    def __str__(self) -> str:
        return f"{self.transport}:{_bracketed(self.host)}:{self.port}"


@final
class LocalAddress:
    """A bound listener: what we put in Via and Record-Route for this transport."""

    def __init__(self, transport: str, host: str, port: int) -> None:
        self.transport = transport
        self.host = host
        self.port = port

    def hostport(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LocalAddress):
            return NotImplemented
        return (
            self.port == other.port
            and self.host == other.host
            and self.transport == other.transport
        )

    def __hash__(self) -> int:
        return hash((self.transport, self.host, self.port))

    def __repr__(self) -> str:
        return f"LocalAddress(transport={self.transport!r}, host={self.host!r}, port={self.port!r})"


def response_peer(request: Request, source: Peer) -> Peer:
    """Where responses to ``request``, received from ``source``, go (RFC 3261 §18.2.2).

    Streams: back on the request's connection (``conn``); if that is gone, a new connection to
    the source address and the Via's sent-by port. UDP: see :meth:`Via.response_address` (the
    sent-by port unless the client asked for ``rport``; ``maddr`` when present).
    """
    host, port = request.top_via.response_address((source.host, source.port))
    if source.reliable:
        return Peer(source.transport, source.host, port, source.conn)
    return Peer("udp", host, port)
