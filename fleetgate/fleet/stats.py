"""Counters the control plane keeps per model, for ``/metrics`` and status. Plain numbers,
updated on the event loop thread only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: Histogram buckets for cold-start durations (seconds from launch to ready).
COLD_START_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass
class ModelStats:
    launches: int = 0
    restarts: int = 0
    unavailable: int = 0  # requests answered "no ready replica"
    failures: Counter[str] = field(default_factory=Counter)  # by kind
    cold_start_buckets: list[int] = field(default_factory=lambda: [0] * len(COLD_START_BUCKETS))
    cold_start_count: int = 0
    cold_start_sum: float = 0.0
    last_cold_start_s: float | None = None

    def observe_cold_start(self, seconds: float) -> None:
        self.cold_start_count += 1
        self.cold_start_sum += seconds
        self.last_cold_start_s = seconds
        for i, le in enumerate(COLD_START_BUCKETS):
            if seconds <= le:
                self.cold_start_buckets[i] += 1
