"""Non-INVITE server transaction (RFC 3261 §17.2.2).

Theory of operation: a retransmitted request is absorbed in Trying and answered with the last
response in Proceeding and Completed. The first final response moves to Completed, which lasts
Timer J (64*T1 on UDP, zero on reliable transports) to absorb retransmissions.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.actions import Action, SendMessage, StartTimer, Terminated
from clearip.relay.sip.transaction.base import Machine, response_event
from clearip.relay.sip.transaction.matching import TransactionKey, server_key
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TimerSettings


class ServerNonInviteState(Enum):
    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


S = ServerNonInviteState


class ServerNonInviteTransaction(Machine):
    TABLE = {
        (S.TRYING, "request"): (S.TRYING, "_nothing"),
        (S.TRYING, "send_1xx"): (S.PROCEEDING, "_send"),
        (S.TRYING, "send_2xx"): (S.COMPLETED, "_completed"),
        (S.TRYING, "send_3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.TRYING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.PROCEEDING, "request"): (S.PROCEEDING, "_resend_last"),
        (S.PROCEEDING, "send_1xx"): (S.PROCEEDING, "_send"),
        (S.PROCEEDING, "send_2xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "send_3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.COMPLETED, "request"): (S.COMPLETED, "_resend_last"),
        (S.COMPLETED, "timer_J"): (S.TERMINATED, "_terminate"),
        (S.COMPLETED, "transport_error"): (S.TERMINATED, "_transport_error"),
    }

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS
    ) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self.key: TransactionKey = server_key(request)
        self.state: ServerNonInviteState = S.TRYING
        self._last: Response | None = None
        self._outgoing: Response | None = None

    def on_request(self, request: Request) -> list[Action]:
        return self._fire("request")

    def send_response(self, response: Response) -> list[Action]:
        self._outgoing = response
        return self._fire("send_" + response_event(response))

    def _send(self) -> list[Action]:
        assert self._outgoing is not None
        self._last = self._outgoing
        return [SendMessage(self._outgoing)]

    def _resend_last(self) -> list[Action]:
        return [SendMessage(self._last)] if self._last is not None else []

    def _completed(self) -> list[Action]:
        actions = self._send()
        wait = self.timers.timer_j(self.reliable)
        if wait <= 0:
            self.state = S.TERMINATED
            return [*actions, Terminated()]
        return [*actions, StartTimer("J", wait)]
