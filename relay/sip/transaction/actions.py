"""What a transaction asks of its caller. Transactions return lists of these; they never act.

The caller executes the actions in order. It sends on the transaction's own transport to its
peer (it knows both), keeps one pending timer per (transaction, name) and calls ``on_timer(name)``
when one fires, and drops the transaction and all its timers on :class:`Terminated`, which is
always the last action of a list.
"""

from __future__ import annotations

from typing import Final, final

from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.record import Record

# Plain classes with a compiled __init__, not dataclasses (see clearip.relay.sip.record).


@final
class SendMessage(Record):
    """Send on the transaction's transport to its peer."""

    __slots__ = ("message",)
    FIELDS = ("message",)

    def __init__(self, message: Message) -> None:
        self.message: Final = message


@final
class StartTimer(Record):
    """Start the named timer ("A" to "M"); starting one that is running replaces it."""

    __slots__ = ("delay", "name")
    FIELDS = ("name", "delay")

    def __init__(self, name: str, delay: float) -> None:
        self.name: Final = name
        self.delay: Final = delay


@final
class StopTimer(Record):
    """Cancel the named timer if it is running."""

    __slots__ = ("name",)
    FIELDS = ("name",)

    def __init__(self, name: str) -> None:
        self.name: Final = name


@final
class DeliverResponse(Record):
    """Client transaction → TU: every 1xx, every 2xx (also retransmitted ones in Accepted,
    RFC 6026) and the first 300-699."""

    __slots__ = ("response",)
    FIELDS = ("response",)

    def __init__(self, response: Response) -> None:
        self.response: Final = response


@final
class DeliverRequest(Record):
    """Server transaction → TU: an ACK reaching an INVITE server transaction in Accepted
    (RFC 6026: it acknowledges the 2xx, which is the TU's business, not the transaction's).
    Retransmitted requests and the ACK for a 300-699 are absorbed and never delivered."""

    __slots__ = ("request",)
    FIELDS = ("request",)

    def __init__(self, request: Request) -> None:
        self.request: Final = request


@final
class Timeout(Record):
    """No final response (Timer B/F), or no ACK for our final (Timer H); always followed by
    Terminated, and given at most once per transaction."""

    __slots__ = ()


@final
class TransportError(Record):
    """The transport failed to send for this transaction (always followed by Terminated)."""

    __slots__ = ()


@final
class Terminated(Record):
    """The transaction is over: forget it and cancel its timers."""

    __slots__ = ()


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
