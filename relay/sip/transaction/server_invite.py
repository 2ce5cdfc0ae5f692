"""INVITE server transaction (RFC 3261 §17.2.1, with RFC 6026's Accepted state).

Theory of operation: created when an INVITE arrives; the TU (the proxy) sends 100 Trying at
once through :meth:`send_response`, so no 200 ms automatic 100 is needed here. A retransmitted
INVITE is answered with the last response sent. A 2xx moves to Accepted: further 2xx from the
TU pass through and retransmitted INVITEs are absorbed until Timer L. A 300-699 moves to
Completed: over UDP Timer G resends it (doubling, capped at T2) until the ACK arrives
(Confirmed, absorbing for Timer I) or Timer H (64*T1) gives up and tells the TU.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.actions import (
    Action,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
)
from clearip.relay.sip.transaction.base import Machine, response_event
from clearip.relay.sip.transaction.matching import TransactionKey, server_key
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TimerSettings


class ServerInviteState(Enum):
    PROCEEDING = auto()
    COMPLETED = auto()
    CONFIRMED = auto()
    ACCEPTED = auto()
    TERMINATED = auto()


S = ServerInviteState


class ServerInviteTransaction(Machine):
    TABLE = {
        (S.PROCEEDING, "invite"): (S.PROCEEDING, "_resend_last"),
        (S.PROCEEDING, "send_1xx"): (S.PROCEEDING, "_send"),
        (S.PROCEEDING, "send_2xx"): (S.ACCEPTED, "_accepted"),
        (S.PROCEEDING, "send_3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.COMPLETED, "invite"): (S.COMPLETED, "_resend_last"),
        (S.COMPLETED, "timer_G"): (S.COMPLETED, "_retransmit_final"),
        (S.COMPLETED, "timer_H"): (S.TERMINATED, "_timeout"),
        (S.COMPLETED, "ack"): (S.CONFIRMED, "_confirmed"),
        (S.COMPLETED, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.CONFIRMED, "timer_I"): (S.TERMINATED, "_terminate"),
        (S.ACCEPTED, "send_2xx"): (S.ACCEPTED, "_send"),
        (S.ACCEPTED, "timer_L"): (S.TERMINATED, "_terminate"),
        (S.ACCEPTED, "transport_error"): (S.TERMINATED, "_transport_error"),
    }

    def __init__(
        self, request: Request, *, reliable: bool, timers: TimerSettings = DEFAULT_TIMERS
    ) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self.key: TransactionKey = server_key(request)
        self.state: ServerInviteState = S.PROCEEDING
        self._interval = timers.t1
        self._last: Response | None = None
        self._outgoing: Response | None = None

    def on_request(self, request: Request) -> list[Action]:
        return self._fire("ack" if request.method == "ACK" else "invite")

    def send_response(self, response: Response) -> list[Action]:
        self._outgoing = response
        return self._fire("send_" + response_event(response))

    def _send(self) -> list[Action]:
        assert self._outgoing is not None
        self._last = self._outgoing
        return [SendMessage(self._outgoing)]

    def _resend_last(self) -> list[Action]:
        return [SendMessage(self._last)] if self._last is not None else []

    def _accepted(self) -> list[Action]:
        return [*self._send(), StartTimer("L", self.timers.timeout)]

    def _completed(self) -> list[Action]:
        actions = self._send()
        if not self.reliable:
            actions.append(StartTimer("G", self._interval))
        actions.append(StartTimer("H", self.timers.timeout))
        return actions

    def _retransmit_final(self) -> list[Action]:
        self._interval = min(self._interval * 2, self.timers.t2)
        return [*self._resend_last(), StartTimer("G", self._interval)]

    def _timeout(self) -> list[Action]:
        return [StopTimer("G"), Timeout(), Terminated()]

    def _confirmed(self) -> list[Action]:
        actions: list[Action] = [StopTimer("G"), StopTimer("H")]
        wait = self.timers.wait_t4(self.reliable)
        if wait <= 0:
            self.state = S.TERMINATED
            return [*actions, Terminated()]
        return [*actions, StartTimer("I", wait)]
