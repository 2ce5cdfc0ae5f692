"""What the four transaction machines share: the transition table and its interpreter.

Each machine declares ``TABLE: dict[(state, event), (next_state, effect)]``. ``event`` is one
of :data:`EVENTS`; ``effect`` names a method of the machine that returns the actions of that
transition. :meth:`Machine._fire` looks the pair up, moves to ``next_state`` *before* running
the effect, and returns the effect's actions. A pair with no entry is ignored and returns no
actions: the RFC's "absorb", late timers, responses to a terminated transaction and anything
else out of place need no code, and nothing a peer sends can make a transaction raise. The
table is checked when the class is created (every event known, every effect a method), so a
typo fails at import rather than silently never matching.

Timers: effects start and stop them only through :meth:`Machine._start_timer` and
:meth:`Machine._stop_timers`, so the machine knows which are running. That gives three rules:

- Zero-duration timers (D, I, J, K on reliable transports) are never started: the timer's own
  table entry fires at once, so the transition to Terminated still goes through the table and
  the caller simply sees ``Terminated()`` at the end of the same action list.
- ``on_timer`` for a timer that is not running (stopped, replaced, or never started) is
  ignored, so a caller that cancels late cannot disturb the machine.
- The actions ending a transaction stop every timer still running before ``Terminated()``,
  so a caller that only honours ``StopTimer`` is left with no stray timers either.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, cast

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.actions import (
    Action,
    DeliverResponse,
    SendMessage,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
    TransportError,
)
from clearip.relay.sip.transaction.timers import TIMER_NAMES, TimerSettings

#: Responses received (client) or sent by the TU (server, prefixed ``send_``).
RESPONSE_EVENTS = ("1xx", "2xx", "3xx-6xx")

EVENTS = frozenset(
    {
        *RESPONSE_EVENTS,
        *(f"send_{event}" for event in RESPONSE_EVENTS),
        *(f"timer_{name}" for name in TIMER_NAMES),
        "transport_error",
        "request",  # a retransmission of the request that created a server transaction
        "ack",  # an ACK reaching an INVITE server transaction
    }
)


def response_event(response: Response) -> str:
    """``1xx``, ``2xx`` or ``3xx-6xx``; ``invalid`` (matches nothing) outside 100-699."""
    status = response.status
    if 100 <= status < 200:
        return "1xx"
    if 200 <= status < 300:
        return "2xx"
    if 300 <= status < 700:
        return "3xx-6xx"
    return "invalid"


class Machine:
    TABLE: ClassVar[dict[tuple[Any, str], tuple[Any, str]]] = {}

    state: Enum

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for (_, event), (_, effect) in cls.TABLE.items():
            if event not in EVENTS:
                raise TypeError(f"{cls.__name__}.TABLE: unknown event {event!r}")
            if not callable(getattr(cls, effect, None)):
                raise TypeError(f"{cls.__name__}.TABLE: no effect method {effect!r}")

    def __init__(self, *, reliable: bool, timers: TimerSettings) -> None:
        self.reliable = reliable
        self.timers = timers
        self._running: set[str] = set()

    @property
    def terminated(self) -> bool:
        return self.state.name == "TERMINATED"

    def on_timer(self, name: str) -> list[Action]:
        """A timer this transaction started has fired (one not running: no actions)."""
        if name not in self._running:
            return []
        self._running.discard(name)
        return self._fire(f"timer_{name}")

    def on_transport_error(self) -> list[Action]:
        """The transport failed to send something for this transaction."""
        return self._fire("transport_error")

    def _fire(self, event: str) -> list[Action]:
        entry = self.TABLE.get((self.state, event))
        if entry is None:
            return []
        self.state, effect = entry
        return cast(list[Action], getattr(self, effect)())

    def _start_timer(self, name: str, delay: float) -> list[Action]:
        """Start (or restart) a timer; one of zero duration fires now, through the table."""
        if delay > 0:
            self._running.add(name)
            return [StartTimer(name, delay)]
        self._running.discard(name)
        return self._fire(f"timer_{name}")

    def _stop_timers(self, *names: str) -> list[Action]:
        """Stop these timers (all running ones when none are named)."""
        stopping = sorted(self._running.intersection(names) if names else self._running)
        self._running.difference_update(stopping)
        return [StopTimer(name) for name in stopping]

    # Effects shared by every machine.
    def _terminate(self) -> list[Action]:
        return [*self._stop_timers(), Terminated()]

    def _timeout(self) -> list[Action]:
        return [*self._stop_timers(), Timeout(), Terminated()]

    def _transport_error(self) -> list[Action]:
        return [*self._stop_timers(), TransportError(), Terminated()]

    def _nothing(self) -> list[Action]:
        return []


class ClientMachine(Machine):
    """What both client machines share: the request, :meth:`start` and response delivery.

    ``RETRANSMIT``/``TIMEOUT`` name the machine's retransmission timer (A or E, UDP only) and
    its timeout timer (B or F); both first run for ``timers.t1`` and ``timers.timeout``.
    """

    RETRANSMIT: ClassVar[str] = ""
    TIMEOUT: ClassVar[str] = ""

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self._interval = timers.t1
        self._started = False
        self._response: Response | None = None

    def start(self) -> list[Action]:
        """Send the request; call once, right after creating the transaction."""
        if self._started or self.terminated:
            return []
        self._started = True
        actions: list[Action] = [SendMessage(self.request)]
        if not self.reliable:
            actions += self._start_timer(self.RETRANSMIT, self._interval)
        return actions + self._start_timer(self.TIMEOUT, self.timers.timeout)

    def on_response(self, response: Response) -> list[Action]:
        """A response matched to this transaction (:func:`matching.client_key`)."""
        self._response = response
        return self._fire(response_event(response))

    def _deliver(self) -> list[Action]:
        assert self._response is not None
        return [DeliverResponse(self._response)]


class ServerMachine(Machine):
    """What both server machines share: the request and sending the TU's responses."""

    def __init__(self, request: Request, *, reliable: bool, timers: TimerSettings) -> None:
        super().__init__(reliable=reliable, timers=timers)
        self.request = request
        self._last: Response | None = None  # the latest response sent
        self._outgoing: Response | None = None

    def send_response(self, response: Response) -> list[Action]:
        """A response from the TU."""
        self._outgoing = response
        return self._fire("send_" + response_event(response))

    def _send(self) -> list[Action]:
        assert self._outgoing is not None
        self._last = self._outgoing
        return [SendMessage(self._outgoing)]

    def _resend_last(self) -> list[Action]:
        return [SendMessage(self._last)] if self._last is not None else []
