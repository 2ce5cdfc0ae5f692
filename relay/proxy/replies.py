"""Responses the proxy generates itself (RFC 3261 §8.2.6.2), like Kamailio's ``sl`` module:
the response itself (:func:`make_reply`), sent without a transaction (:func:`reply_stateless`),
and the answers to requests for the proxy itself (OPTIONS, other methods: 405).
"""

from __future__ import annotations

import hashlib
from typing import Final

from clearip.relay.proxy.effects import Effect, Send
from clearip.relay.sip.message import Request, Response, select_headers
from clearip.relay.sip.peer import Peer, response_peer

#: The methods we relay (OPTIONS and 405 answers list them).
ALLOW: Final = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, PRACK, INFO, NOTIFY, REFER, MESSAGE"
_OPTIONS_HEADERS: Final = [("Allow", ALLOW), ("Accept", "application/sdp")]
_ALLOW_HEADERS: Final = [("Allow", ALLOW)]

# Headers copied from a request into a response made for it (§8.2.6.2).
_COPIED = ("via", "from", "call-id", "cseq")


def local_to_tag(request: Request) -> str:
    """A To tag that is the same for retransmissions of the same request. Made from the raw
    values, so that a request missing From or CSeq can still be answered (400)."""
    text = f"{request.call_id}|{request.get('from') or ''}|{request.get('cseq') or ''}"
    seed = text.encode("utf-8", "surrogateescape")
    return "cl" + hashlib.blake2s(seed, digest_size=6).hexdigest()


def make_reply(
    request: Request,
    status: int,
    reason: str,
    *,
    extra: list[tuple[str, str]] | None = None,
    add_to_tag: bool = True,
    server: str = "clearip-inline-proxy",
) -> Response:
    headers = select_headers(request.headers, _COPIED, keep=True)
    to_value = request.get("to") or ""
    if add_to_tag and status > 100 and ";tag=" not in to_value.replace(" ", "").lower():
        to_value = f"{to_value};tag={local_to_tag(request)}"
    # Keep the To header where the request had it relative to the others: simplest is after From.
    headers.append(("To", "to", to_value, None))
    response = Response(status, reason, headers)
    for name, value in extra or ():
        response.append(name, value)
    response.append("Server", server)
    response.append("Content-Length", "0")
    return response


def reply_stateless(
    request: Request,
    peer: Peer,
    status: int,
    reason: str,
    extra: list[tuple[str, str]] | None = None,
) -> list[Effect]:
    """Our response to ``request`` (from ``peer``), sent where its Via says (§18.2.2), with no
    transaction: a retransmitted request is simply answered again."""
    reply = make_reply(request, status, reason, extra=extra)
    return [Send(reply, response_peer(request, peer))]


def options_reply(request: Request, peer: Peer, *, available: bool) -> list[Effect]:
    """An OPTIONS for the proxy itself: 200 with what we allow, or 503 when we are not
    ``available`` (ClearIP unreachable: switches can route around us)."""
    if available:
        return reply_stateless(request, peer, 200, "OK", extra=_OPTIONS_HEADERS)
    return reply_stateless(request, peer, 503, "ClearIP Unreachable")


def method_not_allowed(request: Request, peer: Peer) -> list[Effect]:
    """Any other request outside a dialog (not an INVITE): 405 with ``Allow``."""
    return reply_stateless(request, peer, 405, "Method Not Allowed", extra=_ALLOW_HEADERS)
