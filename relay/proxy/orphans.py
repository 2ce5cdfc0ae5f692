"""Answers to INVITEs whose call this process no longer has: the switch still gets a final.

Why: a call's state lives in one worker process. When that worker dies (or is restarted), the
answers to the INVITEs it relayed still come: ClearIP's 302 or 503, a carrier's 180, 200 or
486. They come to the restarted worker, or to another worker while it is away. Dropping them
leaves the switch with its 100 Trying and nothing else until its own timer gives up. Here such
a response is recognised by our stateful branch in its top Via (``routing.STATEFUL_PREFIX``,
our address). It goes on to the switch, whose Via is the next one:

- 1xx: absorbed (the switch already has our 100; a ringing indication is not worth a guess);
- 2xx: forwarded with our Via removed, so the switch gets the call. Its ACK and BYE reach the
  carrier through the Record-Route, as stateless loose routing already does;
- 3xx: this can only be ClearIP's redirect, and its Contacts were the dead call's to try.
  The switch gets our own 503 (fail-open, as when ClearIP does not answer) and routes the
  call directly;
- 4xx-6xx: forwarded with our Via removed (ClearIP's 403/404/503/603 and a carrier's 486 mean
  what they mean for the switch).

A 300-699 is also ACKed hop by hop to whoever sent it (RFC 3261 §17.1.1.3), which stops its
retransmissions. The Request-URI of the INVITE is gone with the call; the To URI stands in,
since the server transaction matches the ACK by its Via branch (§17.2.3). Each retransmission
of the final is handled the same way, and the switch's transaction absorbs the repeats.
"""

from __future__ import annotations

from typing import Final

from clearip.relay.sip.address import parse_address
from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request, Response, select_headers
from clearip.relay.sip.transaction.ack import in_transaction

#: What :func:`orphan_answer` did, the suffix of the ``orphan_response_*`` counters.
ABSORBED: Final = "absorbed"
FORWARDED: Final = "forwarded"
FAIL_OPEN: Final = "fail_open"

_KEPT = ("via", "from", "to", "call-id", "cseq")


def orphan_answer(response: Response) -> tuple[str, Response | None, Request | None]:
    """What to do with ``response``, an answer to one of our INVITEs whose call is gone (its
    top Via already known to be ours): ``(outcome, to_switch, ack)``. The
    response to the switch (None: nothing) carries the Vias below ours; the caller sends it
    where the first of them says (§18.2.2) and the ACK back to the response's sender."""
    status = response.status
    if status < 200:
        return ABSORBED, None, None
    below = response.copy()
    below.pop_first_value("via")
    if not below.get_all("via"):
        return ABSORBED, None, None  # no one below us: not an answer for a switch
    if status < 300:
        return FORWARDED, below, None
    ack = _ack(response)
    if status < 400:
        return FAIL_OPEN, _fail_open(below), ack
    return FORWARDED, below, ack


def _fail_open(below: Response) -> Response:
    """Our 503 for the switch in place of a redirect no call is left to follow."""
    reply = Response(503, "Service Unavailable", select_headers(below.headers, _KEPT, keep=True))
    reply.append("Reason", 'SIP;cause=503;text="call state lost in a restart (fail-open)"')
    reply.append("Server", "clearip-inline-proxy")
    reply.append("Content-Length", "0")
    return reply


def _ack(response: Response) -> Request | None:
    """The hop-by-hop ACK for a 300-699 (§17.1.1.3), without the INVITE."""
    to = response.get("to") or ""
    try:
        uri = parse_address(to).uri_text
        number = response.cseq[0]
    except SipParseError:
        return None
    # Our Via was the INVITE's only one towards the sender: the ACK's, as §17.1.1.3 says.
    return in_transaction(
        "ACK",
        uri,
        via=response.get_all("via")[0],
        routes=[],
        from_=response.get("from") or "",
        to=to,
        call_id=response.call_id,
        number=number,
    )
