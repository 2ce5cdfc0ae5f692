"""RFC 3261 timer values (§17, Table 4) from T1, T2 and T4."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimerSettings:
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """Timers B, F, H, J (unreliable), L and M: 64*T1."""
        return 64 * self.t1

    def timer_d(self, reliable: bool) -> float:
        return 0.0 if reliable else max(32.0, 64 * self.t1)

    def wait_t4(self, reliable: bool) -> float:
        """Timers I and K."""
        return 0.0 if reliable else self.t4

    def timer_j(self, reliable: bool) -> float:
        return 0.0 if reliable else 64 * self.t1


DEFAULT_TIMERS = TimerSettings()
