"""Which transaction a message belongs to (RFC 3261 §17.1.3, §17.2.3, §9.2).

Server side: with an RFC 3261 branch (magic cookie ``z9hG4bK``) the key is the branch, the
sent-by of the top Via and the method, ACK counting as INVITE. Without the cookie (RFC 2543
peers) the key is built from Request-URI, From tag, Call-ID, CSeq number and top Via; the To
tag is left out so that the ACK (which carries the tag of our response) matches its INVITE.
Client side: the branch of the top Via (ours) and the CSeq method.
"""

from __future__ import annotations

from dataclasses import dataclass

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.via import MAGIC_COOKIE


@dataclass(frozen=True, slots=True)
class TransactionKey:
    parts: tuple[str, ...]


def _method_for_match(method: str) -> str:
    return "INVITE" if method == "ACK" else method


def server_key(request: Request, method: str | None = None) -> TransactionKey:
    via = request.top_via
    branch = via.branch or ""
    wanted = _method_for_match(method or request.method)
    if branch.startswith(MAGIC_COOKIE):
        return TransactionKey(("3261", branch, via.sent_by.lower(), wanted))
    return TransactionKey(
        (
            "2543",
            request.uri_text,
            request.from_tag or "",
            request.call_id,
            str(request.cseq[0]),
            str(via),
            wanted,
        )
    )


def cancel_target_key(cancel: Request) -> TransactionKey:
    """The key of the INVITE server transaction a CANCEL refers to."""
    return server_key(cancel, method="INVITE")


def client_key_for(request: Request) -> TransactionKey:
    method = "INVITE" if request.method == "ACK" else request.method
    return TransactionKey(("client", request.top_via.branch or "", method))


def client_key(response: Response) -> TransactionKey:
    return TransactionKey(("client", response.top_via.branch or "", response.cseq[1]))


class TransactionTable(dict[TransactionKey, object]):
    """A dict of live transactions by key (kept trivial on purpose)."""
