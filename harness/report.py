"""Leaderboards from the store: pandas frames rendered to markdown with tabulate, figures with matplotlib.

Every number is computed here from the stored per-example vectors. `compare` parses two rendered
leaderboards and lists the numbers that drifted, which is how CI proves the committed file matches
the code.
"""
from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.data import Dataset
from harness.figures import pyplot, save_figure
from harness.matrix import CLEAN, LABEL_LEAK, PERTURBATION_PROBE, ROBUST_FEATURES, Cell, cascade_order, code_commit, library_versions, plan, runs_on_every_example
from harness.spec import BenchmarkSpec
from attacks_ext.checks import Check, Evidence, Status, Verdict
from attacks_ext.label_leak import perturbation_probe_rows, robust_feature_rows, robust_feature_settings, score_label_leak
from harness.store import CellRecord, ResultStore
from harness.threat import Norm

MISSING = "—"
MISSING_VERDICT = "**missing**"  # an overall sanity verdict that could not be reached: never blank, never a pass


def _column(norm: Norm, eps: float, label: str | None = None) -> str:
    head = f"{norm.symbol} {eps:g}"
    return head if label is None else f"{label} @ {head}"


@dataclass
class Leaderboard:
    """The aggregated results of one benchmark, ready to render."""

    spec: BenchmarkSpec
    summary: pd.DataFrame  # one row per defense: source, clean, worst case per (norm, eps)
    details: dict[Norm, pd.DataFrame]  # per norm: one row per defense, clean + attack @ eps
    curves: dict[str, dict[Norm, list[tuple[float, float]]]]  # defense -> norm -> (eps, worst-case accuracy)
    costs: pd.DataFrame  # one row per defense: training and evaluation cost
    trainings: dict[str, dict]  # defense -> training log (per-epoch metrics, cost, guard events)
    outcomes: dict[tuple[str, str, float], CellRecord | None]  # (defense, column, eps) -> stored cell
    missing: list[str]
    commits: list[str]
    versions: dict
    checks: dict[str, Check]  # check id -> the configured check
    evidence: dict[str, dict[str, Evidence]]  # check id -> defense -> what that check reads
    verdicts: dict[str, dict[str, Verdict]]  # defense -> check id -> verdict
    perturbation: dict[str, CellRecord | None]  # defense -> its perturbation-probe cell (label-leak board)
    robust_features: CellRecord | None = None  # the D_rand / D_det cell (label-leak board), when the spec asks


def sanity_file(spec: BenchmarkSpec) -> str:
    return "sanity.md" if spec.name == "mnist-quick" else f"{spec.name}-sanity.md"


def defense_anchor(name: str) -> str:
    """The GitHub anchor of the '## Defense: <name>' heading in the sanity board."""
    return "defense-" + re.sub(r"[^a-z0-9 _-]", "", f"{name}".lower()).replace(" ", "-")


def gather_evidence(spec: BenchmarkSpec, cells: list[Cell], records: dict[str, CellRecord]) -> dict[str, dict[str, Evidence]]:
    """Per check and defense: the matrix's cells of that defense and the cells the check asked for."""
    context = spec.check_context()
    columns = {c.label: c for c in context.columns}
    matrix: dict[str, dict] = {}
    requested: dict[tuple[str, str], dict] = {}
    for cell in cells:
        if cell.check is None:
            matrix.setdefault(cell.defense, {})[(cell.label, cell.eps)] = records.get(cell.key)
        else:
            requested.setdefault((cell.check, cell.defense), {})[cell.request] = records.get(cell.key)
    return {check.check_id: {d.name: Evidence(d.name, context, columns, matrix.get(d.name, {}),
                                              requested.get((check.check_id, d.name), {}))
                             for d in spec.defenses}
            for check in spec.checks}


def overall(verdicts: dict[str, Verdict]) -> Status | None:
    """The worst verdict of a defense's checks, ignoring the ones that do not apply; None while any is missing
    (the board then says so above the ranking: a missing verdict never reads as a pass)."""
    statuses = [v.status for v in verdicts.values()]
    if Status.FAIL in statuses:  # one failing check is enough, whatever else is missing
        return Status.FAIL
    if not statuses or any(s is None for s in statuses):
        return None
    return max(statuses)


def attacked_count(cell: Cell, record: CellRecord) -> int:
    """Examples the cell attacked: a cascade stores its mask; otherwise every example."""
    mask = record.measurements.get("attacked")
    return cell.examples if mask is None else int(np.count_nonzero(mask))


def naive_costs(cells: list[Cell], records: dict[str, CellRecord]) -> dict[str, tuple[float, float] | None]:
    """Per stored cell, the (forward, gradient) evaluations of the same attack on every example, run to the end.

    Our iterative attacks know that cost exactly (`Attack.evaluations_to_end`). Other attacks cost the same per
    example wherever they run, so their cost per attacked example, pooled over every cell of the same attack,
    options and eps, is scaled to all examples (None where no cell of it attacked anything). Clean cells and
    probes are not attacks: their cost is their own."""
    unique = {cell.key: cell for cell in cells if cell.key in records}
    pooled: dict[tuple, list[float]] = {}
    exact: dict[str, tuple[float, float]] = {}
    for key, cell in unique.items():
        record = records[key]
        if cell.attack is None:
            exact[key] = (record.forward_evals, record.gradient_evals)
            continue
        to_end = cell.attack.build().evaluations_to_end(cell.examples, cell.eps)
        if to_end is not None:
            exact[key] = to_end
            continue
        totals = pooled.setdefault((cell.attack.attack_id, cell.attack.options, cell.eps, cell.source), [0.0, 0.0, 0])
        totals[0] += record.forward_evals
        totals[1] += record.gradient_evals
        totals[2] += attacked_count(cell, record)
    naive: dict[str, tuple[float, float] | None] = {}
    for key, cell in unique.items():
        if key in exact:
            naive[key] = exact[key]
            continue
        forward, gradient, attacked = pooled[(cell.attack.attack_id, cell.attack.options, cell.eps, cell.source)]
        naive[key] = None if attacked == 0 else (forward / attacked * cell.examples, gradient / attacked * cell.examples)
    return naive


def build(spec: BenchmarkSpec, store: ResultStore, data: Dataset) -> Leaderboard:
    all_cells = plan(spec, data)
    records = store.cells(list(dict.fromkeys(cell.key for cell in all_cells)))
    cells = [cell for cell in all_cells if cell.check is None]  # the board's columns; checks report separately
    by_defense: dict[str, list[tuple[Cell, CellRecord | None]]] = {}
    for cell in cells:
        by_defense.setdefault(cell.defense, []).append((cell, records.get(cell.key)))
    missing = list(dict.fromkeys(cell.describe() for cell in all_cells if cell.key not in records))
    evidence = gather_evidence(spec, all_cells, records)
    checks = {check.check_id: check.build() for check in spec.checks}
    naive = naive_costs(all_cells, records)
    verdicts = {d.name: {check_id: checks[check_id].evaluate(evidence[check_id][d.name]) for check_id in checks}
                for d in spec.defenses}

    sanity_cells: dict[str, dict[str, CellRecord]] = {}  # defense -> stored check cells, each key once
    for cell in all_cells:
        if cell.check in checks and cell.key in records:
            sanity_cells.setdefault(cell.defense, {})[cell.key] = records[cell.key]
    leak_cells: dict[str, list[Cell]] = {}  # defense -> its label-leak board cells (probes, D_rand / D_det)
    for cell in all_cells:
        if cell.check == LABEL_LEAK:
            leak_cells.setdefault(cell.defense, []).append(cell)
    probes = {cell.defense: cell for cells in leak_cells.values() for cell in cells if cell.request == PERTURBATION_PROBE}
    robust_cell = next((cell for cells in leak_cells.values() for cell in cells if cell.request == ROBUST_FEATURES), None)

    summary_rows, detail_rows, costs_rows, curves = [], {norm: [] for norm, _ in spec.eps}, [], {}
    trainings: dict[str, dict] = {}
    for defense in spec.defenses:
        pairs = by_defense[defense.name]
        clean_record = pairs[0][1]
        clean = clean_record.clean_correct if clean_record is not None else None
        training = (store.defense(pairs[0][0].defense_key) or {}).get("training", {})
        training_evals = sum(training.get(k, 0) for k in ("forward_passes", "backward_passes", "source_passes"))
        summary = {"Defense": defense.name, "Source": defense.kind}
        if spec.checks:
            status = overall(verdicts[defense.name])
            summary["Sanity"] = (MISSING_VERDICT if status is None else
                                 f"[{status.label}]({sanity_file(spec)}#{defense_anchor(defense.name)})")
        summary.update({"Training evals (k)": training_evals / 1e3 if defense.recipe is not None and training else None,
                        "Clean": None if clean is None else 100 * clean.mean()})
        details = {norm: {"Defense": defense.name, "Clean": summary["Clean"]} for norm in detail_rows}
        curves[defense.name] = {}
        for norm, grid in spec.eps:
            curve = [] if clean is None else [(0.0, 100 * clean.mean())]
            for eps in grid:
                at_eps = [(c, r) for c, r in pairs if c.attack is not None and c.attack.norm is norm and c.eps == eps]
                complete = at_eps and all(r is not None for _, r in at_eps)
                worst = np.logical_and.reduce([r.robust_correct for _, r in at_eps]) if complete else None
                summary[f"Worst {_column(norm, eps)}"] = None if worst is None else 100 * worst.mean()
                if worst is not None:
                    curve.append((eps, 100 * worst.mean()))
                for c, r in at_eps:
                    details[norm][_column(norm, eps, c.attack.label)] = None if r is None else r.robust_accuracy
            curves[defense.name][norm] = curve
        summary_rows.append(summary)
        for norm in detail_rows:
            detail_rows[norm].append(details[norm])
        own = pairs + [(cell, records.get(cell.key)) for cell in leak_cells.get(defense.name, [])]
        present = [r for _, r in own if r is not None]  # the matrix and the label-leak board's cells
        checked = sanity_cells.get(defense.name, {}).values()
        matrix_naive = [naive.get(c.key) for c, r in own if r is not None]
        checks_naive = [naive.get(key) for key in sanity_cells.get(defense.name, {})]
        trainings[defense.name] = training
        costs_rows.append({
            "Defense": defense.name,
            "Training s": training.get("seconds"),
            "Training fwd": training.get("forward_passes"),
            "Training bwd": training.get("backward_passes"),
            "Eval s": sum(r.seconds for r in present),
            "Eval fwd": sum(r.forward_evals for r in present),
            "Eval grad": sum(r.gradient_evals for r in present),
            "Eval naive": _total(matrix_naive),
            **({"Sanity s": sum(r.seconds for r in checked), "Sanity fwd": sum(r.forward_evals for r in checked),
                "Sanity grad": sum(r.gradient_evals for r in checked), "Sanity naive": _total(checks_naive)}
               if spec.checks else {}),
        })

    summary = pd.DataFrame(summary_rows)
    rank_column = f"Worst {_column(*spec.rank_by)}"
    # A defense whose sanity verdict is fail ranks below every other, whatever its numbers say.
    summary["_passes"] = [overall(verdicts[d.name]) is not Status.FAIL for d in spec.defenses]
    order = summary.sort_values(["_passes", rank_column, "Clean"], ascending=False, na_position="last", kind="stable").index
    summary = summary.drop(columns="_passes")
    summary = summary.loc[order].reset_index(drop=True)
    details = {norm: pd.DataFrame(rows).loc[order].reset_index(drop=True) for norm, rows in detail_rows.items()}
    costs = pd.DataFrame(costs_rows).loc[order].reset_index(drop=True)
    all_records = list(records.values())
    commits = sorted({r.git_commit for r in all_records})
    versions = all_records[0].versions if all_records else library_versions()
    outcomes = {(c.defense, c.label, c.eps): records.get(c.key) for c in cells}
    perturbation = {name: records.get(cell.key) for name, cell in probes.items()}
    return Leaderboard(spec, summary, details, curves, costs, trainings, outcomes, missing, commits, versions,
                       checks, evidence, verdicts, perturbation,
                       None if robust_cell is None else records.get(robust_cell.key))


def _total(costs: list[tuple[float, float] | None]) -> float | None:
    """Forward plus gradient evaluations summed over cells; None when any cell's is unknown."""
    return None if any(c is None for c in costs) else float(sum(f + g for f, g in costs))


def _markdown(frame: pd.DataFrame, digits: int = 1) -> str:
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    shown = frame.apply(lambda column: column.map(cell)) if len(frame) else frame
    return shown.to_markdown(index=False, disable_numparse=True, stralign="left")


def figure_name(spec: BenchmarkSpec) -> str:
    return f"{spec.name}-accuracy-vs-eps.png"


def render_figure(board: Leaderboard, path: Path) -> None:
    plt = pyplot()

    norms = [norm for norm, _ in board.spec.eps]
    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.8), squeeze=False)
    for axis, norm in zip(axes[0], norms):
        for defense, curves in board.curves.items():
            points = curves.get(norm, [])
            if points:
                eps, accuracy = zip(*points)
                axis.plot(eps, accuracy, marker="o", label=defense)
        axis.set_xlabel(f"eps ({norm.symbol}, [0, 1] input units)")
        axis.set_ylabel("worst-case robust accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.set_title(f"{board.spec.name}: {norm.symbol} threat model")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def training_figure_name(spec: BenchmarkSpec) -> str:
    return f"{spec.name}-training.png"


def render_training_figure(board: Leaderboard, path: Path) -> None:
    """One panel per trained defense: loss and clean / training-adversary / guard accuracy per epoch."""
    plt = pyplot()

    logs = {name: log for name, log in board.trainings.items() if log.get("epochs")}
    if not logs:
        return
    columns = min(5, len(logs))
    rows = -(-len(logs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat[len(logs):]:
        axis.axis("off")
    for axis, (name, log) in zip(axes.flat, logs.items()):
        epochs = [e["epoch"] for e in log["epochs"]]
        axis.plot(epochs, [e["clean_accuracy"] for e in log["epochs"]], label="clean acc. (1,000 training images)")
        adversary = [e.get("adversary_accuracy") for e in log["epochs"]]
        if any(a is not None for a in adversary):
            axis.plot(epochs, [float("nan") if a is None else a for a in adversary], label="adversary acc.")
        guard = [e.get("guard_pgd_accuracy") for e in log["epochs"]]
        if any(g is not None for g in guard):
            axis.plot(epochs, [float("nan") if g is None else g for g in guard], label="guard PGD acc.")
        axis.set_ylim(0, 1.02)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        loss_axis = axis.twinx()
        loss_axis.plot(epochs, [e["loss"] for e in log["epochs"]], color="gray", linestyle="--", label="loss")
        loss_axis.tick_params(labelsize=7, colors="gray")
        axis.tick_params(labelsize=7)
    handles = [h for axis in axes.flat[: len(logs)] for h in axis.get_legend_handles_labels()[0]]
    labels = [label for axis in axes.flat[: len(logs)] for label in axis.get_legend_handles_labels()[1]]
    unique = dict(zip(labels, handles))
    unique["loss (right axis)"] = plt.Line2D([], [], color="gray", linestyle="--")
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8)
    fig.suptitle(f"{board.spec.name}: training curves", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, path, dpi=100)


def render_markdown(board: Leaderboard, *, command: str, figure: str, training_figure: str | None = None) -> str:
    spec = board.spec
    today = datetime.date.today().isoformat()
    commit = ", ".join(board.commits) or code_commit()
    versions = ", ".join(f"{k} {v}" for k, v in sorted(board.versions.items()))
    lines = [
        f"# Leaderboard: {spec.name}",
        "",
        f"Generated by `{command}` from the results store; code commit `{commit}`; {today}. "
        "Never edit by hand: regenerate it. CI regenerates it from scratch and fails when a number drifts.",
        "",
        f"Data set `{spec.dataset}`, first {spec.eval_examples} test examples, seed {spec.seed}, batch {spec.batch_size}. "
        "Accuracies in %. Robust accuracy counts an example when it is classified correctly both clean and under "
        "the attack. **Worst** is the per-example worst case over every attack run at that norm and eps "
        "(an example counts only if it survives all of them). Rows are sorted by the worst case at "
        f"{_column(*spec.rank_by)}, then by clean accuracy. **Training evals (k)** is the training cost in "
        "thousands of model evaluations (examples sent forward plus examples back-propagated, adversary included).",
        "",
    ]
    if spec.checks:
        lines += [f"**Sanity** is the worst verdict of {len(spec.checks)} checks that tell robustness from gradient "
                  f"masking (pass / warn / fail; the link leads to its figures and reasons in `{sanity_file(spec)}`). "
                  "A defense that fails ranks below every other, whatever its accuracies.", ""]
    if board.missing:
        lines += [f"**Incomplete:** {len(board.missing)} cells are not in the store ({MISSING} below); "
                  f"run `python -m harness run {spec.path}`.", ""]
    unjudged = [name for name, verdicts in board.verdicts.items() if spec.checks and overall(verdicts) is None]
    if unjudged:
        lines += [f"**Sanity verdict missing** for {', '.join(unjudged)}: some of their checks have no evidence in the "
                  f"store (see `{sanity_file(spec)}`), so nothing vouches for their numbers; read those rows as "
                  "unchecked.", ""]
    lines += ["## Ranking", "", _markdown(board.summary), ""]
    if spec.cascade:
        every = [a.label for a in spec.attacks if runs_on_every_example(spec, a)]
        lines += ["The attack tables below ran as a **cascade**: at each eps the columns ran left to right, and each "
                  "attacked only the examples that the clean evaluation and every column to its left left standing, "
                  "so its number is the accuracy left after it and all of them (the last column at an eps is the "
                  "worst case). " + (f"{', '.join(every)} ran on every example (the label-leak twins need them all), "
                                     "so theirs are the attacks' own accuracies. " if every else "")
                  + "The worst case equals that of every attack on every example: attack randomness depends only "
                  "on the example, not on which examples share a batch.", ""]
    for norm, frame in board.details.items():
        lines += [f"## {norm.symbol} attacks", "", _markdown(frame), ""]
    lines += [f"![worst-case accuracy vs eps]({figure})", ""]
    lines += ["## Attacks", ""]
    attacks = pd.DataFrame([
        {"Column": a.label, "Attack": a.attack_id + ("" if a.source is None else f" (transfer from {a.source})"),
         "Options": ", ".join(f"{k}={v}" for k, v in a.options) or "defaults",
         "Norm": a.norm.symbol, "eps": ", ".join(f"{e:g}" for e in a.eps),
         **({"Runs on": "every example" if runs_on_every_example(spec, a) else "survivors"} if spec.cascade else {})}
        for a in (cascade_order(spec) if spec.cascade else spec.attacks)
    ])
    lines += [_markdown(attacks), ""]
    lines += ["## Defenses", ""]
    defenses = pd.DataFrame([
        {"Defense": d.name, "Source": d.kind,
         "Recipe": d.recipe.name if d.recipe else "external",
         "Trained with": d.recipe.summary() if d.recipe else f"{d.external.factory} + {d.external.weights.name}",
         "Overfitting guard": _guard_note(board.trainings.get(d.name, {}))}
        for d in spec.defenses
    ])
    lines += [_markdown(defenses), ""]
    if training_figure:
        lines += [f"![training curves]({training_figure})", ""]
    costs = board.costs.copy()
    lines += ["## Measured cost", "",
              "Seconds are wall time on the machine that produced this file; model evaluations (examples sent "
              "forward, examples whose input gradient was taken) are exact and portable. **naive** is what every "
              "attack on every example, run to the end, would have spent (forward + gradient evaluations): the "
              "saving of per-example early stop" + (" and of the cascade" if spec.cascade else "") + ".", "",
              _markdown(costs, digits=1), "", _spending(costs), ""]
    lines += [              f"Libraries: {versions}.", ""]
    return "\n".join(lines)


def _spending(costs: pd.DataFrame) -> str:
    """The run's model evaluations against the naive count, for the matrix, the checks and both."""
    parts, spent_all, naive_all = [], 0, 0.0
    for name, prefix in (("matrix", "Eval"), ("sanity checks", "Sanity")):
        if f"{prefix} naive" not in costs:
            continue
        spent = int(costs[f"{prefix} fwd"].sum() + costs[f"{prefix} grad"].sum())
        naive = None if costs[f"{prefix} naive"].isna().any() else float(costs[f"{prefix} naive"].sum())
        parts.append(f"{name} {spent:,} of {'unknown' if naive is None else f'{naive:,.0f}'}"
                     + ("" if not naive else f" ({spent / naive:.2f})"))
        spent_all += spent
        naive_all = None if naive is None or naive_all is None else naive_all + naive
    total = ("" if not naive_all else
             f"; the whole run spent {spent_all:,} model evaluations against {naive_all:,.0f} naive, a ratio of "
             f"**{spent_all / naive_all:.2f}**")
    return "Model evaluations spent of naive: " + "; ".join(parts) + total + "."


def render_sanity(board: Leaderboard, out_dir: Path, *, command: str) -> str:
    """The sanity board: a verdict matrix, each defense's verdicts with their figures and reasons, and per
    check its detail table and plot. Writes the plots under `out_dir/figures`; returns the markdown."""
    spec = board.spec
    names = [d.name for d in spec.defenses]
    order = list(board.summary["Defense"])

    def status_text(verdict: Verdict) -> str:
        return "missing" if verdict.status is None else verdict.status.label

    lines = [
        f"# Sanity checks: {spec.name}",
        "",
        f"Generated by `{command}` from the results store; code commit `{', '.join(board.commits) or code_commit()}`; "
        f"{datetime.date.today().isoformat()}. Never edit by hand.",
        "",
        "Each check is a pure function of stored per-example results (the matrix's cells plus the extra cells and "
        "probes it asks for, computed by the same runner) that returns **pass**, **warn** or **fail**, the figure that "
        "decided it and a short reason. A defense's verdict on the leaderboard is the worst of its checks; a defense "
        "that fails ranks below every other. Thresholds are options of each check in the benchmark TOML.",
        "",
        "## Verdicts",
        "",
    ]
    matrix = pd.DataFrame([{"Defense": name, "Verdict": MISSING_VERDICT if overall(board.verdicts[name]) is None
                            else overall(board.verdicts[name]).label,
                            **{check_id: status_text(board.verdicts[name][check_id]) for check_id in board.checks}}
                           for name in order])
    lines += [_markdown(matrix), ""]
    for name in order:
        rows = pd.DataFrame([{"Check": check_id, "Verdict": status_text(v), "Figure": v.figure or MISSING,
                              "Reason": v.reason} for check_id, v in board.verdicts[name].items()])
        lines += [f"## Defense: {name}", "", _markdown(rows), ""]
    for check_spec in spec.checks:
        check_id, check = check_spec.check_id, board.checks[check_spec.check_id]
        doc = " ".join((type(check).__doc__ or "").split())
        lines += [f"## Check: {check.title} (`{check_id}`)", "", doc, ""]
        options = ", ".join(f"{k}={v}" for k, v in check_spec.options)
        lines += [f"Options: {options or 'defaults'}.", ""]
        details = pd.DataFrame([{"Defense": name, "Verdict": status_text(board.verdicts[name][check_id]),
                                 **board.verdicts[name][check_id].details} for name in order])
        lines += [_markdown(details, digits=1), ""]
        figure = Path("figures") / f"{spec.name}-sanity-{check_id}.png"
        if check.plot({name: board.evidence[check_id][name] for name in names}, out_dir / figure):
            lines += [f"![{check.title}]({figure.as_posix()})", ""]
    return "\n".join(lines)


def _guard_note(training: dict) -> str:
    guard = training.get("guard")
    if not guard:
        return "did not fire" if any("guard_pgd_accuracy" in e for e in training.get("epochs", [])) else "off"
    return (f"fired at epoch {guard['epoch']}: PGD accuracy {100 * guard['pgd_accuracy']:.0f}% after "
            f"{100 * guard['best_pgd_accuracy']:.0f}% at epoch {guard['best_epoch']} ({guard['action']})")


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


def write(spec: BenchmarkSpec, store: ResultStore, data: Dataset, out_dir: Path, *, command: str) -> list[Path]:
    """Render `<out_dir>/<name>.md` with its figures, and the label-leak board when the spec pairs twins;
    returns the markdown paths."""
    board = build(spec, store, data)
    figure = Path("figures") / figure_name(spec)
    render_figure(board, out_dir / figure)
    training_figure = Path("figures") / training_figure_name(spec)
    render_training_figure(board, out_dir / training_figure)
    path = out_dir / f"{spec.name}.md"
    path.write_text(render_markdown(board, command=command, figure=figure.as_posix(),
                                    training_figure=training_figure.as_posix() if any(log.get("epochs") for log in board.trainings.values()) else None))
    paths = [path]
    if spec.checks:
        sanity_path = out_dir / sanity_file(spec)
        sanity_path.write_text(render_sanity(board, out_dir, command=command))
        paths.append(sanity_path)
    if spec.label_leak_pairs:
        frame = label_leak_frame(board)
        leak_figure = Path("figures") / f"{spec.name}-label-leaking.png"
        render_label_leak_figure(spec, frame, out_dir / leak_figure)
        leak_path = out_dir / ("label-leaking.md" if spec.name == "mnist-quick" else f"{spec.name}-label-leaking.md")
        leak_path.write_text(render_label_leak_markdown(
            spec, frame, command=command, figure=leak_figure.as_posix(), commit=", ".join(board.commits) or code_commit(),
            probe=perturbation_probe_frame(board) if spec.perturbation_probe else None,
            robust_features=robust_features_section(spec, board.robust_features)))
        paths.append(leak_path)
    return paths


# --- drift check ------------------------------------------------------------------------------------

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
NUMBERS_IN_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
KEY_HEADERS = {"Defense", "Twins", "eps", "Check", "Column", "Gradient", "Data set"}  # leading columns that name a row


def _same_text(committed: str, fresh: str, tolerance: float) -> bool:
    """Text cells match when their words agree and the numbers inside them agree within `tolerance`."""
    if committed == fresh:
        return True
    words_old, words_new = NUMBERS_IN_TEXT.split(committed), NUMBERS_IN_TEXT.split(fresh)
    numbers_old, numbers_new = NUMBERS_IN_TEXT.findall(committed), NUMBERS_IN_TEXT.findall(fresh)
    return words_old == words_new and len(numbers_old) == len(numbers_new) and all(
        abs(float(a) - float(b)) <= tolerance for a, b in zip(numbers_old, numbers_new))


def parse_tables(markdown: str) -> dict[tuple[str, str, str], str]:
    """{(section heading, row key, column header): cell text} for every pipe table; a row's key is its
    leading cells under naming headers (Defense, Twins, eps, Check, Column), at least the first cell."""
    cells, heading, header = {}, "", None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if header is None:
            header = parts
        elif not all(set(part) <= set(":-") for part in parts):
            leading = next((i for i, name in enumerate(header) if name not in KEY_HEADERS), len(header))
            leading = max(1, leading)
            row = " | ".join(parts[:leading])
            for column, value in zip(header[leading:], parts[leading:]):
                cells[(heading, row, column)] = value
    return cells


def compare(committed: str, regenerated: str, *, tolerance: float = 1.0) -> list[str]:
    """Differences beyond `tolerance` (percentage points) between two leaderboards, ignoring cost sections."""
    old, new = parse_tables(committed), parse_tables(regenerated)
    problems = []
    for key, value in old.items():
        heading, row, column = key
        if "cost" in heading.lower():
            continue
        if key not in new:
            problems.append(f"[{heading}] row {row!r} column {column!r} is missing from the regenerated leaderboard")
            continue
        fresh = new[key]
        if NUMBER.match(value) and NUMBER.match(fresh):
            if abs(float(value) - float(fresh)) > tolerance:
                problems.append(f"[{heading}] {row} / {column}: committed {value}, regenerated {fresh}")
        elif not _same_text(value, fresh, tolerance):
            problems.append(f"[{heading}] {row} / {column}: committed {value!r}, regenerated {fresh!r}")
    for key in new.keys() - old.keys():
        if "cost" not in key[0].lower():
            problems.append(f"[{key[0]}] row {key[1]!r} column {key[2]!r} is new: the committed leaderboard lacks it")
    return problems
