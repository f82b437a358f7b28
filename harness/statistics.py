"""Sampling uncertainty of accuracies measured on a finite test sample, with scipy.stats doing the distributions.

- `Accuracy`: k correct of n, with its exact (Clopper-Pearson) 95% interval; the boards print it as
  `63.4 [59.0, 67.6]` and store value, bounds and counts in their JSON.
- `mcnemar`: the exact paired test of two per-example outcome vectors on the same examples (a binomial test on
  the discordant pairs), and `holm` for a family of such tests.
- `examples_needed` / `smallest_separable`: how many test examples a comparison of two accuracies needs, and the
  smallest difference a sample of a given size separates (normal approximation, two-sided, for two defenses
  evaluated on independent samples and, when the share of discordant examples is known, on the same ones).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
INTERVAL_METHOD = "exact Clopper-Pearson"
ALPHA = 0.05


@dataclass(frozen=True)
class Accuracy:
    """`correct` of `total` examples, in percent, with its two-sided `CONFIDENCE` interval."""

    correct: int
    total: int

    def __post_init__(self):
        if self.total < 1 or not 0 <= self.correct <= self.total:
            raise ValueError(f"an accuracy needs 0 <= correct <= total and total >= 1, got {self.correct} of {self.total}")

    @classmethod
    def of(cls, vector) -> Accuracy:
        vector = np.asarray(vector, dtype=bool)
        return cls(int(vector.sum()), int(vector.size))

    @property
    def percent(self) -> float:
        return 100 * self.correct / self.total

    @property
    def interval(self) -> tuple[float, float]:
        """The interval in percent (exact: it covers the true accuracy with probability >= CONFIDENCE)."""
        ci = stats.binomtest(self.correct, self.total).proportion_ci(CONFIDENCE, method="exact")
        return 100 * ci.low, 100 * ci.high

    def text(self, digits: int = 1) -> str:
        low, high = self.interval
        return f"{self.percent:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    def as_json(self) -> dict:
        low, high = self.interval
        return {"percent": self.percent, "low": low, "high": high, "correct": self.correct, "total": self.total,
                "interval": f"{CONFIDENCE:.0%} {INTERVAL_METHOD}"}


@dataclass(frozen=True)
class Paired:
    """Two outcome vectors on the same examples: how many only the first / only the second counts as correct,
    and the exact two-sided McNemar p-value."""

    only_first: int
    only_second: int
    p_value: float

    def text(self) -> str:
        return f"{self.only_first} vs {self.only_second} discordant examples, exact McNemar p = {self.p_value:.2g}"


def mcnemar(first, second, *, alternative: str = "two-sided") -> Paired:
    """The exact McNemar test of `first` against `second` (boolean per-example vectors, same examples):
    under the null hypothesis a discordant example is equally likely to favour either. `alternative="greater"`
    asks whether the first is correct more often."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"paired vectors must cover the same examples, got {first.size} and {second.size}")
    return discordant_test(int((first & ~second).sum()), int((second & ~first).sum()), alternative=alternative)


def discordant_test(only_first: int, only_second: int, *, alternative: str = "two-sided") -> Paired:
    """McNemar's exact test from the discordant counts alone (p = 1 when there are none)."""
    total = only_first + only_second
    p_value = 1.0 if total == 0 else float(stats.binomtest(only_first, total, 0.5, alternative=alternative).pvalue)
    return Paired(only_first, only_second, p_value)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the adjusted p-values, in the order given (reject where < alpha)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _unpaired(accuracy: float, difference: float, alpha: float, power: float) -> float:
    """Examples per model (not rounded) for two independent samples: the pooled-variance formula."""
    z_alpha, z_power = float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))
    p1, p2 = accuracy, accuracy - difference
    mean = (p1 + p2) / 2
    root = z_alpha * math.sqrt(2 * mean * (1 - mean)) + z_power * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return (root / difference) ** 2


def examples_needed(accuracy: float, difference: float, *, alpha: float = ALPHA, power: float = 0.8,
                    discordant: float | None = None) -> int:
    """Test examples per model to tell `accuracy` from `accuracy - difference` (shares in (0, 1)) with a two-sided
    test at `alpha` and the given power. Without `discordant`: two independent samples (the pooled-variance
    formula for two proportions). With it (the share of examples on which the two models disagree, at least
    `difference`): both on the same examples, McNemar's test (Connor 1987)."""
    if not 0 < accuracy < 1 or not 0 < difference < accuracy:
        raise ValueError(f"need 0 < difference < accuracy < 1, got accuracy {accuracy}, difference {difference}")
    if discordant is None:
        return math.ceil(_unpaired(accuracy, difference, alpha, power))
    if not difference <= discordant <= 1:
        raise ValueError(f"the discordant share must lie in [difference, 1], got {discordant}")
    z_alpha, z_power = float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))
    root = z_alpha * math.sqrt(discordant) + z_power * math.sqrt(discordant - difference ** 2)
    return math.ceil((root / difference) ** 2)


def smallest_separable(accuracy: float, examples: int, *, alpha: float = ALPHA, power: float = 0.8) -> float:
    """The smallest difference (a share) below `accuracy` that `examples` test examples per model separate with
    that power (two independent samples, as `examples_needed`)."""
    if examples < 1 or not 0 < accuracy < 1:
        raise ValueError(f"need examples >= 1 and 0 < accuracy < 1, got {examples}, {accuracy}")

    def gap(difference):
        return _unpaired(accuracy, difference, alpha, power) - examples

    high = accuracy - 1e-9
    return accuracy if gap(high) > 0 else float(optimize.brentq(gap, 1e-6, high))
