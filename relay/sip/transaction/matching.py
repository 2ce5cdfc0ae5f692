"""Which transaction a message belongs to (RFC 3261 §17.1.3, §17.2.3, §9.2).

Keys are opaque, hashable values; two messages belong to the same transaction when their keys
are equal. Every function here reads the top Via and CSeq, so each raises
:class:`~clearip.relay.sip.errors.SipParseError` when those are missing or malformed.

Server side (§17.2.3), when the top Via branch starts with the magic cookie ``z9hG4bK``: the
branch, the sent-by of the top Via (host compared case-insensitively) and the method, ACK
counting as INVITE. Without the cookie (RFC 2543 peers) the key is the Request-URI (as text),
To tag, From tag, Call-ID, CSeq number, the whole top Via and the method, ACK as INVITE.

The RFC 2543 ACK is the awkward case: it matches its INVITE when everything above is equal
*except* the To tag, which must be the tag of the response the server transaction sent rather
than the INVITE's. A key cannot know that tag, so :func:`server_key` keys an ACK with an empty
To tag, as the ACK of an INVITE sent outside a dialog (the only INVITEs the proxy and the
emulator keep server transactions for), and :class:`ServerInviteTransaction` checks the ACK's
To tag against its final response itself. Limitation: the ACK for a 300-699 to an RFC 2543
re-INVITE (which carried a To tag) does not find its transaction through this key.

Client side (§17.1.3): the branch of the top Via (always ours) and the CSeq method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.via import MAGIC_COOKIE

#: A plain tuple of strings (which the garbage collector does not track): every live and
#: lingering transaction holds one, and so do the tables and timers that name it.
TransactionKey = tuple[str, ...]


def has_rfc3261_branch(message: Message) -> bool:
    """Whether the top Via branch carries the RFC 3261 magic cookie."""
    return (message.top_via.branch or "").startswith(MAGIC_COOKIE)


def _method_for_match(method: str) -> str:
    return "INVITE" if method == "ACK" else method


def _server_key(request: Request, method: str) -> TransactionKey:
    via = request.top_via
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return ("3261", branch, via.sent_by.lower(), method)
    to_tag = "" if request.method == "ACK" else (request.to_tag or "")
    return (
        "2543",
        request.uri_text,
        to_tag,
        request.from_tag or "",
        request.call_id,
        str(request.cseq[0]),
        str(via),
        method,
    )


def server_key(request: Request) -> TransactionKey:
    """The key of the server transaction ``request`` creates or belongs to (§17.2.3)."""
    return _server_key(request, _method_for_match(request.method))


def cancel_target_key(cancel: Request) -> TransactionKey:
    """The key of the INVITE server transaction a CANCEL refers to (§9.2): the CANCEL's own
    key with INVITE as the method (a CANCEL copies the INVITE's Via, URI, tags and CSeq
    number)."""
    return _server_key(cancel, "INVITE")


def client_key_for(request: Request) -> TransactionKey:
    """The key to register a client transaction under when it is created.

    An ACK maps to its INVITE's key: the ACK for a 300-699 is sent by (and a failure to send
    it belongs to) the INVITE client transaction.
    """
    return ("client", request.top_via.branch or "", _method_for_match(request.method))


def client_key(response: Response) -> TransactionKey:
    """The key of the client transaction a response belongs to (§17.1.3)."""
    return ("client", response.top_via.branch or "", response.cseq[1])


T = TypeVar("T")


class TransactionTable(Generic[T]):
    """Live transactions by key; the caller adds them and removes them on ``Terminated``."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[TransactionKey, T] = {}

    def add(self, key: TransactionKey, transaction: T) -> None:
        """Register a transaction (replacing any under the same key)."""
        self._entries[key] = transaction

    def get(self, key: TransactionKey) -> T | None:
        return self._entries.get(key)

    def remove(self, key: TransactionKey) -> T | None:
        """Forget a transaction; returns it, or None when there was none."""
        return self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[TransactionKey]:
        return iter(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())
