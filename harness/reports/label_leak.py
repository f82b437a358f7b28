"""The label-leak board: Kurakin et al.'s leaked-label counts, the perturbation probe and robust-feature leakage."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from attacks_ext.label_leak import perturbation_probe_rows, robust_feature_rows, score_label_leak
from defenses.probes import robust_feature_settings
from harness.cells import CLEAN
from harness.figures import pyplot, save_figure
from harness.reports.ranking import interval_footnote
from harness.reports.aggregate import Leaderboard
from harness.reports.markdown import markdown_table as _markdown
from harness.spec import BenchmarkSpec
from harness.store import CellRecord


def label_leak_frame(board: Leaderboard) -> pd.DataFrame:
    """One row per (defense, twin pair, eps): Kurakin's leaked-label count from the stored vectors."""
    spec, found = board.spec, board.outcomes
    attacks = {a.label: a for a in spec.attacks}
    rows = []
    for defense in spec.defenses:
        clean = found[(defense.name, CLEAN, 0.0)]
        for true_label, free in spec.label_leak_pairs:
            for eps in attacks[true_label].eps:
                a, b = found[(defense.name, true_label, eps)], found[(defense.name, free, eps)]
                row = {"Defense": defense.name, "Twins": f"{true_label} / {free}", "eps": f"ε={eps:g}"}
                if clean is None or a is None or b is None:
                    rows.append(row)
                    continue
                score = score_label_leak(clean.clean_correct, a.adv_correct, b.adv_correct)
                row.update({"Clean": 100 * score.clean_accuracy, "True-label adv.": 100 * score.true_label_accuracy,
                            "Label-free adv.": 100 * score.label_free_accuracy, "Leaked": score.leaked,
                            "Reverse": score.reverse, "Bound: clean errors": score.clean_errors,
                            "Leaked %": 100 * score.leaked_rate, "Adv. > clean": "yes" if score.signature else "no"})
                rows.append(row)
    return pd.DataFrame(rows)


def render_label_leak_figure(spec: BenchmarkSpec, frame: pd.DataFrame, path: Path) -> None:
    """Accuracy vs eps under the true-label attack (solid) and its label-free twin (dashed), per defense."""
    plt = pyplot()

    pairs = list(dict.fromkeys(frame["Twins"]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, pair in zip(axes[0], pairs):
        for index, (defense, rows) in enumerate(frame[frame["Twins"] == pair].groupby("Defense", sort=False)):
            rows = rows.dropna(subset=["Clean"])
            if rows.empty:
                continue
            eps = [0.0] + [float(e.removeprefix("ε=")) for e in rows["eps"]]
            color = colors[index % len(colors)]
            axis.plot(eps, [rows["Clean"].iloc[0]] + list(rows["True-label adv."]), color=color, marker="o", label=defense)
            axis.plot(eps, [rows["Clean"].iloc[0]] + list(rows["Label-free adv."]), color=color, marker="x", linestyle="--")
        axis.set_title(f"{spec.name}: {pair} (solid: true label, dashed: label-free)", fontsize=9)
        axis.set_xlabel("eps")
        axis.set_ylabel("accuracy on adversarial examples (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def perturbation_probe_frame(board: Leaderboard) -> pd.DataFrame:
    """One row per (defense, gradient label): held-out accuracy of the linear probes, from the stored cell."""
    rows = []
    for defense in board.spec.defenses:
        record = board.perturbation.get(defense.name)
        if record is None:
            rows.append({"Defense": defense.name})
            continue
        rows += [{"Defense": defense.name, **row} for row in perturbation_probe_rows(record.measurements)]
    return pd.DataFrame(rows)


def robust_features_section(spec: BenchmarkSpec, record: CellRecord | None) -> list[str]:
    """The label-leak board's robust-feature leakage section (Ilyas et al.'s data sets, Goh's lower bound)."""
    if not spec.robust_features:
        return []
    o = robust_feature_settings(dict(spec.robust_features))
    lines = [
        "## Robust-feature leakage",
        "",
        f"Ilyas et al.'s data sets, built on the `{o['source']}` model from the first {o['train_examples']:,} training "
        f"images: targeted L2 PGD ({o['steps']} steps, eps {o['eps']:g}) towards a new label, and the image relabelled "
        "with it: **D_rand** a uniformly random other class, **D_det** the next class, (y + 1) mod C. **Target "
        "reached** is how often the attack made the model predict its target. A fresh "
        f"`{o['network']}` trained on each data set (natural recipe, {o['epochs']} epochs) is tested on the clean "
        f"test examples (**Network → clean test**). Goh's lower bound on how much of that comes from robust "
        "features leaking into the attacks: a linear classifier (ridge regression on one-hot labels) fitted on the "
        f"same data set but seeing only the 10 features w_i·x of a robust linear model (trained on the clean training "
        f"images against its exact worst case in an L2 ball of radius {o['radius']:g}) is tested the same way "
        "(**Robust linear features → clean test**). Accuracy far above chance from robust features alone says the "
        "attacks planted features a robust model can see, not only non-robust ones.",
        "",
    ]
    if record is None:
        return lines + ["_Not run yet: the cell is missing from the store._", ""]
    m = record.measurements
    true = np.asarray(m["true_label"])
    lines += [_markdown(pd.DataFrame(robust_feature_rows(m)), digits=1), "",
              f"The robust linear model itself: {100 * float((m['linear_predictions'] == true).mean()):.1f}% clean test "
              f"accuracy; its prediction is certified constant in the L2 ball of radius {o['radius']:g} on "
              f"{100 * float(np.asarray(m['linear_certified']).mean()):.1f}% of the test examples (Goh's specification "
              "2 asks for at least 80%).", ""]
    return lines


def render_label_leak_markdown(spec: BenchmarkSpec, frame: pd.DataFrame, *, command: str, commit: str, figure: str,
                               probe: pd.DataFrame | None = None, robust_features: list[str] = ()) -> str:
    lines = [
        f"# Label leaking: {spec.name}",
        "",
        f"Generated by `{command}` from the results store; code commit `{commit}`; {datetime.date.today().isoformat()}. "
        "Never edit by hand.",
        "",
        "Kurakin et al. 2017: an example is **leaked** when the model classifies the true-label one-step adversarial "
        "example correctly but misclassifies its twin built without the true label; **Reverse** counts the opposite. "
        "Accuracies here are plain accuracy on the adversarial examples (not clean-and-adversarial). "
        "**Bound:** with FGSM-pred as the twin, the two examples are identical wherever the clean prediction is "
        "right, so Leaked + Reverse can never exceed the clean errors. **Adv. > clean** is the label-leaking "
        f"signature: accuracy on true-label adversarial examples above clean accuracy. {spec.eval_examples} test examples.",
        "",
        "## Leaked-label counts",
        "",
        _markdown(frame),
        "",
        interval_footnote(spec.eval_examples, "Every accuracy on this board", stored=False),
        "",
        f"![accuracy vs eps, true-label and label-free]({figure})",
        "",
    ]
    if probe is not None:
        lines += [
            "## Perturbation probe",
            "",
            "Does the one-step perturbation itself carry the label? A linear classifier (ridge regression on "
            "one-hot labels, ridge 100, 5-fold cross-validated on the same test examples) sees only the sign of the input gradient, "
            "mapped to clip(sign(g) + 1, 0, 1), and predicts the true label (**→ true label**) or the label that "
            "built the gradient (**→ its own label**); **Raw pixels** is the same classifier on the images, "
            "**Chance** the most frequent label's share. The gradient is built from the true, the predicted, the "
            "least-likely and a random wrong label. A perturbation from the true label that predicts it far better "
            "than the pixels do carries the label; compare with the wrong-label rows before reading it as leaking: "
            "any class-conditional gradient encodes the class it was built from.",
            "",
            _markdown(probe),
            "",
        ]
    return "\n".join(lines + list(robust_features))
