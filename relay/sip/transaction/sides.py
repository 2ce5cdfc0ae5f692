"""What the two client machines share, and what the two server machines share.

Rules of this module:

- A client machine sends its request in :meth:`ClientMachine.start` (once, right after it is
  created) and starts its timeout timer (B or F, 64*T1); over UDP also its retransmission
  timer (A or E), whose interval starts at T1 and is kept in ``_interval`` for the machine's
  effects to grow. A response matched to it becomes the event of its class (1xx, 2xx,
  3xx-6xx); a status outside 100-699 is no event at all.
- A server machine sends only what its TU gives it (:meth:`ServerMachine.send_response`),
  each response the event ``send_`` + its class; it remembers the latest one sent, which a
  retransmitted request is answered with.
- Keys: a client transaction is keyed by :func:`client_key_for` of its request, a server one
  by :func:`server_key`, unless the caller passes the key it made already.

Theory of operation: both are :class:`base.Machine` (the table interpreter); each concrete
machine adds its TABLE, the effects it names, and ``_compiled`` returning that table compiled.
"""

from __future__ import annotations

from typing import ClassVar

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.actions import Action, DeliverResponse, SendMessage
from clearip.relay.sip.transaction.base import EVENT_1XX, EVENT_SEND_1XX, Machine
from clearip.relay.sip.transaction.matching import TransactionKey, client_key_for, server_key


class ClientMachine(Machine):
    """What both client machines share: :meth:`start` and response delivery.

    ``RETRANSMIT``/``TIMEOUT`` name the machine's retransmission timer (A or E, UDP only) and
    its timeout timer (B or F); both first run for ``timers.t1`` and ``timers.timeout``.
    """

    RETRANSMIT: ClassVar[str] = ""
    TIMEOUT: ClassVar[str] = ""
    _interval: float = 0.0  # the retransmission timer's interval, from start()
    _started: bool = False
    _response: Response | None = None  # the response being handled

    def _key_for(self, request: Request) -> TransactionKey:
        return client_key_for(request)

    def start(self) -> list[Action]:
        """Send the request; call once, right after creating the transaction."""
        if self._started or self.terminated:
            return []
        self._started = True
        self._interval = self.timers.t1
        actions: list[Action] = [SendMessage(self.request)]
        if not self.reliable:
            actions += self._start_timer(self.RETRANSMIT, self._interval)
        return actions + self._start_timer(self.TIMEOUT, self.timers.timeout)

    def on_response(self, response: Response) -> list[Action]:
        """A response matched to this transaction (:func:`matching.client_key`)."""
        self._response = response
        return self._fire_response(EVENT_1XX, response)

    def _deliver(self) -> list[Action]:
        assert self._response is not None
        return [DeliverResponse(self._response)]


class ServerMachine(Machine):
    """What both server machines share: sending the TU's responses, resending the latest."""

    _last: Response | None = None  # the latest response sent
    _outgoing: Response | None = None  # the TU's response being handled

    def _key_for(self, request: Request) -> TransactionKey:
        return server_key(request)

    def send_response(self, response: Response) -> list[Action]:
        """A response from the TU."""
        self._outgoing = response
        return self._fire_response(EVENT_SEND_1XX, response)

    def _send(self) -> list[Action]:
        assert self._outgoing is not None
        self._last = self._outgoing
        return [SendMessage(self._outgoing)]

    def _resend_last(self) -> list[Action]:
        return [SendMessage(self._last)] if self._last is not None else []
