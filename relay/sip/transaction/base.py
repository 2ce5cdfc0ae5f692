"""What the four transaction machines share: the transition table and its interpreter.

Each machine declares ``TABLE: dict[(state, event), (next_state, effect)]``. ``event`` is one
of :data:`EVENTS`; ``effect`` names a method of the machine that returns the actions of that
transition. :meth:`Machine._fire` looks the pair up, moves to ``next_state`` *before* running
the effect, and returns the effect's actions. A pair with no entry is ignored and returns no
actions: the RFC's "absorb", late timers, responses to a terminated transaction and anything
else out of place need no code, and nothing a peer sends can make a transaction raise. The
table is compiled and checked when the module is imported (:func:`compile_table`: every event
known, every effect a method), so a typo fails at import rather than silently never matching;
the interpreter then looks up one int per event (state and event numbers) and calls the
effect's method directly.

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

from collections.abc import Callable
from enum import Enum
from typing import ClassVar, Final, cast, final

from clearip.relay.sip.message import Request, Response
from clearip.relay.sip.transaction.actions import (
    Action,
    StartTimer,
    StopTimer,
    Terminated,
    Timeout,
    TransportError,
)
from clearip.relay.sip.transaction.matching import TransactionKey
from clearip.relay.sip.transaction.timers import DEFAULT_TIMERS, TIMER_NAMES, TimerSettings

#: Responses received (client) or sent by the TU (server, prefixed ``send_``).
RESPONSE_EVENTS = ("1xx", "2xx", "3xx-6xx")

#: Every event a table may name, by its number (what the interpreter dispatches on: an int
#: compares and hashes in C, where an Enum's hash runs Python code).
EVENT_NAMES: Final = (
    *RESPONSE_EVENTS,
    *(f"send_{event}" for event in RESPONSE_EVENTS),
    *(f"timer_{name}" for name in sorted(TIMER_NAMES)),
    "transport_error",
    "request",  # a retransmission of the request that created a server transaction
    "ack",  # an ACK reaching an INVITE server transaction
)
EVENTS = frozenset(EVENT_NAMES)
EVENT_CODES: Final = {name: code for code, name in enumerate(EVENT_NAMES)}
#: ``on_timer(name)`` -> the event code of ``timer_<name>``.
TIMER_EVENTS: Final = {name: EVENT_CODES[f"timer_{name}"] for name in TIMER_NAMES}
#: Timer name -> its bit in a machine's running-timers mask, and the names in bit order
#: (alphabetical: the order StopTimer actions come in).
_TIMER_ORDER: Final = tuple((name, 1 << index) for index, name in enumerate(sorted(TIMER_NAMES)))
_TIMER_BITS: Final = dict(_TIMER_ORDER)
EVENT_1XX: Final = 0
EVENT_SEND_1XX: Final = 3
EVENT_TRANSPORT_ERROR: Final = EVENT_CODES["transport_error"]
EVENT_REQUEST: Final = EVENT_CODES["request"]
EVENT_ACK: Final = EVENT_CODES["ack"]
_ROW: Final = 32  # > len(EVENT_NAMES): a (state, event) pair is state * _ROW + event

#: An effect: a machine's method returning the actions of a transition.
Effect = Callable[["Machine"], list[Action]]
#: A compiled row: the next state's number, the state itself, whether it is TERMINATED, and
#: the effect.
Transition = tuple[int, Enum, bool, Effect]


def _response_code(status: int) -> int:
    """The event number of a response's class (0, 1, 2), or -1 outside 100-699."""
    if 100 <= status < 700:
        return 0 if status < 200 else 1 if status < 300 else 2
    return -1


@final
class Table:
    """A machine's TABLE as the interpreter reads it (see :func:`compile_table`)."""

    __slots__ = ("initial", "initial_number", "transitions")

    def __init__(self, transitions: dict[int, Transition], initial: Enum) -> None:
        self.transitions: Final = transitions
        self.initial: Final = initial
        self.initial_number: Final = _number(initial)


def compile_table(
    cls: type[Machine], table: dict[tuple[Enum, str], tuple[Enum, str]], initial: Enum
) -> Table:
    """A machine's TABLE as the interpreter reads it: keys ``state * _ROW + event``, effects
    resolved to the methods, and the state machines start in. Checked here, at import, so a
    typo (unknown event, no such effect method) fails at once rather than silently never
    matching."""
    compiled: dict[int, Transition] = {}
    for (state, event), (next_state, effect) in table.items():
        code = EVENT_CODES.get(event)
        if code is None:
            raise TypeError(f"{cls.__name__}.TABLE: unknown event {event!r}")
        method = getattr(cls, effect, None)
        if not callable(method):
            raise TypeError(f"{cls.__name__}.TABLE: no effect method {effect!r}")
        compiled[_number(state) * _ROW + code] = (
            _number(next_state),
            next_state,
            next_state.name == "TERMINATED",
            cast(Effect, method),
        )
    return Table(compiled, initial)


def _number(state: Enum) -> int:
    return list(type(state)).index(state)


class Machine:
    """The interpreter of a transition table (see the module docstring).

    ``state`` is the machine's state enum member (what callers and tests read); the
    interpreter dispatches on ``_state``, its position in the enum. Every machine is created
    the same way (this ``__init__``): each concrete machine only says which compiled table it
    runs (``_compiled``), and its side (:mod:`sides`) how its request is keyed (``_key_for``).
    """

    TABLE: ClassVar[dict[tuple[Enum, str], tuple[Enum, str]]] = {}

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: TimerSettings = DEFAULT_TIMERS,
        key: TransactionKey | None = None,
    ) -> None:
        """``key``: the transaction's key for ``request`` (:meth:`_key_for`), when the caller
        made it already."""
        table = self._compiled()
        self.request = request
        self.key: TransactionKey = self._key_for(request) if key is None else key
        self.reliable = reliable
        self.timers = timers
        self._running = 0  # the timers running, as bits (_TIMER_BITS): no set per transaction
        self._table = table.transitions
        self.state: Enum = table.initial
        self._state = table.initial_number
        self._over = False

    def _compiled(self) -> Table:
        """The machine's own TABLE, compiled (each machine returns its module's)."""
        raise NotImplementedError

    def _key_for(self, request: Request) -> TransactionKey:
        """The transaction key of ``request`` (the client or the server one)."""
        raise NotImplementedError

    @property
    def terminated(self) -> bool:
        return self._over

    def on_timer(self, name: str) -> list[Action]:
        """A timer this transaction started has fired (one not running: no actions)."""
        bit = _TIMER_BITS.get(name, 0)
        if not self._running & bit:
            return []
        self._running &= ~bit
        return self._fire(TIMER_EVENTS[name])

    def on_transport_error(self) -> list[Action]:
        """The transport failed to send something for this transaction."""
        return self._fire(EVENT_TRANSPORT_ERROR)

    def _fire(self, event: int) -> list[Action]:
        entry = self._table.get(self._state * _ROW + event)
        if entry is None:
            return []
        self._state, self.state, self._over, effect = entry
        return effect(self)

    def _fire_response(self, first: int, response: Response) -> list[Action]:
        """Fire the event of ``response``'s class: ``first`` (its 1xx event) + 0, 1 or 2 for
        1xx, 2xx, 3xx-6xx; a status outside 100-699 is no event (no actions)."""
        code = _response_code(response.status)
        return self._fire(first + code) if code >= 0 else []

    def _start_timer(self, name: str, delay: float) -> list[Action]:
        """Start (or restart) a timer; one of zero duration fires now, through the table."""
        bit = _TIMER_BITS[name]
        if delay > 0:
            self._running |= bit
            return [StartTimer(name, delay)]
        self._running &= ~bit
        return self._fire(TIMER_EVENTS[name])

    def _stop_timers(self, *names: str) -> list[Action]:
        """Stop these timers (all running ones when none are named)."""
        stopping = self._running
        if names:
            mask = 0
            for name in names:
                mask |= _TIMER_BITS[name]
            stopping &= mask
        if not stopping:
            return []
        self._running &= ~stopping
        return [StopTimer(name) for name, bit in _TIMER_ORDER if stopping & bit]

    # Effects shared by every machine.
    def _terminate(self) -> list[Action]:
        return [*self._stop_timers(), Terminated()]

    def _timeout(self) -> list[Action]:
        return [*self._stop_timers(), Timeout(), Terminated()]

    def _transport_error(self) -> list[Action]:
        return [*self._stop_timers(), TransportError(), Terminated()]

    def _nothing(self) -> list[Action]:
        return []
