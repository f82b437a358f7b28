"""The ranking with its uncertainty: every accuracy with its interval, and ranks that only separate defenses whose
difference is significant.

Adjacent rows (in the board's order) are compared with the exact McNemar test on their per-example worst-case
vectors at the rank-by threat (both were attacked on the same examples), Holm-corrected over the family of adjacent
pairs. A row shares the rank of the row above it unless that pair is separable at 5%, so a group reads `=3`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.statistics import ALPHA, CONFIDENCE, INTERVAL_METHOD, Accuracy, holm, mcnemar, smallest_separable

UNRANKED = "—"  # a failing sanity verdict or a missing worst case: no rank to give


def grouped_ranks(vectors: list[np.ndarray | None], ranked: list[bool]) -> tuple[list[str], list[float | None]]:
    """Ranks for rows already in board order: `vectors` are their per-example outcome vectors at the rank-by
    threat (None when missing), `ranked` says which rows take part (a row failing its sanity checks does not).
    Returns the rank texts (`1`, `=2`, ...) and each row's Holm-adjusted p-value against the next ranked row."""
    rows = [i for i, (vector, take) in enumerate(zip(vectors, ranked)) if take and vector is not None]
    raw = [mcnemar(vectors[a], vectors[b]).p_value for a, b in zip(rows, rows[1:])]
    adjusted = holm(raw) if raw else []
    group_of, start = {}, 1
    for position, row in enumerate(rows):
        if position and adjusted[position - 1] < ALPHA:
            start = position + 1
        group_of[row] = start
    sizes = pd.Series(list(group_of.values())).value_counts().to_dict() if group_of else {}
    ranks = [UNRANKED] * len(vectors)
    for row, group in group_of.items():
        ranks[row] = f"={group}" if sizes[group] > 1 else str(group)
    to_next: list[float | None] = [None] * len(vectors)
    for (row, _), p in zip(zip(rows, rows[1:]), adjusted):
        to_next[row] = p
    return ranks, to_next


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def ranking_frame(summary: pd.DataFrame, vectors: dict[str, dict[str, np.ndarray]], rank_column: str,
                  ranked: list[bool]) -> pd.DataFrame:
    """The board's ranking: a Rank column first, every accuracy column as an `Accuracy` (value and interval),
    and the adjusted p-value of each row against the next ranked one."""
    frame = summary.copy()
    for column in frame.columns:
        if column == "Clean" or column.startswith("Worst "):
            frame[column] = [None if (v := vectors.get(name, {}).get(column)) is None else Accuracy.of(v)
                             for name in frame["Defense"]]
    ranks, to_next = grouped_ranks([vectors.get(name, {}).get(rank_column) for name in frame["Defense"]], ranked)
    frame.insert(0, "Rank", ranks)
    frame[f"p vs next ({rank_column.removeprefix('Worst ')})"] = [None if p is None else p_text(p) for p in to_next]
    return frame


def ranking_note(rank_column: str, pairs: int, examples: int, near: float) -> str:
    """What the intervals and ranks mean, and what this sample size can tell apart."""
    gap = 100 * smallest_separable(near, examples)
    return (f"Every accuracy carries its {CONFIDENCE:.0%} {INTERVAL_METHOD} interval in brackets (scipy.stats.binomtest; "
            f"{examples} examples). **Rank** compares adjacent rows by the worst case at {rank_column.removeprefix('Worst ')} with the exact McNemar "
            f"test on their per-example outcomes (the same {examples} examples), Holm-corrected over the {pairs} adjacent "
            f"pairs: a row shares the rank above it (`=k`) unless that pair differs at {ALPHA:.0%}; **p vs next** is that "
            f"adjusted p-value. Rows that fail their sanity checks take no rank. On {examples} examples per defense, two "
            f"accuracies near {100 * near:.0f}% measured on independent samples must differ by about {gap:.1f} points to "
            "be told apart (5%, power 0.8; `python -m harness power`); paired on the same examples, less when the "
            "two defenses agree on most of them.")


def interval_footnote(examples: int, subject: str = "Every accuracy in the attack tables", stored: bool = True) -> str:
    """Wide tables show values only: this says how wide their intervals are (and where they are stored)."""
    def half_width(correct: int) -> float:
        low, high = Accuracy(correct, examples).interval
        return (high - low) / 2

    where = " as well, stored with its counts in the board's `.json`" if stored else ""
    return (f"{subject} carries its {CONFIDENCE:.0%} {INTERVAL_METHOD} interval{where}; on {examples} examples "
            f"its half-width is at most {half_width(examples // 2):.1f} points (at 50%), "
            f"{half_width(round(0.9 * examples)):.1f} at 90% or 10% and {half_width(round(0.99 * examples)):.1f} at "
            "99% or 1%.")


def with_intervals(frame: pd.DataFrame, examples: int) -> pd.DataFrame:
    """A table of accuracies in % (every column but the first), each measured on the same `examples`, as
    `Accuracy` values: the percentages are counts over `examples`, so the counts come back exactly."""
    out = frame.copy()
    for column in out.columns[1:]:
        out[column] = [None if v is None or pd.isna(v) else Accuracy(round(v * examples / 100), examples)
                       for v in out[column]]
    return out


def seed_spread_frame(seeds: dict[str, list[tuple[int, np.ndarray | None, np.ndarray | None]]],
                      rank_column: str) -> pd.DataFrame:
    """Per defense trained with several seeds: clean and worst-case accuracy per seed, their mean and range, and
    the sampling interval's half-width beside it, so a reader sees which of the two spreads is the larger."""
    threat = rank_column.removeprefix("Worst ")
    rows = []
    for name, models in seeds.items():
        row = {"Defense": name, "Seeds": ", ".join(str(seed) for seed, _, _ in models)}
        for label, index in (("Clean", 1), (rank_column, 2)):
            vectors = [model[index] for model in models]
            if any(v is None for v in vectors):
                row.update({f"{label} by seed": None, f"{label} mean": None, f"{label} range": None})
                continue
            values = [100 * float(v.mean()) for v in vectors]
            row.update({f"{label} by seed": " / ".join(f"{v:.1f}" for v in values), f"{label} mean": float(np.mean(values)),
                        f"{label} range": max(values) - min(values)})
        worst = [model[2] for model in models]
        if any(v is None for v in worst):
            row.update({f"Sampling ± ({threat})": None, "Larger spread": None})
        else:
            half = float(np.mean([(Accuracy.of(v).interval[1] - Accuracy.of(v).interval[0]) / 2 for v in worst]))
            row.update({f"Sampling ± ({threat})": half,
                        "Larger spread": "training seed" if row[f"{rank_column} range"] / 2 > half else "sampling"})
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread_note(rank_column: str) -> str:
    threat = rank_column.removeprefix("Worst ")
    return (f"The defenses below were trained once per listed seed (`training_seeds`); every seed's model ran the "
            f"clean evaluation and the worst-case cascade at {threat} on the same examples; the ranking shows the "
            f"benchmark seed's model. **range** is max − min over seeds; **Sampling ±** is the mean half-width of the "
            f"seeds' {CONFIDENCE:.0%} intervals at {threat}. **Larger spread** says which moves the number more: "
            "retraining (half the range) or the test sample (the half-width).")
