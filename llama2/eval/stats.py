"""Uncertainty of evaluation numbers: 95% intervals for rates and a paired test between two
models graded on the same items.

At the recipe's scale a held-out set has a few hundred items, so a rate moves by several points
with the draw; a number printed without its interval, or a difference between two models
without a test, says more than the data do. The Llama 2 paper gives its win rates with 95%
confidence intervals (section 3.4.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with the Wilson score interval."""

    k: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """The Wilson score interval of a binomial rate k/n. Unlike the normal approximation
    `p +- z sqrt(p(1-p)/n)` it stays inside [0, 1] and keeps its coverage at rates near 0 or 1
    (a model with no violations out of 100 is not certainly safe)."""
    if not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(0, 0, 0.0, 1.0)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # (at k = 0 or k = n one end is exactly 0 or 1; rounding would leave ~1e-17)
    low = 0.0 if k == 0 else center - half
    high = 1.0 if k == n else center + half
    return Rate(k, n, low, high)


def interval(k: int, n: int) -> list[float]:
    """wilson(k, n)'s bounds, as JSON reports carry them."""
    rate = wilson(k, n)
    return [rate.low, rate.high]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact p-value that wins and losses are equally likely (ties left out): the
    sign test of a win/loss comparison, and McNemar's exact test when `wins` and `losses` are
    the two kinds of discordant pairs (items only the first / only the second model got
    right)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Two models' outcomes on the same items: items where only the first is right (`first`),
    only the second (`second`), and the exact two-sided p-value that they differ by chance."""

    first: int
    second: int
    both: int
    neither: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def mcnemar(a: list[bool], b: list[bool]) -> Paired:
    """McNemar's exact test on two models' per-item outcomes (the same items, in order)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same items: {len(a)} against {len(b)}")
    first = sum(x and not y for x, y in zip(a, b, strict=True))
    second = sum(y and not x for x, y in zip(a, b, strict=True))
    both = sum(x and y for x, y in zip(a, b, strict=True))
    return Paired(first, second, both, len(a) - first - second - both, sign_test(first, second))


@dataclass(frozen=True)
class Spread:
    """One number over several runs (seeds): its mean, lowest and highest."""

    mean: float
    low: float
    high: float
    n: int


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    return Spread(sum(values) / len(values), min(values), max(values), len(values))
