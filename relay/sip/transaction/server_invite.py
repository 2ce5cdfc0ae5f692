"""INVITE server transaction (RFC 3261 §17.2.1, with RFC 6026's Accepted state).

Rules:

- Created in Proceeding when an INVITE arrives; the caller hands the INVITE to the TU itself.
  The TU is responsible for the 100 (Trying): §17.2.1 lets the transaction skip its own when
  the TU answers within 200 ms, and the proxy sends one at once through
  :meth:`send_response`, so this machine has no automatic-100 timer.
- Proceeding: each 1xx from the TU is sent; a retransmitted INVITE is answered with the latest
  1xx sent (nothing when none was sent yet).
- A 2xx from the TU is sent and moves to Accepted (RFC 6026), which lasts Timer L (64*T1):
  further 2xx from the TU (retransmissions, other forks) are sent, retransmitted INVITEs are
  absorbed, and an ACK is passed up to the TU (:class:`DeliverRequest`): it acknowledges the
  2xx and belongs to the TU, not to this transaction.
- A 300-699 from the TU is sent and moves to Completed: Timer H (64*T1) and, over UDP, Timer G
  (T1, then ``min(2*G, T2)``), which resends the final. A retransmitted INVITE gets the final
  again. The ACK moves to Confirmed, stopping G and H; Timer H first → Timeout to the TU,
  Terminated.
- Confirmed absorbs ACK and INVITE retransmissions for Timer I (T4 over UDP, zero on reliable
  transports: terminated at once).
- A transport error while sending (Proceeding, Completed, Accepted) → TransportError,
  Terminated. Responses from the TU that do not fit the state (a 1xx after the final, a second
  300-699) are dropped.

ACK matching: with an RFC 3261 branch the key alone decides (:mod:`matching`). For an RFC 2543
INVITE the ACK must also carry the To tag of the 300-699 sent; one that does not is not for
this transaction and is ignored (the caller's key cannot see that tag).

Theory of operation: the table is the whole machine (see :mod:`base`); anything outside it is
ignored.
"""

from __future__ import annotations

from enum import Enum, auto

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Message, Request, Response
from clearip.relay.sip.transaction.actions import Action, DeliverRequest
from clearip.relay.sip.transaction.base import EVENT_ACK, EVENT_REQUEST, Table, compile_table
from clearip.relay.sip.transaction.matching import has_rfc3261_branch
from clearip.relay.sip.transaction.sides import ServerMachine


class ServerInviteState(Enum):
    PROCEEDING = auto()
    COMPLETED = auto()
    CONFIRMED = auto()
    ACCEPTED = auto()
    TERMINATED = auto()


S = ServerInviteState


class ServerInviteTransaction(ServerMachine):
    _interval: float = 0.0  # Timer G's interval, from the 300-699 sent
    _final: Response | None = None  # the 300-699 sent, kept for an RFC 2543 ACK's To tag
    _ack: Request | None = None  # the ACK being handled
    TABLE = {
        (S.PROCEEDING, "request"): (S.PROCEEDING, "_resend_last"),
        (S.PROCEEDING, "send_1xx"): (S.PROCEEDING, "_send"),
        (S.PROCEEDING, "send_2xx"): (S.ACCEPTED, "_accepted"),
        (S.PROCEEDING, "send_3xx-6xx"): (S.COMPLETED, "_completed"),
        (S.PROCEEDING, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.COMPLETED, "request"): (S.COMPLETED, "_resend_last"),
        (S.COMPLETED, "ack"): (S.CONFIRMED, "_confirmed"),
        (S.COMPLETED, "timer_G"): (S.COMPLETED, "_retransmit_final"),
        (S.COMPLETED, "timer_H"): (S.TERMINATED, "_timeout"),
        (S.COMPLETED, "transport_error"): (S.TERMINATED, "_transport_error"),
        (S.CONFIRMED, "timer_I"): (S.TERMINATED, "_terminate"),
        (S.ACCEPTED, "send_2xx"): (S.ACCEPTED, "_send"),
        (S.ACCEPTED, "ack"): (S.ACCEPTED, "_deliver_ack"),
        (S.ACCEPTED, "timer_L"): (S.TERMINATED, "_terminate"),
        (S.ACCEPTED, "transport_error"): (S.TERMINATED, "_transport_error"),
    }

    def _compiled(self) -> Table:
        return _TABLE

    def on_request(self, request: Request) -> list[Action]:
        """A retransmitted INVITE or an ACK matched to this transaction."""
        if request.method == "ACK":
            final = self._final
            if final is not None and _to_tag(request) != _to_tag(final):
                return []
            self._ack = request
            return self._fire(EVENT_ACK)
        if request.method == "INVITE":
            return self._fire(EVENT_REQUEST)
        return []

    # -- effects -------------------------------------------------------------------------------
    def _accepted(self) -> list[Action]:
        return [*self._send(), *self._start_timer("L", self.timers.timer_l)]

    def _completed(self) -> list[Action]:
        actions = self._send()
        if not has_rfc3261_branch(self.request):  # its ACK must carry this final's To tag
            self._final = self._last
        self._interval = self.timers.timer_g
        if not self.reliable:
            actions += self._start_timer("G", self._interval)
        return actions + self._start_timer("H", self.timers.timer_h)

    def _retransmit_final(self) -> list[Action]:
        self._interval = self.timers.backoff(self._interval)
        return [*self._resend_last(), *self._start_timer("G", self._interval)]

    def _confirmed(self) -> list[Action]:
        return [
            *self._stop_timers("G", "H"),
            *self._start_timer("I", 0.0 if self.reliable else self.timers.timer_i),
        ]

    def _deliver_ack(self) -> list[Action]:
        assert self._ack is not None
        return [DeliverRequest(self._ack)]


def _to_tag(message: Message) -> str | None:
    try:
        return message.to_tag
    except SipParseError:
        return None


_TABLE = compile_table(ServerInviteTransaction, ServerInviteTransaction.TABLE, S.PROCEEDING)
