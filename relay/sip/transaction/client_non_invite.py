"""Non-INVITE client transaction (RFC 3261 §17.1.2): BYE, CANCEL, OPTIONS... that we send.

Theory of operation: sent at start; over UDP Timer E retransmits with doubling capped at T2
(and at T2 flat once a provisional arrived) until Timer F (64*T1) reports a timeout. The first
final response goes up and Completed absorbs retransmissions for Timer K (T4 on UDP, zero on
reliable transports).
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request, Response
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


class ClientNonInviteState(Enum):
    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


S = ClientNonInviteState


class ClientNonInviteTransaction(Machine):
    TABLE = {
        (S.TRYING, "timer_E"): (S.TRYING, "_retransmit"),
        (S.TRYING, "timer_F"): (S.TERMINATED, "_timeout"),
        (S.TRYING, "1xx"): (S.PROCEEDING, "_deliver"),
        (S.TRYING, "2xx"): (S.COMPLETED, "_completed"),
        (S.TRYING, "3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.TRYING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.PROCEEDING, "timer_E"): (S.PROCEEDING, "_retransmit_t2"),
        (S.PROCEEDING, "timer_F"): (S.TERMINATED, "_timeout"),
        (S.PROCEEDING, "1xx"): (S.PROCEEDING, "_deliver"),
        (S.PROCEEDING, "2xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.COMPLETED, "timer_K"): (S.TERMINATED, "_terminate"),
    }

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS
    ) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self.key: TransactionKey = client_key_for(request)
        self.state: ClientNonInviteState = S.TRYING
        self._interval = timers.t1
        self._response: Response | None = None

    def start(self) -> list[Action]:
        actions: list[Action] = [SendMessage(self.request)]
        if not self.reliable:
            actions.append(StartTimer("E", self._interval))
        actions.append(StartTimer("F", self.timers.timeout))
        return actions

    def on_response(self, response: Response) -> list[Action]:
        self._response = response
        return self._fire(response_event(response))

    def _retransmit(self) -> list[Action]:
        self._interval = min(self._interval * 2, self.timers.t2)
        return [SendMessage(self.request), StartTimer("E", self._interval)]

    def _retransmit_t2(self) -> list[Action]:
        return [SendMessage(self.request), StartTimer("E", self.timers.t2)]

    def _timeout(self) -> list[Action]:
        return [Timeout(), Terminated()]

    def _deliver(self) -> list[Action]:
        assert self._response is not None
        return [DeliverResponse(self._response)]

    def _completed(self) -> list[Action]:
        actions: list[Action] = [StopTimer("E"), StopTimer("F"), *self._deliver()]
        wait = self.timers.wait_t4(self.reliable)
        if wait <= 0:
            self.state = S.TERMINATED
            return [*actions, Terminated()]
        return [*actions, StartTimer("K", wait)]
