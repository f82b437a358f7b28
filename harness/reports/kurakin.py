"""Kurakin et al. (002) on a findings board: Table 5 (each one-step method as the adversary of Algorithm 1) and
Sec. 4.3 (model capacity: the accuracy ratio adversarial / clean against the width rho), with the capacity claims
and figure. Accuracies on adversarial images count every example, as the paper's ratio does (so a leaking model's
ratio can exceed 1)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.figures import pyplot, save_figure
from harness.reports.aggregate import Leaderboard
from harness.reports.claims import (CAPACITY_SOURCE, NOT_MEASURED, NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED, Finding,
                                    clean_percent, kind, own_accuracy_columns)
from harness.threat import Norm
# Table 5 (ImageNet, Inception v3 after 90k steps): clean, then FGSM at eps 2, 4, 8, 16 (of 255); the fast-grad
# rows were evaluated with step l.l. By the adversary of Algorithm 1 (None: no adversarial training).
CAPACITY_ATTACKS = ("step-ll", "iter-basic", "iter-ll")  # Fig. 1's: one-step first, then the iterative ones
PAPER_TABLE5 = {
    None: (76.8, 40.7, 39.0, 37.9, 36.7), "fgsm": (74.9, 79.3, 82.8, 85.3, 83.2),
    "fgsm-pred": (76.4, 43.2, 42.0, 40.9, 40.0), "fast-entropy": (76.4, 62.8, 61.7, 59.5, 54.8),
    "step-rnd": (76.4, 73.0, 75.4, 76.5, 72.5), "step-ll": (76.3, 72.9, 75.1, 76.2, 72.2),
    "fast-grad-l2": (76.8, 44.0, 33.2, 26.4, 22.5), "fast-grad-linf": (75.6, 52.2, 39.7, 30.9, 25.0),
    "random-sign": (76.5, 38.8, 36.6, 35.0, 32.7), "truncnorm-noise": (76.6, 38.3, 36.0, 34.4, 31.8),
}


def _accuracy(board: Leaderboard, name: str, label: str, eps: float) -> float | None:
    """Accuracy on the column's adversarial images, over every example (not only the clean-correct ones)."""
    record = board.outcomes.get((name, label, eps))
    return None if record is None else 100 * float(np.mean(record.adv_correct))


def _columns(board: Leaderboard, attack_ids: tuple[str, ...] | None = None) -> list[tuple[str, float]]:
    """The own-accuracy L∞ columns (the paper's threat model), as (label, eps)."""
    return [(a.label, eps) for a, eps in own_accuracy_columns(board.spec, attack_ids) if a.norm is Norm.LINF]


def table5_rows(board: Leaderboard) -> list[dict]:
    """One row per width-1 model trained with one adversary of Algorithm 1 (or none): clean and every column's
    accuracy, beside the paper's row for the same adversary. Empty unless two such adversaries are on the board."""
    defenses = [d for d in board.spec.defenses if d.recipe is not None and d.recipe.width == 1
                and kind(d) in ("natural", "one-step", "noise") and d.recipe.adversary in PAPER_TABLE5]
    if len({d.recipe.adversary for d in defenses} - {None}) < 2:
        return []
    rows = []
    for defense in defenses:
        paper = PAPER_TABLE5[defense.recipe.adversary]
        row = {"Defense": defense.name, "Adversary": defense.recipe.adversary or "none", "Clean": clean_percent(board, defense.name)}
        row.update({f"{label} {eps:g}": _accuracy(board, defense.name, label, eps) for label, eps in _columns(board)})
        row["Paper: clean / FGSM 2, 4, 8, 16"] = f"{paper[0]:.1f} / " + ", ".join(f"{v:.1f}" for v in paper[1:])
        rows.append(row)
    return rows


def capacity_rows(board: Leaderboard) -> list[dict]:
    """Per training (natural, step-l.l.-trained) and width: clean accuracy and the accuracy ratio of each column of
    Fig. 1's attacks at the rank-by eps. Empty unless both trainings come in at least three widths."""
    eps = board.spec.rank_by[1]
    sweeps: dict[tuple, list] = {}  # (training, architecture, activation): one width sweep
    for defense in board.spec.defenses:
        training, r = kind(defense), defense.recipe
        if r is not None and (training == "natural" or (training == "one-step" and r.adversary == "step-ll")):
            sweeps.setdefault(("natural" if training == "natural" else "step l.l.", r.model, r.activation), []).append(defense)
    groups: dict[str, list] = {}
    for (training, _, _), group in sweeps.items():  # per training, the first sweep of three or more widths
        if len({d.recipe.width for d in group}) >= 3:
            groups.setdefault(training, group)
    if len(groups) < 2:
        return []
    rows = []
    for training, group in groups.items():
        for defense in sorted(group, key=lambda d: d.recipe.width):
            clean = clean_percent(board, defense.name)
            row = {"Defense": defense.name, "Training": training, "Width": defense.recipe.width, "Clean": clean}
            for label, at in _columns(board, CAPACITY_ATTACKS):
                if at == eps:
                    adversarial = _accuracy(board, defense.name, label, eps)
                    row[f"{label} ratio"] = None if adversarial is None or not clean else adversarial / clean
            rows.append(row)
    return rows


def _ratio_curves(rows: list[dict], training: str) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["Training"] == training:
            for key, value in row.items():
                if key.endswith(" ratio") and value is not None:
                    curves.setdefault(key[:-len(" ratio")], []).append((row["Width"], value))
    return curves


def _one_step_label(board: Leaderboard) -> str | None:
    return next((label for label, _ in _columns(board, CAPACITY_ATTACKS[:1])), None)


def adversarial_training_gains_with_width(board: Leaderboard) -> Finding:
    claim = "Adversarially trained models get more robust with width"
    paper = ("ImageNet, Inception v3 at rho 0.5-2, step-l.l.-trained: the accuracy ratio rises with rho, near 1 at rho 2 "
             "for one-step examples; for iterative ones the trend holds 'with some exceptions'")
    rule = ("reproduced when the step-l.l.-trained models' ratio under step l.l. never falls as the width grows and the "
            "widest model's ratio under every iterative column exceeds the narrowest's; partly: one of the two (no "
            "sampling test: at 500 digits a ratio moves by about ±0.02 from sampling alone)")
    return _capacity_claim(board, claim, paper, rule, "step l.l.")


def natural_training_has_an_optimal_width(board: Leaderboard) -> Finding:
    claim = "Naturally trained models have an optimal width for robustness"
    paper = "ImageNet, Inception v3 at rho 0.5-2 without adversarial training: 'an optimal value of rho yielding best robustness'"
    rule = ("reproduced when the natural models' ratio under every Fig. 1 column (step l.l., iter. l.l., basic iter.) "
            "peaks strictly inside the width range (above both the narrowest and the widest model's); partly: under "
            "some of them (no sampling test, as above)")
    return _capacity_claim(board, claim, paper, rule, "natural")


def _capacity_claim(board: Leaderboard, claim: str, paper: str, rule: str, training: str) -> Finding:
    rows, one_step = capacity_rows(board), _one_step_label(board)
    if not rows or one_step is None:
        return Finding(claim, CAPACITY_SOURCE, paper, "needs natural and step-l.l.-trained models at three or more "
                       "widths and a step-l.l. column", NOT_MEASURED, rule)
    curves = _ratio_curves(rows, training)
    if not curves or any(r["Clean"] is None for r in rows) or any(v is None for r in rows for k, v in r.items()
                                                                  if k.endswith(" ratio")):
        return Finding(claim, CAPACITY_SOURCE, paper, "cells missing from the store", NOT_RUN, rule)
    ours = f"ratio at L∞ {board.spec.rank_by[1]:g} by width: " + "; ".join(
        f"{label} " + ", ".join(f"{w:g}: {r:.2f}" for w, r in points) for label, points in curves.items())
    if training == "natural":
        interior = [max(r for _, r in points[1:-1]) > max(points[0][1], points[-1][1]) for points in curves.values()]
        verdict = REPRODUCED if all(interior) else PARTLY if any(interior) else NOT_REPRODUCED
    else:
        ratios = [r for _, r in curves[one_step]]
        monotone = all(b >= a for a, b in zip(ratios, ratios[1:]))
        iterative = [c for c in curves if c != one_step]
        wider = bool(iterative) and all(curves[c][-1][1] > curves[c][0][1] for c in iterative)
        verdict = REPRODUCED if monotone and wider else PARTLY if monotone or wider else NOT_REPRODUCED
    return Finding(claim, CAPACITY_SOURCE, paper, ours, verdict, rule)


def render_capacity_figure(board: Leaderboard, rows: list[dict], path: Path) -> None:
    """Kurakin et al. Fig. 1: accuracy ratio against width, one panel per training, one line per attack."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, training in zip(axes, ("natural", "step l.l.")):
        for label, points in _ratio_curves(rows, training).items():
            widths, ratios = zip(*points)
            axis.plot(widths, ratios, marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("width rho (x small-cnn's filters and units)")
        axis.set_title(f"{'no adversarial training' if training == 'natural' else 'adversarial training, step l.l.'}",
                       fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"accuracy ratio adversarial / clean, L∞ {board.spec.rank_by[1]:g}")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{board.spec.name}: model capacity (Kurakin et al. Sec. 4.3, Fig. 1)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def kurakin_findings(board: Leaderboard) -> list[Finding]:
    return [adversarial_training_gains_with_width(board), natural_training_has_an_optimal_width(board)]
