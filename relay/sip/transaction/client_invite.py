"""INVITE client transaction (RFC 3261 §17.1.1, with RFC 6026's Accepted state).

Theory of operation: the request is sent once at start; over UDP Timer A retransmits it,
doubling each time, until a response arrives or Timer B (64*T1) gives up and tells the TU.
Every provisional goes up. A 2xx goes up and moves to Accepted, where retransmitted 2xx keep
going up (the TU/proxy forwards each one) until Timer M. A 300-699 is ACKed here, hop by hop
(:func:`ack.ack_for`), goes up once, and Completed absorbs its retransmissions by resending the
ACK until Timer D (zero on reliable transports: terminated at once).
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.ack import ack_for
from clearip.relay.sip.transaction.actions import (
    Action,
    DeliverResponse,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
)
from clearip.relay.sip.transaction.base import Machine, response_event
from clearip.relay.sip.transaction.matching import TransactionKey, client_key_for
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TimerSettings


class ClientInviteState(Enum):
    CALLING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    ACCEPTED = auto()
    TERMINATED = auto()


S = ClientInviteState


class ClientInviteTransaction(Machine):
    TABLE = {
        (S.CALLING, "timer_A"): (S.CALLING, "_retransmit"),
        (S.CALLING, "timer_B"): (S.TERMINATED, "_timeout"),
        (S.CALLING, "1xx"): (S.PROCEEDING, "_first_provisional"),
        (S.CALLING, "2xx"): (S.ACCEPTED, "_accepted"),
        (S.CALLING, "3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.CALLING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.PROCEEDING, "1xx"): (S.PROCEEDING, "_deliver"),
        (S.PROCEEDING, "2xx"): (S.ACCEPTED, "_accepted"),
        (S.PROCEEDING, "3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.COMPLETED, "3xx-6xx"): (S.COMPLETED, "_resend_ack"),
        (S.COMPLETED, "timer_D"): (S.TERMINATED, "_terminate"),
        (S.COMPLETED, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.ACCEPTED, "2xx"): (S.ACCEPTED, "_deliver"),
        (S.ACCEPTED, "timer_M"): (S.TERMINATED, "_terminate"),
    }

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS
    ) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self.key: TransactionKey = client_key_for(request)
        self.state: ClientInviteState = S.CALLING
        self._interval = timers.t1
        self._response: Response | None = None
        self._ack: Request | None = None

    def start(self) -> list[Action]:
        actions: list[Action] = [SendMessage(self.request)]
        if not self.reliable:
            actions.append(StartTimer("A", self._interval))
        actions.append(StartTimer("B", self.timers.timeout))
        return actions

    def on_response(self, response: Response) -> list[Action]:
        self._response = response
        return self._fire(response_event(response))

    def _retransmit(self) -> list[Action]:
        self._interval *= 2
        return [SendMessage(self.request), StartTimer("A", self._interval)]

    def _timeout(self) -> list[Action]:
        return [Timeout(), Terminated()]

    def _deliver(self) -> list[Action]:
        assert self._response is not None
        return [DeliverResponse(self._response)]

    def _first_provisional(self) -> list[Action]:
        return [StopTimer("A"), StopTimer("B"), *self._deliver()]

    def _accepted(self) -> list[Action]:
        return [
            StopTimer("A"),
            StopTimer("B"),
            *self._deliver(),
            StartTimer("M", self.timers.timeout),
        ]

    def _completed(self) -> list[Action]:
        assert self._response is not None
        self._ack = ack_for(self.request, self._response)
        actions: list[Action] = [
            StopTimer("A"),
            StopTimer("B"),
            SendMessage(self._ack),
            *self._deliver(),
        ]
        wait = self.timers.timer_d(self.reliable)
        if wait <= 0:
            self.state = S.TERMINATED
            return [*actions, Terminated()]
        return [*actions, StartTimer("D", wait)]

    def _resend_ack(self) -> list[Action]:
        assert self._ack is not None
        return [SendMessage(self._ack)]
