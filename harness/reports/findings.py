"""The findings board (`leaderboards/findings.md`): each source paper's claim beside our measurement, with a
verdict computed from the stored per-example results by the rule written next to it; Shafahi et al.'s
linearization table (their Table 1) and dead feature units (Appendix E) with its figure."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from attacks_ext.checks.plotting import _line_styles
from attacks_ext.feature_units import DEAD_SHARE, dead_units
from attacks_ext.label_leak import robust_feature_rows, robust_linear_hits
from harness.figures import pyplot, save_figure
from harness.registry import Family
from harness.reports.aggregate import Leaderboard
from harness.reports.claims import (CAPACITY_SOURCE, CROSS_NORM_SOURCE, NOT_MEASURED, NOT_REPRODUCED, NOT_RUN, PARTLY,
                                    REPRODUCED, TRANSFER_SOURCE, Finding, _checked, _column, _grade, _model, _names,
                                    _pct, _worst, kind, label_leaking, leak_bound, linf_training_fails_at_l2,
                                    not_measured, one_step_training_fails_iterative, perturbation_carries_label,
                                    second_order_beats_pgd, targeted_one_step_trains_best)
from harness.reports.cross_norm import READING, cross_norm_findings, cross_norm_rows
from harness.reports.kurakin import capacity_rows, kurakin_findings, render_capacity_figure, table5_rows
from harness.reports.markdown import markdown_table
from harness.reports.transfer import matrix_rows, transfer_findings, transfer_section
from harness.statistics import ALPHA, mcnemar
from harness.threat import Norm


def ls_gn_near_adversarial_training(board: Leaderboard) -> Finding:
    claim = "Label smoothing / logit squeezing with Gaussian noise come close to adversarial training (MNIST)"
    source = "Shafahi et al. (001) Sec. 4.4, Table 2"
    paper = ("Madry CNN, L∞ 0.3, PGD-40 on cross-entropy: LSq β 0.5 + GN σ 0.5 72.4%, LS α 0.2 + GN σ 0.3 71.0%, "
             "Madry et al.'s adversarial training 93.2% (ratios 0.78, 0.76)")
    rule = ("reproduced when every LS/LSq + GN defense keeps at least 0.75 of the L∞ PGD-trained model's accuracy under "
            "the board's first iterative L∞ column at the rank-by eps, and its worst case does too; partly: under the "
            "iterative column only")
    norm, eps = board.spec.rank_by
    regularized, trained = _names(board, "ls-gn", "lsq-gn"), _names(board, "pgd-linf")
    if norm is not Norm.LINF or not regularized or not trained:
        return Finding(claim, source, paper, "needs an L∞ rank-by eps, an LS/LSq + GN and a PGD-trained defense",
                       NOT_MEASURED, rule)
    reference = _column(board, trained[0], Family.ITERATIVE, norm, eps)
    columns = {n: _column(board, n, Family.ITERATIVE, norm, eps) for n in regularized}
    worst = {n: _worst(board, n, norm, eps) for n in [*regularized, trained[0]]}
    if reference is None or any(c is None for c in columns.values()) or any(w is None for w in worst.values()):
        return Finding(claim, source, paper, "cells missing from the store", NOT_RUN, rule)
    label, base = reference
    parts = [f"{n} {_pct(columns[n][1]):.1f}% (worst {_pct(worst[n]):.1f}%)" for n in regularized]
    ours = (f"{_model(board, trained[0])}, {label} at L∞ {eps:g}: " + ", ".join(parts) +
            f"; {trained[0]} {_pct(base):.1f}% (worst {_pct(worst[trained[0]]):.1f}%)")
    iterative = all(_pct(columns[n][1]) >= 0.75 * _pct(base) for n in regularized)
    strongest = all(_pct(worst[n]) >= 0.75 * _pct(worst[trained[0]]) for n in regularized)
    return Finding(claim, source, paper, ours,
                   REPRODUCED if iterative and strongest else PARTLY if iterative else NOT_REPRODUCED, rule)


def noise_is_the_ingredient(board: Leaderboard) -> Finding:
    claim = "Gaussian noise alone is not robust to white-box attacks; with LS or LSq it is"
    source = "Shafahi et al. (001) Appendix C, Table 6; Fig. 3"
    paper = "MNIST, L∞ 0.3, PGD-40: GN alone and LS alone near 0% white-box; the combinations 66-79%"
    rule = ("reproduced when every LS/LSq + GN defense's worst case beats GN alone's at every L∞ eps of the grid "
            f"(one-sided exact McNemar, p < {ALPHA:g}); partly at some eps")
    gn, combined = _names(board, "gn"), _names(board, "ls-gn", "lsq-gn")
    grid = dict(board.spec.eps).get(Norm.LINF, ())
    if not gn or not combined or not grid:
        return Finding(claim, source, paper, "needs a GN-only and an LS/LSq + GN defense and an L∞ grid", NOT_MEASURED, rule)
    vectors = {(n, e): _worst(board, n, Norm.LINF, e) for n in [gn[0], *combined] for e in grid}
    if any(v is None for v in vectors.values()):
        return Finding(claim, source, paper, "cells missing from the store", NOT_RUN, rule)
    beats = {e: all(mcnemar(vectors[(n, e)], vectors[(gn[0], e)], alternative="greater").p_value < ALPHA
                    for n in combined) for e in grid}
    ours = "; ".join(f"L∞ {e:g}: " + ", ".join(f"{n} {_pct(vectors[(n, e)]):.1f}%" for n in [gn[0], *combined])
                     for e in grid)
    return Finding(claim, source, paper, "worst case, " + ours, _grade(sum(beats.values()), len(grid)), rule)


def linearization_underestimates(board: Leaderboard) -> Finding:
    claim = "The linearized eps_L (Eq. 4) underestimates an adversarially trained MNIST model's robustness"
    source = "Shafahi et al. (001) Sec. 3, Table 1"
    paper = ("MNIST, L∞ 0.3: adversarially trained 95.3% empirical (X-ent) vs 56.7% predicted; natural 7.1% vs 0.0% "
             "(close on CIFAR-10, where eps is small)")
    rule = ("reproduced when the L∞ PGD-trained model's worst case at the rank-by eps exceeds the linear prediction by "
            "more than 20 points and the natural model's lies within 10 points of its prediction; partly: the first only")
    rows = linearized_rows(board)
    norm, eps = board.spec.rank_by
    at = {r["Defense"]: r for r in rows if r["eps"] == f"{norm.symbol} {eps:g}"}
    trained, natural = _names(board, "pgd-linf"), _names(board, "natural")
    if "linearized-robustness" not in board.checks or not trained or not natural:
        return Finding(claim, source, paper, "needs the linearized-robustness check, a PGD-trained and a natural defense",
                       NOT_MEASURED, rule)
    if trained[0] not in at or natural[0] not in at:
        return Finding(claim, source, paper, "probe or cells missing from the store", NOT_RUN, rule)
    t, n = at[trained[0]], at[natural[0]]
    ours = (f"{norm.symbol} {eps:g}, worst case vs linear: {trained[0]} {t['Worst case']:.1f}% vs {t['Linear (Eq. 4)']:.1f}%; "
            f"{natural[0]} {n['Worst case']:.1f}% vs {n['Linear (Eq. 4)']:.1f}%")
    under = t["Worst − linear"] > 20
    return Finding(claim, source, paper, ours,
                   REPRODUCED if under and abs(n["Worst − linear"]) <= 10 else PARTLY if under else NOT_REPRODUCED, rule)


def linearized_rows(board: Leaderboard) -> list[dict]:
    """Shafahi et al. Table 1 per defense and grid point: the linear prediction and our worst case on its examples."""
    check = board.checks.get("linearized-robustness")
    if check is None:
        return []
    rows = []
    for defense in board.spec.defenses:
        evidence = board.evidence["linearized-robustness"][defense.name]
        if check.records(evidence)[0] is None:
            continue
        for norm, eps, predicted, empirical in check.comparison(evidence):
            if empirical is not None:
                rows.append({"Defense": defense.name, "eps": f"{norm.symbol} {eps:g}", "Linear (Eq. 4)": predicted,
                             "Worst case": empirical, "Worst − linear": empirical - predicted})
    return rows


def dead_unit_rows(board: Leaderboard) -> list[dict]:
    rows = []
    for defense in board.spec.defenses:
        record = (board.dead_units or {}).get(defense.name)
        if record is not None:
            dead, units = dead_units(record.measurements)
            rows.append({"Defense": defense.name, "Kind": kind(defense), "Units": units, "Dead": dead,
                         "Dead %": 100 * dead / units,
                         "Never active": int((np.asarray(record.measurements["unit_active_examples"]) == 0).sum())})
    return rows


def units_deactivated(board: Leaderboard) -> Finding:
    claim = "Adversarial training, label smoothing and logit squeezing deactivate feature units; natural training does not"
    source = "Shafahi et al. (001) Appendix E, Fig. 10"
    paper = "Madry CNN, 1,024 feature units: natural training all active; PGD training, LS + GN, LSq + GN ~400 dead each (~39%)"
    rule = ("reproduced when the natural model has at most 1% dead units and the L∞ PGD-trained, LS + GN and LSq + GN "
            "models each at least 10%; partly: natural at most 1% and some of the three; dead = summed |activation| over "
            f"the test digits at most {DEAD_SHARE:g} of the mean unit's")
    if not board.spec.dead_units:
        return Finding(claim, source, paper, "[findings] dead_units is off", NOT_MEASURED, rule)
    rows = {r["Defense"]: r for r in dead_unit_rows(board)}
    natural, others = _names(board, "natural"), [_names(board, k) for k in ("pgd-linf", "ls-gn", "lsq-gn")]
    wanted = natural[:1] + [names[0] for names in others if names]
    if not natural or any(n not in rows for n in wanted):
        return Finding(claim, source, paper, "probe cells missing from the store" if natural else "no natural defense",
                       NOT_RUN if natural else NOT_MEASURED, rule)
    ours = f"{_model(board, natural[0])}, {rows[natural[0]]['Units']} feature units: " + ", ".join(
        f"{n} {rows[n]['Dead']} dead" for n in wanted)
    clean_natural = rows[natural[0]]["Dead %"] <= 1
    held = sum(rows[n]["Dead %"] >= 10 for n in wanted[1:])
    verdict = (REPRODUCED if clean_natural and held == 3 else PARTLY if clean_natural and held else NOT_REPRODUCED)
    return Finding(claim, source, paper, ours, verdict, rule)


def robust_feature_leakage(board: Leaderboard) -> Finding:
    claim = "Robust features leak into D_rand but not into D_det"
    source = "Goh (003), Distill discussion of Ilyas et al."
    paper = "CIFAR-10: robust linear features explain at least 23.5% (of 88%) on D_rand; on D_det 6.81% (of 44%), below chance"
    rule = (f"reproduced when the robust-linear bound on D_rand beats chance (exact binomial test, p < {ALPHA:g}) and "
            "the one on D_det does not; partly: one of the two")
    record = board.robust_features
    if not board.spec.robust_features or record is None:
        return Finding(claim, source, paper, "no robust-features cell" if not board.spec.robust_features else
                       "the cell is missing from the store", NOT_MEASURED if not board.spec.robust_features else NOT_RUN, rule)
    rows, hits = robust_feature_rows(record.measurements), robust_linear_hits(record.measurements)
    n = len(record.measurements["true_label"])
    above = [stats.binomtest(hits[name], n, row["Chance"] / 100, alternative="greater").pvalue < ALPHA
             for name, row in zip(hits, rows)]  # both in ROBUST_FEATURE_SETS order: rand, det
    ours = "; ".join(f"{r['Data set'].split(' ')[0]}: bound {r['Robust linear features → clean test (%)']:.1f}% "
                     f"(network {r['Network → clean test (%)']:.1f}%, chance {r['Chance']:.1f}%)" for r in rows)
    return Finding(claim, source, paper, f"MNIST, {n} test digits: " + ours,
                   _grade(int(above[0]) + int(not above[1]), 2), rule)


def _sweeps(board: Leaderboard) -> list[Finding]:
    return [
        _checked(board, "unbounded-eps", "PGD with unbounded eps drives accuracy to ~0 (the robustness is real)",
                 "Shafahi et al. (001) Appendix, Table 9",
                 "CIFAR-10 LSq + GN model: 30 steps at eps 50 (0-255 scale) leave 14%, 200 steps at eps 255 leave 0%",
                 "accuracy reaches ~0 at the unbounded eps"),
        _checked(board, "restart-sweep", "Accuracy plateaus over random restarts", "Shafahi et al. (001) Appendix, Table 10",
                 "1-9 restarts of PGD change accuracy by under a point", "converged"),
        _checked(board, "step-sweep", "Accuracy plateaus over PGD steps", "Shafahi et al. (001) Appendix, Table 11",
                 "20 to 1,000 PGD steps change accuracy by a few points", "converged"),
    ]


def findings(board: Leaderboard) -> list[Finding]:
    """Every claim, in the order of the source documents."""
    return [label_leaking(board), leak_bound(board), perturbation_carries_label(board),
            perturbation_carries_label(board, "least-likely"), one_step_training_fails_iterative(board),
            targeted_one_step_trains_best(board), ls_gn_near_adversarial_training(board), noise_is_the_ingredient(board),
            linearization_underestimates(board), units_deactivated(board), *_sweeps(board), robust_feature_leakage(board),
            second_order_beats_pgd(board), linf_training_fails_at_l2(board), *cross_norm_findings(board),
            *kurakin_findings(board), *transfer_findings(board), *not_measured(measured=frozenset(
                source for source, rows in ((CROSS_NORM_SOURCE, cross_norm_rows), (CAPACITY_SOURCE, capacity_rows),
                                            (TRANSFER_SOURCE, lambda b: matrix_rows(b, 0))) if rows(board)))]


def render_dead_units_figure(board: Leaderboard, path: Path) -> bool:
    """Shafahi et al. Fig. 10: each feature unit's summed |activation| over the test digits, sorted, per defense."""
    curves = {d.name: np.sort(np.asarray(board.dead_units[d.name].measurements["unit_activation_sum"], float))[::-1]
              for d in board.spec.defenses if (board.dead_units or {}).get(d.name) is not None}
    if not curves:
        return False
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7.5, 4.2))
    for (name, sums), (color, style) in zip(curves.items(), _line_styles(len(curves))):
        axis.plot(np.arange(1, len(sums) + 1), np.maximum(sums / max(sums.max(), 1e-30), 1e-8), label=name,
                  color=color, linestyle=style)
    axis.set_yscale("log")
    axis.set_xlabel("feature unit (sorted by summed activation)")
    axis.set_ylabel("summed |activation| / largest unit's (dead: 1e-8)")
    axis.set_title(f"{board.spec.name}: feature-layer activation per unit (Shafahi et al. Fig. 10)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def render_findings(board: Leaderboard, out_dir: Path, *, command: str, commit: str) -> str:
    rows = findings(board)
    table = pd.DataFrame([{"Claim": f.claim, "Source": f.source, "Paper": f.paper, "Ours": f.ours, "Verdict": f.verdict,
                           "Rule": f.rule} for f in rows])
    counts = table["Verdict"].value_counts()
    tally = ", ".join(f"{counts.get(v, 0)} {v}" for v in (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED, NOT_RUN)
                      if counts.get(v, 0))
    lines = [
        f"# Findings: {board.spec.name}",
        "",
        f"Generated by `{command}` from the results store; code commit `{commit}`; {datetime.date.today().isoformat()}. "
        "Never edit by hand.",
        "",
        "Each row is a claim of a source document (`../shared/seeds/`), the paper's setting and number, ours on this "
        "benchmark and a **verdict computed from the stored per-example results** by the rule in the last column: "
        f"**{REPRODUCED}**, **{PARTLY}** or **{NOT_REPRODUCED}**; **{NOT_MEASURED}** where this benchmark lacks the "
        f"models or attacks (the row says which), **{NOT_RUN}** where cells are not in the store yet. Our settings "
        f"are this benchmark's ({board.spec.eval_examples} test examples; models and training in its TOML, and for "
        "the quick profile the README's 'What the quick profile trades away'): where we contradict a paper, a "
        "setting of ours is a candidate cause, and the row stands as measured rather than the settings being tuned "
        "until it agrees.",
        "",
        f"Tally: {tally}.",
        "",
        "## Claims",
        "",
        markdown_table(table),
        "",
    ]
    cross_norm = cross_norm_rows(board)
    if cross_norm:
        lines += ["## The cross-norm table (Li et al. Table 1)", "",
                  "Each training method under PGD and S-O at L∞ and at L2, **each attack's own accuracy on every test "
                  "digit** (columns marked `standalone`, or first in their chain, after the clean evaluation only), "
                  "then **Worst**: the per-example worst case of every column of that norm, the benchmark's strongest "
                  "attacks included (they run on what the four left). **Paper**: Li et al.'s MNIST numbers (Madry's "
                  "CNN, full MNIST); " + READING + ". "
                  "The paper's L2 bound was lost too: L2 2.0 is our choice.", "",
                  markdown_table(pd.DataFrame(cross_norm), digits=1), ""]
    table5 = table5_rows(board)
    if table5:
        lines += ["## One-step adversaries for adversarial training (Kurakin et al. Table 5)", "",
                  "Each row trained with Algorithm 1 and the named one-step adversary (or none); accuracy on each "
                  "column's adversarial images over every test digit, clean-misclassified ones included, as the paper "
                  "counts it. The paper's row for the same adversary is beside ours (ImageNet, eps of 255).", "",
                  markdown_table(pd.DataFrame(table5), digits=1), ""]
    capacity = capacity_rows(board)
    if capacity:
        figure = Path("figures") / f"{board.spec.name}-capacity.png"
        render_capacity_figure(board, capacity, out_dir / figure)
        lines += ["## Model capacity (Kurakin et al. Sec. 4.3)", "",
                  f"Accuracy ratio adversarial / clean at L∞ {board.spec.rank_by[1]:g} (the rank-by eps) per width; "
                  "above 1 the attack helps the model (label leaking).", "",
                  markdown_table(pd.DataFrame(capacity), digits=3), "",
                  f"![accuracy ratio against width]({figure.as_posix()})", ""]
    lines += transfer_section(board, out_dir)
    linear = linearized_rows(board)
    if linear:
        lines += ["## Linearized vs empirical robustness (Shafahi et al. Table 1)", "",
                  "**Linear (Eq. 4)**: the share of examples whose eps_L exceeds eps (L∞: dual L1 norm of the gradient "
                  "gap; L2: its L2 norm), from the `linearized-robustness` probe; **Worst case**: our worst case on the "
                  "same examples. The paper puts PGD on cross-entropy and on the CW margin side by side; here the worst "
                  "case includes cross-entropy PGD and the targeted DLR (a margin loss) APGD of the board's columns, "
                  "and no separate CW-loss PGD column runs.", "",
                  markdown_table(pd.DataFrame(linear), digits=1), ""]
    units = dead_unit_rows(board)
    if units:
        figure = Path("figures") / f"{board.spec.name}-dead-units.png"
        drawn = render_dead_units_figure(board, out_dir / figure)
        lines += ["## Dead feature units (Shafahi et al. Appendix E)", "",
                  "Per defense, the feature layer (the input of the logit layer) summed over the test digits: **Dead** "
                  f"units sum to at most {DEAD_SHARE:g} of the mean unit's; **Never active** units are zero on every digit.",
                  "", markdown_table(pd.DataFrame(units), digits=1), ""]
        lines += [f"![summed activation per feature unit]({figure.as_posix()})", ""] if drawn else []
    return "\n".join(lines)
