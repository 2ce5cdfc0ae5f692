"""What a transaction asks of its caller. Transactions return lists of these; they never act.

The caller executes the actions in order. It sends on the transaction's own transport to its
peer (it knows both), keeps one pending timer per (transaction, name) and calls ``on_timer(name)``
when one fires, and drops the transaction and all its timers on :class:`Terminated`, which is
always the last action of a list.
"""

from __future__ import annotations

from dataclasses import dataclass

from clearip.relay.sip.message import Message, Request, Response


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send on the transaction's transport to its peer."""

    message: Message


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Start the named timer ("A" to "M"); starting one that is running replaces it."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    """Cancel the named timer if it is running."""

    name: str


@dataclass(frozen=True, slots=True)
class DeliverResponse:
    """Client transaction → TU: every 1xx, every 2xx (also retransmitted ones in Accepted,
    RFC 6026) and the first 300-699."""

    response: Response


@dataclass(frozen=True, slots=True)
class DeliverRequest:
    """Server transaction → TU: an ACK reaching an INVITE server transaction in Accepted
    (RFC 6026: it acknowledges the 2xx, which is the TU's business, not the transaction's).
    Retransmitted requests and the ACK for a 300-699 are absorbed and never delivered."""

    request: Request


@dataclass(frozen=True, slots=True)
class Timeout:
    """No final response (Timer B/F), or no ACK for our final (Timer H); always followed by
    Terminated, and given at most once per transaction."""


@dataclass(frozen=True, slots=True)
class TransportError:
    """The transport failed to send for this transaction (always followed by Terminated)."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over: forget it and cancel its timers."""


Action = (
    SendMessage
    | StartTimer
    | StopTimer
    | DeliverResponse
    | DeliverRequest
    | Timeout
    | TransportError
    | Terminated
)
