"""Requests that belong to an INVITE's transaction: the hop-by-hop ACK for a 300-699
(RFC 3261 §17.1.1.3) and the CANCEL (§9.1). Both copy the INVITE's Request-URI, Call-ID, From,
CSeq number, top Via and Route headers; they differ in the method and where To comes from."""

from __future__ import annotations

from clearip.relay.sip.message import Request, Response


def in_transaction(
    method: str,
    uri: str,
    *,
    via: str,
    routes: list[str],
    from_: str,
    to: str,
    call_id: str,
    number: int,
) -> Request:
    """An ACK or CANCEL from its parts: one Via (the INVITE's top one), Max-Forwards 70, no
    body. :func:`ack_for` and :func:`cancel_for` take the parts from the INVITE; a proxy that
    lost the INVITE takes them from the response (``proxy/orphans.py``)."""
    request = Request(method, uri)
    request.append("Via", via)
    for route in routes:
        request.append("Route", route)
    request.append("Max-Forwards", "70")
    request.append("From", from_)
    request.append("To", to)
    request.append("Call-ID", call_id)
    request.append("CSeq", f"{number} {method}")
    request.append("Content-Length", "0")
    return request


def _same_transaction(invite: Request, method: str, to: str) -> Request:
    return in_transaction(
        method,
        invite.uri_text,
        via=invite.get_all("via")[0],
        routes=invite.get_all("route"),
        from_=invite.get("from") or "",
        to=to,
        call_id=invite.call_id,
        number=invite.cseq[0],
    )


def ack_for(request: Request, response: Response) -> Request:
    """The ACK for a 300-699 final (§17.1.1.3): To, with its tag, from the response.

    Request-URI, Call-ID, From and the CSeq number are the INVITE's, the only Via is the
    INVITE's top Via (so the ACK reaches the same server transaction), the INVITE's Route
    headers are kept, Max-Forwards is 70 and there is no body. A 2xx is ACKed end to end by
    the TU, never with this.
    """
    return _same_transaction(request, "ACK", response.get("to") or request.get("to") or "")


def cancel_for(invite: Request) -> Request:
    """The CANCEL for a pending INVITE: To as in the INVITE."""
    return _same_transaction(invite, "CANCEL", invite.get("to") or "")
