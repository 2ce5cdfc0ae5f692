"""Effects: the only way the sans-IO core acts on the world.

The core returns lists of these; the asyncio shell performs them. Timer keys are opaque and
hashable; re-starting a key replaces the running timer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clearip.relay.sip.message import Message
from clearip.relay.transport.peer import Peer


@dataclass(frozen=True, slots=True)
class Send:
    message: Message
    peer: Peer


@dataclass(frozen=True, slots=True)
class StartTimer:
    key: tuple[Any, ...]
    delay: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class CallFinished:
    """One summary line per call, written by the shell's logger. ``summary()`` builds it (the
    shell calls it only when someone reads it: a logger at INFO or a listener)."""

    summary: Callable[[], dict[str, Any]]


Effect = Send | StartTimer | CancelTimer | CallFinished
