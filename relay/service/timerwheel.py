"""The daemon's call and transaction timers: one event-loop handle for all of them.

Why: a call starts about eleven timers and cancels as many (Timers A, B, D, L, M of its
transactions, Timer C, the ClearIP deadline), most of them cancelled long before they are due.
One event-loop handle each (allocated, inserted in the loop's heap, cancelled) was 5% of a
worker's time at 600 calls/s. Here a timer is two dictionary entries, and the loop holds one
handle: the next tick that has something due.

Rules of this module:

- Pure: no clock, no event loop. The caller passes deadlines and ``now`` in the same unit
  (the loop's clock), asks for the time of the next tick, and wakes then.
- Timers are grouped in ticks of ``resolution`` seconds and fire at the end of their tick:
  never early, at most ``resolution`` late. SIP's timers are multiples of T1 (500 ms), so the
  default 10 ms changes nothing a peer can see.
- One timer per key: starting a key that runs restarts it; cancelling an absent key is a
  no-op (the core cancels timers that may have fired already).
- :meth:`pop_due` hands out one key at a time, so a timer cancelled or restarted by the
  handling of another one due in the same tick is not fired.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

RESOLUTION = 0.01


class TimerWheel(Generic[K]):
    """Timers keyed by ``K``, bucketed by tick; see the module docstring."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._tick_of: dict[K, int] = {}  # key -> its tick
        self._slots: dict[int, dict[K, None]] = {}  # tick -> its keys, in start order
        self._ticks: list[int] = []  # heap of ticks that have (or had) a slot

    def __len__(self) -> int:
        return len(self._tick_of)

    def __contains__(self, key: object) -> bool:
        return key in self._tick_of

    def start(self, key: K, deadline: float) -> float:
        """Run ``key`` until ``deadline`` (restarting it if it runs); returns when its tick
        ends, the time from which :meth:`pop_due` hands it out."""
        tick = math.ceil(deadline / self.resolution)
        old = self._tick_of.get(key)
        if old is not None:
            if old == tick:
                return tick * self.resolution
            del self._slots[old][key]
        self._tick_of[key] = tick
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = {}
            heapq.heappush(self._ticks, tick)
        slot[key] = None
        return tick * self.resolution

    def cancel(self, key: K) -> bool:
        """Stop ``key``; False if it was not running."""
        tick = self._tick_of.pop(key, None)
        if tick is None:
            return False
        del self._slots[tick][key]
        return True

    def next_tick(self) -> float | None:
        """When the earliest tick with a running timer ends (None: no timer runs)."""
        ticks, slots = self._ticks, self._slots
        while ticks:
            tick = ticks[0]
            if slots.get(tick):
                return tick * self.resolution
            heapq.heappop(ticks)  # emptied by cancellations
            slots.pop(tick, None)
        return None

    def pop_due(self, now: float) -> K | None:
        """One timer due at ``now`` (removed), or None when none is."""
        ticks, slots = self._ticks, self._slots
        while ticks and ticks[0] * self.resolution <= now:
            tick = ticks[0]
            slot = slots.get(tick)
            if slot:
                key = next(iter(slot))
                del slot[key]
                del self._tick_of[key]
                return key
            heapq.heappop(ticks)
            slots.pop(tick, None)
        return None

    def clear(self) -> None:
        self._tick_of.clear()
        self._slots.clear()
        self._ticks.clear()
