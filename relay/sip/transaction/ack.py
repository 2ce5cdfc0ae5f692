"""The hop-by-hop ACK for a 300-699 response (RFC 3261 §17.1.1.3)."""

from __future__ import annotations

from clearip.relay.sip.message import Request, Response


def ack_for(request: Request, response: Response) -> Request:
    """Same Request-URI, Call-ID, From and CSeq number as the INVITE; To from the response;
    one Via, the INVITE's top Via; the INVITE's Route headers."""
    ack = Request("ACK", request.uri_text)
    ack.append("Via", request.get_all("via")[0])
    for route in request.get_all("route"):
        ack.append("Route", route)
    ack.append("Max-Forwards", "70")
    ack.append("From", request.get("from") or "")
    ack.append("To", response.get("to") or "")
    ack.append("Call-ID", request.call_id)
    ack.append("CSeq", f"{request.cseq[0]} ACK")
    ack.append("Content-Length", "0")
    return ack
