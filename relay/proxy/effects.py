"""Effects: the only way the sans-IO core acts on the world.

The core returns lists of these; the asyncio shell performs them. Timer keys are typed values
(:mod:`timerkeys`), hashable; re-starting a key replaces the running timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, final

from clearip.relay.proxy.timerkeys import TimerKey
from clearip.relay.sip.message import Message
from clearip.relay.sip.peer import Peer
from clearip.relay.sip.record import Record

# Plain classes with a compiled __init__, not dataclasses (see clearip.relay.sip.record).


@final
class Send(Record):
    __slots__ = ("message", "peer")
    FIELDS = ("message", "peer")

    def __init__(self, message: Message, peer: Peer) -> None:
        self.message: Final = message
        self.peer: Final = peer


@final
class StartTimer(Record):
    __slots__ = ("delay", "key")
    FIELDS = ("key", "delay")

    def __init__(self, key: TimerKey, delay: float) -> None:
        self.key: Final = key
        self.delay: Final = delay


@final
class CancelTimer(Record):
    __slots__ = ("key",)
    FIELDS = ("key",)

    def __init__(self, key: TimerKey) -> None:
        self.key: Final = key


@final
class CallFinished(Record):
    """One summary line per call, written by the shell's logger. ``summary()`` builds it (the
    shell calls it only when someone reads it: a logger at INFO or a listener)."""

    __slots__ = ("summary",)
    FIELDS = ("summary",)

    def __init__(self, summary: Callable[[], dict[str, Any]]) -> None:
        self.summary: Final = summary


Effect = Send | StartTimer | CancelTimer | CallFinished
