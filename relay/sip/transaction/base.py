"""What the four transaction machines share: a transition table and event classification.

Each machine declares ``TABLE: dict[(state, event), (next_state, effect)]`` where ``effect`` is
the name of a method returning actions. An event with no entry for the current state is ignored
(returns no actions): the RFC's "absorb" and late events need no special code, and nothing a
peer sends can make a transaction raise.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar

from clearip.relay.sip.message import Response
from clearip.relay.sip.transaction.actions import Action, Terminated, TransportError
from clearip.relay.sip.transaction.timers import TimerSettings


def response_event(response: Response) -> str:
    status = response.status
    if status < 200:
        return "1xx"
    if status < 300:
        return "2xx"
    return "3xx-6xx"


class Machine:
    TABLE: ClassVar[dict[tuple[Enum, str], tuple[Enum, str]]] = {}

    state: Enum

    def __init__(self, *, reliable: bool, timers: TimerSettings) -> None:
        self.reliable = reliable
        self.timers = timers

    def _fire(self, event: str) -> list[Action]:
        entry = self.TABLE.get((self.state, event))
        if entry is None:
            return []
        self.state, effect = entry
        actions: list[Action] = getattr(self, effect)()
        return actions

    def on_timer(self, name: str) -> list[Action]:
        return self._fire(f"timer_{name}")

    def on_transport_error(self) -> list[Action]:
        return self._fire("transport_error")

    def _transport_error(self) -> list[Action]:
        return [TransportError(), Terminated()]

    def _terminate(self) -> list[Action]:
        return [Terminated()]

    def _nothing(self) -> list[Action]:
        return []
