"""asyncio transports: UDP, TCP and TLS listeners and connections around the sans-IO stack."""

from clearip.relay.transport.endpoint import SipEndpoint, response_peer
from clearip.relay.transport.peer import ListenerSpec, LocalAddress, Peer

__all__ = ["ListenerSpec", "LocalAddress", "Peer", "SipEndpoint", "response_peer"]
