"""Non-INVITE client transaction (RFC 3261 §17.1.2): the BYE, CANCEL, OPTIONS... we send.

Rules:

- :meth:`start` sends the request and starts Timer F (64*T1); over UDP it also starts Timer E
  (T1).
- Trying: Timer E resends the request and restarts with ``min(2*E, T2)``; a 1xx goes to the TU
  and moves to Proceeding.
- Proceeding: every 1xx goes to the TU; Timer E resends the request and restarts with T2
  (flat, whatever its previous value).
- Trying or Proceeding: Timer F → Timeout to the TU, Terminated; a final response (200-699)
  goes to the TU and moves to Completed, where Timer K (T4 over UDP, zero on reliable
  transports: terminated at once) absorbs response retransmissions.
- A transport error while the request can still be (re)sent → TransportError, Terminated.

Theory of operation: as in :mod:`client_invite`, the table is the whole machine and anything
outside it (a response in Completed, a late Timer E) is ignored.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.transaction.actions import Action, SendMessage
from clearip.relay.sip.transaction.base import Table, compile_table
from clearip.relay.sip.transaction.sides import ClientMachine


class ClientNonInviteState(Enum):
    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


S = ClientNonInviteState


class ClientNonInviteTransaction(ClientMachine):
    RETRANSMIT = "E"
    TIMEOUT = "F"
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

    def _compiled(self) -> Table:
        return _TABLE

    # -- effects -------------------------------------------------------------------------------
    def _retransmit(self) -> list[Action]:
        self._interval = self.timers.backoff(self._interval)
        return [SendMessage(self.request), *self._start_timer("E", self._interval)]

    def _retransmit_t2(self) -> list[Action]:
        return [SendMessage(self.request), *self._start_timer("E", self.timers.t2)]

    def _completed(self) -> list[Action]:
        return [
            *self._stop_timers("E", "F"),
            *self._deliver(),
            *self._start_timer("K", 0.0 if self.reliable else self.timers.timer_k),
        ]


_TABLE = compile_table(ClientNonInviteTransaction, ClientNonInviteTransaction.TABLE, S.TRYING)
