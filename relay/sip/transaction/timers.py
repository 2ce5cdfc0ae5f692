"""RFC 3261 transaction timer values (§17, Table 4; RFC 6026 for L and M).

Everything derives from three settings: T1 (round-trip estimate, 0.5 s), T2 (the cap on
retransmission intervals of non-INVITE requests and INVITE responses, 4 s) and T4 (how long a
message may live in the network, 5 s).

The properties give each timer's value on an *unreliable* transport (UDP) and, for the
retransmission timers A, E and G, the first interval. On reliable transports (TCP, TLS, SCTP)
the machines start no retransmission timer (A, E, G) and treat D, I, J and K as zero; that
rule lives in the machines, which know whether their transport is reliable.

Timer D is specified as "> 32 s for UDP"; it is ``max(32, 64*T1)`` here, which is 32 s with the
default T1 and keeps D at least as long as the peer's Timer H when T1 is raised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Every timer name a transaction may start; ``on_timer`` ignores any other name.
TIMER_NAMES = frozenset("ABDEFGHIJKLM")

TIMER_D_FLOOR = 32.0


@dataclass(frozen=True, slots=True)
class TimerSettings:
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    def __post_init__(self) -> None:
        # A zero T1 would make the retransmission timers fire at once, forever.
        for name in ("t1", "t2", "t4"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"TimerSettings.{name} must be a positive number of seconds")

    @property
    def timeout(self) -> float:
        """64*T1: the value of Timers B, F, H, J (UDP), L and M."""
        return 64 * self.t1

    # -- client INVITE (§17.1.1.2, RFC 6026) ---------------------------------------------------
    @property
    def timer_a(self) -> float:
        """First INVITE retransmission interval (doubles each time, no cap)."""
        return self.t1

    @property
    def timer_b(self) -> float:
        """INVITE transaction timeout."""
        return self.timeout

    @property
    def timer_d(self) -> float:
        """Completed INVITE client: wait for response retransmissions (UDP)."""
        return max(TIMER_D_FLOOR, self.timeout)

    @property
    def timer_m(self) -> float:
        """Accepted INVITE client: wait for retransmitted or forked 2xx."""
        return self.timeout

    # -- client non-INVITE (§17.1.2.2) ---------------------------------------------------------
    @property
    def timer_e(self) -> float:
        """First non-INVITE retransmission interval (doubles up to T2)."""
        return self.t1

    @property
    def timer_f(self) -> float:
        """Non-INVITE transaction timeout."""
        return self.timeout

    @property
    def timer_k(self) -> float:
        """Completed non-INVITE client: wait for response retransmissions (UDP)."""
        return self.t4

    # -- server INVITE (§17.2.1, RFC 6026) -----------------------------------------------------
    @property
    def timer_g(self) -> float:
        """First retransmission interval of a 300-699 final (doubles up to T2)."""
        return self.t1

    @property
    def timer_h(self) -> float:
        """Completed INVITE server: wait for the ACK."""
        return self.timeout

    @property
    def timer_i(self) -> float:
        """Confirmed INVITE server: wait for ACK retransmissions (UDP)."""
        return self.t4

    @property
    def timer_l(self) -> float:
        """Accepted INVITE server: wait for INVITE retransmissions and further 2xx."""
        return self.timeout

    # -- server non-INVITE (§17.2.2) -----------------------------------------------------------
    @property
    def timer_j(self) -> float:
        """Completed non-INVITE server: wait for request retransmissions (UDP)."""
        return self.timeout

    def backoff(self, interval: float) -> float:
        """The next interval of Timers E and G: doubled, capped at T2."""
        return min(2 * interval, self.t2)


DEFAULT_TIMERS = TimerSettings()
