"""Kurakin et al. (002) Sec. 4.4 and Appendix C on a findings board: adversarial examples crafted on one model and
classified by independently trained ones (`[transfer]` in the benchmark TOML). Tables 4 and 6 as source x target
matrices of the transfer rate and the error rate per method, Fig. 2 as the transfer rate against eps, and the two
claims. Every number comes from the stored [transfer] cells: one per (source, method, eps), crafted once on the
source and classified by every model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.figures import pyplot, save_figure
from harness.registry import ATTACKS, Family
from harness.reports.aggregate import Leaderboard
from harness.reports.claims import NOT_MEASURED, NOT_RUN, Finding, _grade
from harness.reports.markdown import markdown_table
from harness.store import CellRecord

# The paper's off-diagonal means over its 12 (source, target) pairs of Inception v3 A/B, v3-ELU C and v4 D, top-1, at
# eps 16 of 255: (transfer rate, Table 4; error rate, Table 6), computed from the tables' rounded entries.
PAPER_MEANS = {"fgsm": (54.25, 50.75), "iter-basic": (38.83, 46.17), "iter-ll": (11.92, 30.75)}


def _letters(board: Leaderboard) -> dict[str, str]:
    return {name: chr(ord("A") + i) for i, name in enumerate(board.spec.transfer.models)}


def _family(attack_id: str) -> Family:
    return ATTACKS.info(attack_id)["family"]


def rates(record: CellRecord, target: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((transferred, eligible), (misclassified, examples)) of the cell's examples on its `target`-th model.

    Transfer rate (Table 4): among the examples the source classifies correctly clean and wrongly adversarial, and
    the target classifies correctly clean, the share the target misclassifies. Error rate (Table 6): the share of
    every adversarial example the target misclassifies, nothing filtered."""
    target_clean = np.asarray(record.measurements["target_clean"][target], bool)
    target_adv = np.asarray(record.measurements["target_adv"][target], bool)
    eligible = record.clean_correct & ~record.adv_correct & target_clean
    return (int((eligible & ~target_adv).sum()), int(eligible.sum())), (int((~target_adv).sum()), len(target_adv))


def _percent(count: tuple[int, int]) -> float | None:
    return None if count[1] == 0 else 100 * count[0] / count[1]


def _fooled(record: CellRecord | None) -> float | None:
    """The share of all examples the source itself misclassifies (%)."""
    return None if record is None else 100 * float(np.mean(~record.adv_correct))


def _record(board: Leaderboard, source: str, attack_id: str, eps: float) -> CellRecord | None:
    return (board.transfer or {}).get((source, attack_id, eps))


def model_rows(board: Leaderboard) -> list[dict]:
    """The models of the matrices: letter, defense, architecture, training seed and clean accuracy."""
    transfer = board.spec.transfer
    if transfer is None:
        return []
    first = _record(board, transfer.models[0], transfer.attacks[0].attack_id, transfer.eps[0])
    rows = []
    for index, (name, letter) in enumerate(_letters(board).items()):
        defense = board.spec.defenses_by_name[name]
        clean = None if first is None else 100 * float(np.mean(first.measurements["target_clean"][index]))
        rows.append({"Model": letter, "Defense": name, "Recipe": "external" if defense.recipe is None
                     else f"{defense.recipe.name}: {defense.recipe.summary()}",
                     "Training seed": board.spec.training_seed(defense), "Clean": clean})
    return rows


def matrix_rows(board: Leaderboard, which: int) -> list[dict]:
    """One row per (eps, method, source) with the rate on every target (`which`: 0 transfer rate, 1 error rate),
    its mean over the other models and the paper's mean for the method where the paper has it."""
    transfer = board.spec.transfer
    if transfer is None:
        return []
    letters = _letters(board)
    rows = []
    for eps in transfer.eps:
        for attack in transfer.attacks:
            for source in transfer.models:
                record = _record(board, source, attack.attack_id, eps)
                row = {"eps": f"{attack.norm.symbol} {eps:g}", "Method": attack.attack_id,
                       "Source": f"{letters[source]} {source}"}
                counts = {t: None if record is None else rates(record, i)[which] for i, t in enumerate(transfer.models)}
                values = {t: None if c is None else _percent(c) for t, c in counts.items()}
                row.update({f"→ {letters[t]}": v for t, v in values.items()})
                others = [v for t, v in values.items() if t != source and v is not None]
                row["Mean, others"] = float(np.mean(others)) if len(others) == len(values) - 1 else None
                if which == 0:  # the examples each rate is a share of: source fooled, target right on the clean one
                    eligible = [c[1] for t, c in counts.items() if t != source and c is not None]
                    row["n, others"] = f"{min(eligible)}-{max(eligible)}" if eligible else None
                    row["Source fooled"] = _fooled(record)
                paper = PAPER_MEANS.get(attack.attack_id)
                row["Paper, mean"] = None if paper is None else paper[which]
                rows.append(row)
    return rows


def sweep_rows(board: Leaderboard) -> list[dict]:
    """Fig. 2: the first model's examples on the second, transfer rate per method and sweep eps (with the share of
    examples the source itself misclassifies)."""
    transfer = board.spec.transfer
    if transfer is None or not transfer.sweep:
        return []
    source, target = transfer.models[:2]
    rows = []
    for attack in transfer.attacks:
        row = {"Method": attack.attack_id, "From → to": f"{source} → {target}"}
        for eps in transfer.sweep:
            record = _record(board, source, attack.attack_id, eps)
            row[f"{eps:g}"] = None if record is None else _percent(rates(record, 1)[0])
            row[f"{eps:g} fooled"] = _fooled(record)
        rows.append(row)
    return rows


def render_sweep_figure(board: Leaderboard, rows: list[dict], path: Path) -> None:
    """Kurakin et al. Fig. 2: transfer rate against eps, one line per method."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 4))
    sweep = board.spec.transfer.sweep
    for row in rows:
        points = [(eps, row[f"{eps:g}"]) for eps in sweep if row[f"{eps:g}"] is not None]
        if points:
            axis.plot(*zip(*points), marker="o", linestyle="-" if _family(row["Method"]) is Family.ONE_STEP else "--",
                      label=row["Method"])
    axis.set_xlabel(f"eps ({board.spec.transfer.attacks[0].norm.symbol}, [0, 1] pixel units)")
    axis.set_ylabel("transfer rate (%)")
    axis.set_title(f"{board.spec.name}: transfer rate {rows[0]['From → to']} (Kurakin et al. Fig. 2)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _pairs(board: Leaderboard) -> list[tuple[int, str]]:
    """Every off-diagonal (source, target) pair as (target index, source name)."""
    models = board.spec.transfer.models
    return [(t, s) for i, s in enumerate(models) for t in range(len(models)) if t != i]


def one_step_transfers_more(board: Leaderboard) -> Finding:
    claim = "One-step adversarial examples transfer more than iterative ones"
    source = "Kurakin et al. (002) Sec. 4.4, Tables 4, 6"
    paper = ("ImageNet, Inception v3 A/B, v3-ELU C, v4 D, eps 16 of 255, top-1 transfer rate off the diagonal: "
             "FGSM 47-59%, basic iter. 30-46%, iter. l.l. 9-15%")
    rule = ("reproduced when, on every off-diagonal (source, target) pair at every table eps, each one-step method's "
            "transfer rate exceeds each iterative method's; partly: on some pairs (no sampling test)")
    transfer = board.spec.transfer
    families = {} if transfer is None else {a.attack_id: _family(a.attack_id) for a in transfer.attacks}
    one_step = [a for a, f in families.items() if f is Family.ONE_STEP]
    iterative = [a for a, f in families.items() if f is Family.ITERATIVE]
    if not one_step or not iterative:
        return Finding(claim, source, paper, "needs [transfer] with one-step and iterative attacks", NOT_MEASURED, rule)
    records = {(s, a, e): _record(board, s, a, e) for s in transfer.models for a in families for e in transfer.eps}
    if any(r is None for r in records.values()):
        return Finding(claim, source, paper, "[transfer] cells missing from the store", NOT_RUN, rule)
    held, total, means = 0, 0, {a: [] for a in families}
    for eps in transfer.eps:
        for target, name in _pairs(board):
            rate = {a: _percent(rates(records[(name, a, eps)], target)[0]) for a in families}
            for a, value in rate.items():
                means[a].append(value)
            total += 1
            held += all(rate[o] is not None and rate[i] is not None and rate[o] > rate[i]
                        for o in one_step for i in iterative)
    eps_text = ", ".join(f"{e:g}" for e in transfer.eps)
    ours = (f"{len(transfer.models)} models, {transfer.attacks[0].norm.symbol} {eps_text}, mean off-diagonal transfer "
            "rate: " + ", ".join(f"{a} {np.mean([v for v in means[a] if v is not None]):.1f}%" for a in families) +
            f"; one-step above iterative on {held} of {total} pairs")
    return Finding(claim, source, paper, ours, _grade(held, total), rule)


def transfer_rises_with_eps(board: Leaderboard) -> Finding:
    claim = "Adversarial examples transfer more at larger eps"
    source = "Kurakin et al. (002) Sec. 4.4, Fig. 2"
    paper = ("ImageNet, Inception v3 A → B, eps 2-16 of 255: every method's transfer rate rises with eps (from 8 to "
             "16 the source-fooled count grows under 1%, the transferred count over 20%)")
    rule = ("reproduced when, for every method, the first model's examples transfer to the second at a rate that never "
            "falls from one sweep eps to the next and ends above where it starts; partly: for some methods")
    rows = sweep_rows(board)
    if not rows:
        return Finding(claim, source, paper, "needs [transfer] with a sweep", NOT_MEASURED, rule)
    sweep = board.spec.transfer.sweep
    if any(row[f"{eps:g}"] is None for row in rows for eps in sweep):
        return Finding(claim, source, paper, "[transfer] cells missing from the store", NOT_RUN, rule)
    curves = {row["Method"]: [row[f"{eps:g}"] for eps in sweep] for row in rows}
    held = sum(all(b >= a for a, b in zip(c, c[1:])) and c[-1] > c[0] for c in curves.values())
    norm = board.spec.transfer.attacks[0].norm.symbol
    where = f"{rows[0]['From → to']}, {norm} " + ", ".join(f"{e:g}" for e in sweep)
    ours = where + ": " + "; ".join(f"{m} " + " → ".join(f"{v:.1f}" for v in c) + "%" for m, c in curves.items())
    return Finding(claim, source, paper, ours, _grade(held, len(curves)), rule)


def transfer_findings(board: Leaderboard) -> list[Finding]:
    """The two claims, on a benchmark with [transfer]; elsewhere the board's 'not measured here' row stands for them."""
    return [] if board.spec.transfer is None else [one_step_transfers_more(board), transfer_rises_with_eps(board)]


TRANSFER_READING = (
    "Adversarial examples crafted once on each model (every test digit, each attack run to its end, no early stop) and "
    "classified by every model. **Transfer rate** (Table 4): among the examples the source classifies correctly clean "
    "and wrongly adversarial, and the target correctly clean, the share the target misclassifies (100 on the "
    "diagonal by definition); **n, others**: how many examples each off-diagonal rate is a share of, and **Source "
    "fooled** the share of all digits the source misclassifies (where it is small, the rate is a share of few, easy "
    "examples; at the paper's eps the iterative methods fooled over 99% of its images). **Error rate** (Table 6): the "
    "share of all adversarial examples the target misclassifies, nothing filtered (the diagonal is the white-box "
    "error). **Paper, mean**: the paper's mean over its 12 off-diagonal pairs, top-1, ImageNet at eps 16 of 255.")


def transfer_section(board: Leaderboard, out_dir: Path) -> list[str]:
    """The findings board's transferability section (markdown lines); empty without [transfer]."""
    if board.spec.transfer is None:
        return []
    lines = ["## Transferability (Kurakin et al. Tables 4 and 6, Fig. 2)", "", TRANSFER_READING, "",
             markdown_table(pd.DataFrame(model_rows(board)), digits=1), "",
             "### Transfer rate (Table 4)", "", markdown_table(pd.DataFrame(matrix_rows(board, 0)), digits=1), "",
             "### Error rate (Table 6)", "", markdown_table(pd.DataFrame(matrix_rows(board, 1)), digits=1), ""]
    sweep = sweep_rows(board)
    if sweep:
        figure = Path("figures") / f"{board.spec.name}-transfer-eps.png"
        render_sweep_figure(board, sweep, out_dir / figure)
        lines += ["### Transfer rate against eps (Fig. 2)", "",
                  "The first model's examples on the second at each eps of the sweep; **fooled**: the share of all "
                  "examples the source itself misclassifies.", "",
                  markdown_table(pd.DataFrame(sweep), digits=1), "",
                  f"![transfer rate against eps]({figure.as_posix()})", ""]
    return lines
