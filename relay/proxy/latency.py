"""The ClearIP response-time histogram: plain numbers the core fills, the metrics endpoint reads.

Pure (no Prometheus, no I/O), so the sans-IO core can keep one; a worker's snapshot carries it
as a dict and the supervisor adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class LatencyHistogram:
    """Cumulative-bucket histogram of ClearIP response times (plain numbers, no locks)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for a worker's snapshot (the supervisor adds them up)."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyHistogram:
        bounds = tuple(float(b) for b in data["bounds"])
        counts = [int(c) for c in data["counts"]]
        if len(counts) != len(bounds) + 1:
            raise ValueError("a histogram needs one count per bound plus the overflow")
        return cls(bounds, counts, float(data["total"]))

    def add(self, other: LatencyHistogram) -> None:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
