"""The engine's counters and latency histograms, as /metrics reports them (Prometheus)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable


class Histogram:
    """A Prometheus histogram: counts per upper bound, a sum and a count (memory does not grow
    with the observations)."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (inf past the last bound)."""
        if not self.count:
            return float("nan")
        seen = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= q * self.count:
                return bound
        return float("inf")

    def render(self, name: str) -> list[str]:
        lines, seen = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            seen += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {seen}')
        return lines + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)


class Stats:
    """Counters and histograms for /metrics (Prometheus); bounded memory."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # prompt tokens taken from the prefix cache
        self.generated_tokens = 0
        self.draft_proposed_tokens = 0  # with a draft model: the tokens it proposed
        self.draft_accepted_tokens = 0  # and those the model accepted
        self.failed_requests = 0
        self.engine_errors = 0  # exceptions caught inside the engine
        self.last_error: str | None = None
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(TOKEN_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            getattr(self, name).observe(value)
