"""INVITE client transaction (RFC 3261 §17.1.1, with RFC 6026's Accepted state).

Rules:

- :meth:`start` sends the INVITE and starts Timer B (64*T1); over UDP it also starts Timer A
  (T1), which resends the INVITE and doubles on every firing (no cap).
- Calling: a 1xx → Proceeding (A and B stopped: from here the TU's own timer, Timer C in a
  proxy, bounds the wait); Timer B → Timeout to the TU, Terminated.
- Calling or Proceeding: every 1xx goes to the TU; a 2xx goes to the TU and moves to Accepted
  (Timer M, 64*T1); a 300-699 goes to the TU once, is ACKed here hop by hop
  (:func:`ack.ack_for`) and moves to Completed (Timer D: ``max(32, 64*T1)`` s over UDP, zero on
  reliable transports, where the transaction terminates at once).
- Completed: a retransmitted 300-699 is answered with the same ACK again and not delivered.
- Accepted (RFC 6026): every further 2xx, retransmitted or from another fork, goes to the TU,
  which ACKs it end to end; Timer M → Terminated.
- A transport error while the transaction can still send (Calling, Proceeding, Completed) →
  TransportError to the TU, Terminated.

Theory of operation: the table below is the whole state machine; each row names the effect
method that builds the actions of that transition (see :mod:`base`). Anything not in the table
(a 1xx after the final, a 300-699 in Accepted, a late Timer A) is ignored.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request
from clearip.relay.sip.transaction.ack import ack_for
from clearip.relay.sip.transaction.actions import Action, SendMessage
from clearip.relay.sip.transaction.base import Table, compile_table
from clearip.relay.sip.transaction.sides import ClientMachine


class ClientInviteState(Enum):
    CALLING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    ACCEPTED = auto()
    TERMINATED = auto()


S = ClientInviteState


class ClientInviteTransaction(ClientMachine):
    RETRANSMIT = "A"
    TIMEOUT = "B"
    _ack: Request | None = None  # the ACK of the 300-699 received
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

    def _compiled(self) -> Table:
        return _TABLE

    # -- effects -------------------------------------------------------------------------------
    def _retransmit(self) -> list[Action]:
        self._interval *= 2
        return [SendMessage(self.request), *self._start_timer("A", self._interval)]

    def _first_provisional(self) -> list[Action]:
        return [*self._stop_timers("A", "B"), *self._deliver()]

    def _accepted(self) -> list[Action]:
        return [
            *self._stop_timers("A", "B"),
            *self._deliver(),
            *self._start_timer("M", self.timers.timer_m),
        ]

    def _completed(self) -> list[Action]:
        assert self._response is not None
        self._ack = ack_for(self.request, self._response)
        return [
            *self._stop_timers("A", "B"),
            SendMessage(self._ack),
            *self._deliver(),
            *self._start_timer("D", 0.0 if self.reliable else self.timers.timer_d),
        ]

    def _resend_ack(self) -> list[Action]:
        assert self._ack is not None
        return [SendMessage(self._ack)]


_TABLE = compile_table(ClientInviteTransaction, ClientInviteTransaction.TABLE, S.CALLING)
