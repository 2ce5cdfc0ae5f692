"""Per-source INVITE rate limit: a token bucket per source address, time injected.

A misbehaving (trusted) switch must not starve everyone else: past ``rate`` new INVITEs per
second (with a burst of the same size) it gets 503 with Retry-After. The bucket table is
bounded; emergency INVITEs are never checked here.
"""

from __future__ import annotations


class RateLimiter:
    MAX_SOURCES = 65536

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, updated)

    def set_rate(self, rate: float) -> None:
        """A new rate (reload); the buckets carry on, capped at the new burst when next used."""
        self.rate = rate
        self.burst = max(1.0, rate)

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, updated = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        if len(self._buckets) >= self.MAX_SOURCES and source not in self._buckets:
            self._buckets.clear()
        self._buckets[source] = (tokens - 1.0, now)
        return True
