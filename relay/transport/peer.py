"""What a listener binds; and, re-exported from the SIP stack, who a message comes from or goes
to (:mod:`clearip.relay.sip.peer`)."""

from __future__ import annotations

from dataclasses import dataclass

from clearip.relay.sip.peer import STREAM_TRANSPORTS, LocalAddress, Peer, response_peer

__all__ = ["STREAM_TRANSPORTS", "ListenerSpec", "LocalAddress", "Peer", "response_peer"]


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listening socket. ``advertise`` is the public address used in Via/Record-Route."""

    transport: str
    address: str
    port: int
    advertise: str | None = None
    certificate: str | None = None
    private_key: str | None = None
