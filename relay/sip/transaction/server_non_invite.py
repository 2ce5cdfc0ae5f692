"""Non-INVITE server transaction (RFC 3261 §17.2.2): the BYE, CANCEL, OPTIONS... we answer.

Rules:

- Created in Trying when the request arrives; the caller hands the request to the TU itself.
- Trying: a retransmitted request is absorbed (nothing has been sent to repeat).
- Trying or Proceeding: a 1xx from the TU is sent and moves to (or stays in) Proceeding; a
  final (200-699) is sent and moves to Completed.
- Proceeding and Completed: a retransmitted request is answered with the latest response sent.
- Completed lasts Timer J (64*T1 over UDP, zero on reliable transports: terminated at once);
  further responses from the TU are dropped.
- A transport error while sending (Proceeding, Completed) → TransportError, Terminated. One in
  Trying, where nothing was sent, is honoured the same way rather than ignored, so a caller
  that reports it never keeps a dead transaction.

Theory of operation: the table is the whole machine (see :mod:`base`); anything outside it is
ignored.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.message import Request
from clearip.relay.sip.transaction.actions import Action
from clearip.relay.sip.transaction.base import EVENT_REQUEST, Table, compile_table
from clearip.relay.sip.transaction.sides import ServerMachine


class ServerNonInviteState(Enum):
    TRYING = auto()
    PROCEEDING = auto()
    COMPLETED = auto()
    TERMINATED = auto()


S = ServerNonInviteState


class ServerNonInviteTransaction(ServerMachine):
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

    def _compiled(self) -> Table:
        return _TABLE

    def on_request(self, request: Request) -> list[Action]:
        """A retransmission of the request matched to this transaction."""
        if request.method != self.request.method:
            return []
        return self._fire(EVENT_REQUEST)

    # -- effects -------------------------------------------------------------------------------
    def _completed(self) -> list[Action]:
        return [
            *self._send(),
            *self._start_timer("J", 0.0 if self.reliable else self.timers.timer_j),
        ]


_TABLE = compile_table(ServerNonInviteTransaction, ServerNonInviteTransaction.TABLE, S.TRYING)
