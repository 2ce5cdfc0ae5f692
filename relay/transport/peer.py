"""Who a message came from or goes to, and what a listener binds."""

from __future__ import annotations

from dataclasses import dataclass

from clearip.relay.sip.message import Request

STREAM_TRANSPORTS = frozenset(("tcp", "tls"))


@dataclass(frozen=True, slots=True)
class Peer:
    """A remote SIP element: transport, address and port; ``conn`` names a stream connection."""

    transport: str
    host: str
    port: int
    conn: int | None = None

    @property
    def reliable(self) -> bool:
        return self.transport in STREAM_TRANSPORTS

    def without_conn(self) -> Peer:
        return Peer(self.transport, self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listening socket. ``advertise`` is the public address used in Via/Record-Route."""

    transport: str
    address: str
    port: int
    advertise: str | None = None
    certificate: str | None = None
    private_key: str | None = None


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """A bound listener: what we put in Via and Record-Route for this transport."""

    transport: str
    host: str
    port: int

    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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
