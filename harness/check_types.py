"""The types of the sanity checks: what a check asks for (attack and probe requests), what it reads (the
evidence of one defense) and what it returns (a verdict). The checks themselves live in `attacks_ext/checks/`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from harness.records import CellRecord
from harness.statistics import ALPHA, discordant_test
from harness.threat import Norm, check_eps


class Status(enum.IntEnum):
    """Ordered so that the worst of several verdicts is their max. NOT_APPLICABLE: the check has nothing to judge
    on this benchmark (e.g. a one-eps grid for monotone-eps); it never counts towards an overall verdict."""

    NOT_APPLICABLE = -1
    PASS = 0
    WARN = 1
    FAIL = 2

    @property
    def label(self) -> str:
        return "n/a" if self is Status.NOT_APPLICABLE else self.name.lower()


@dataclass(frozen=True)
class Verdict:
    """One check on one defense. `status` is None when its evidence is not in the store yet (missing, which is
    not the same as not applicable)."""

    check: str
    status: Status | None
    figure: str
    reason: str
    details: dict = field(default_factory=dict)  # columns of the check's detail table


@dataclass(frozen=True)
class AttackRequest:
    """An attack cell a check needs: `attack_id` with `options` at `eps` on the first `examples` test images.

    The request itself is the key under which the check finds its cell in `Evidence`; `name` is how the store and
    the boards name it (unique within the check)."""

    name: str
    attack_id: str
    options: tuple[tuple[str, object], ...]
    eps: float
    examples: int
    restart: int = 0  # independent repetitions of the same attack get their own cell (and seed)
    source: str | None = None  # a defense of the benchmark to craft on (a transfer attack); None: the target itself
    after: tuple[AttackRequest, ...] = ()  # this check's earlier requests: attack only the examples they all left
    #                                        robust (the stored vector is then cumulative); (): every example
    survivors_of: str | None = None  # "white-box": attack only what the matrix's white-box columns at (norm, eps)
    #                                  left robust; "matrix": what every column left (the worst case's survivors)
    sample: int | None = None  # attack at most this many of those survivors (the first ones); None: all


@dataclass(frozen=True)
class ProbeRequest:
    """A measurement of the model (`PROBES[probe_id]`) on the first `examples` test images."""

    name: str
    probe_id: str
    options: tuple[tuple[str, object], ...]
    examples: int


@dataclass(frozen=True)
class Column:
    """What a check needs to know about one attack column of the matrix."""

    label: str
    norm: Norm
    family: str
    eps: tuple[float, ...]
    attack_id: str = ""
    options: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Context:
    """The benchmark as the checks see it when they plan their requests."""

    grid: dict  # Norm -> eps tuple
    rank_by: tuple[Norm, float]
    eval_examples: int
    defenses: tuple[str, ...] = ()  # the benchmark's defense names (transfer sources)
    columns: tuple[Column, ...] = ()  # the matrix's attack columns
    cascade: bool = False  # whether the matrix's columns run as a cascade (cumulative, not standalone, vectors)


@dataclass(frozen=True)
class Evidence:
    """Everything stored about one defense that a check may read."""

    defense: str
    context: Context
    columns: dict[str, Column]
    matrix: dict[tuple[str, float], CellRecord | None]  # (column label, eps) -> cell; ("clean", 0.0) included
    requested: dict[AttackRequest | ProbeRequest, CellRecord | None]  # the check's request -> its cell

    def record(self, request: AttackRequest | ProbeRequest) -> CellRecord | None:
        """The stored cell of one of the check's requests (the request object is the key); None while missing."""
        return self.requested.get(request)

    @property
    def clean(self) -> CellRecord | None:
        return self.matrix.get(("clean", 0.0))

    def white_box(self, norm: Norm, eps: float) -> list[tuple[str, CellRecord]]:
        """The matrix's gradient-based (one-step or iterative) cells at (norm, eps), or [] if any is missing."""
        cells = [(c.label, self.matrix.get((c.label, eps))) for c in self.columns.values()
                 if c.norm is norm and eps in c.eps and c.family in ("one-step", "iterative")]
        return [] if any(r is None for _, r in cells) else cells


def _missing(check: str, what: str) -> Verdict:
    return Verdict(check, None, "", f"not run yet: {what} missing from the store")


def _number(value, name: str, *, low: float = 0.0, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value < low if inclusive else value <= low):
        raise ValueError(f"{name} must be a number {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    return float(value)


def _count(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _thresholds(warn: float, fail: float, unit: str) -> tuple[float, float]:
    warn, fail = _number(warn, f"warn threshold ({unit})"), _number(fail, f"fail threshold ({unit})")
    if warn > fail:
        raise ValueError(f"the warn threshold ({warn:g} {unit}) must not exceed the fail threshold ({fail:g} {unit})")
    return warn, fail


def _above(value: float, threshold: float) -> bool:
    """value > threshold, ignoring float noise: percentages of whole examples such as 100 * 2 / 100 must not
    cross a threshold of 2 by rounding."""
    return round(value, 6) > threshold


def _grade(value: float, warn: float, fail: float) -> Status:
    return Status.FAIL if _above(value, fail) else Status.WARN if _above(value, warn) else Status.PASS


def _graded_if_significant(value: float, warn: float, fail: float, gained: int, lost: int) -> tuple[Status, str]:
    """`_grade`, but a difference above a threshold counts only when it is significant too: `gained` examples that
    only the challenging attack (or budget) breaks against `lost` that only the reference breaks, on the same
    examples, under the exact one-sided McNemar test at 5%. On 100 examples one example is one point, so a
    threshold alone would flip a verdict on noise. Returns the status and a clause saying both."""
    test = discordant_test(gained, lost, alternative="greater")
    clause = f"{gained} vs {lost} discordant examples, exact one-sided McNemar p = {test.p_value:.2g}"
    status = _grade(value, warn, fail)
    if status is not Status.PASS and test.p_value >= ALPHA:
        return Status.PASS, f"{clause}: not significant at {ALPHA:.0%}, within sampling noise"
    return status, clause


def _reason_tail(status: Status, value: float, warn: float, clause: str, meaning: str) -> str:
    """What follows a difference in a verdict's reason: the test's clause, then what a warn or fail means; a
    difference above `warn` that was not significant needs nothing more (its clause says so)."""
    if status is not Status.PASS:
        return f" ({clause}): {meaning}"
    return f" ({clause})" + ("" if _above(value, warn) else " (within tolerance)")


class Check:
    """Base of every check: `requests` (extra evidence), `evaluate` (pure), and optionally `plot`."""

    id = "check"
    title = "check"
    examples: int | None = None  # test images its requests use; None: all of the benchmark's

    def requests(self, context: Context) -> tuple[AttackRequest | ProbeRequest, ...]:
        return ()

    def requests_for(self, context: Context, defense: str) -> tuple[AttackRequest | ProbeRequest, ...]:
        """The requests for one defense's row; every row asks for the same unless a check says otherwise."""
        return self.requests(context)

    def evaluate(self, evidence: Evidence) -> Verdict:
        raise NotImplementedError

    def records(self, evidence: Evidence) -> list[CellRecord | None]:
        """The stored cells of this check's requests for the evidence's defense, in request order (None: missing)."""
        return [evidence.record(request) for request in self.requests_for(evidence.context, evidence.defense)]

    def plot(self, evidences: dict[str, Evidence], path) -> bool:
        """Draw the check's figure for every defense into `path`; False when there is nothing to draw."""
        return False

    def _examples(self, context: Context) -> int:
        return context.eval_examples if self.examples is None else self.examples

    def _verdict(self, status: Status, figure: str, reason: str, **details) -> Verdict:
        return Verdict(self.id, status, figure, reason, details)


def rank_eps(context: Context, norm: Norm) -> float:
    """The eps a check runs at for `norm`: the board's rank-by eps for its norm, the largest of the grid otherwise."""
    rank_norm, eps = context.rank_by
    if rank_norm is not norm and norm not in context.grid:
        raise ValueError(f"no {norm.value} eps grid to take a default eps from; give eps")
    return eps if rank_norm is norm else max(context.grid[norm])


def _default_eps(context: Context, norm: Norm, eps: float | None) -> float:
    return rank_eps(context, norm) if eps is None else float(check_eps(eps, norm))
