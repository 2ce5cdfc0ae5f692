"""Responses the proxy generates itself (RFC 3261 §8.2.6.2), like Kamailio's ``sl`` module."""

from __future__ import annotations

import hashlib

from clearip.relay.sip.message import Request, Response, select_headers

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
