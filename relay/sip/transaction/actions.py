"""What a transaction asks of its caller. Transactions return lists of these; they never act."""

from __future__ import annotations

from dataclasses import dataclass

from clearip.relay.sip.message import Message, Request, Response


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send on the transaction's transport to its peer."""

    message: Message


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Start (or restart) the named timer."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    name: str


@dataclass(frozen=True, slots=True)
class DeliverResponse:
    """Client transaction → TU."""

    response: Response


@dataclass(frozen=True, slots=True)
class DeliverRequest:
    """Server transaction → TU (not used by the INVITE machines: retransmissions and the
    ACK for a non-2xx are absorbed)."""

    request: Request


@dataclass(frozen=True, slots=True)
class Timeout:
    """No final response (Timer B/F), or no ACK for our final (Timer H)."""


@dataclass(frozen=True, slots=True)
class TransportError:
    """The transport failed to send for this transaction."""


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
