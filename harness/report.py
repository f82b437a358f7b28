"""The leaderboard from the store: aggregation into pandas frames and the main board's markdown (tabulate).

Every number is computed here from the stored per-example vectors. The other boards (`report_sanity`,
`report_label_leak`), the figures (`report_figures`) and the drift check (`drift`) live beside it; `boards.write`
writes them all.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.data import Dataset
from harness.cells import LABEL_LEAK, PERTURBATION_PROBE, ROBUST_FEATURES, Cell
from harness.planning import cascade_order, plan, runs_on_every_example
from harness.provenance import code_commit, library_versions
from harness.ranking import (interval_footnote, ranking_frame, ranking_note, seed_spread_frame, seed_spread_note,
                             with_intervals)
from harness.spec import BenchmarkSpec
from harness.check_types import Check, Evidence, Status, Verdict
from harness.store import CellRecord, ResultStore
from harness.tables import MISSING, markdown_table as _markdown  # noqa: F401  (the boards' one table writer)
from harness.threat import Norm

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
    vectors: dict[str, dict[str, np.ndarray]]  # defense -> summary column (Clean, Worst ...) -> per-example outcomes
    seeds: dict[str, list[tuple[int, np.ndarray | None, np.ndarray | None]]]  # defense -> (seed, clean, worst at rank-by)
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


def passes_sanity(verdicts: dict[str, dict[str, Verdict]], names) -> list[bool]:
    """Per defense, whether it takes part in the ranking: a failing sanity verdict puts it below every other."""
    return [overall(verdicts[name]) is not Status.FAIL for name in names]


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
    # Long by design: one pass over the plan that gathers every table of the board; split, each part would re-walk the cells.
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
    vectors: dict[str, dict[str, np.ndarray]] = {}
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
        vectors[defense.name] = {} if clean is None else {"Clean": clean}
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
                    vectors[defense.name][f"Worst {_column(norm, eps)}"] = worst
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

    seeds = {defense.name: [(spec.training_seed(model), *_clean_and_worst(by_defense.get(model.name, []), spec.rank_by))
                            for model in (defense, *copies)]
             for defense in spec.defenses if (copies := [r for r in spec.replicas if r.replica_of == defense.name])}
    summary = pd.DataFrame(summary_rows)
    rank_column = f"Worst {_column(*spec.rank_by)}"
    # A defense whose sanity verdict is fail ranks below every other, whatever its numbers say.
    summary["_passes"] = passes_sanity(verdicts, [d.name for d in spec.defenses])
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
                       checks, evidence, verdicts, perturbation, vectors, seeds,
                       None if robust_cell is None else records.get(robust_cell.key))


def _clean_and_worst(pairs: list[tuple[Cell, CellRecord | None]], rank_by) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One model's clean vector and its per-example worst case at the rank-by threat (None while missing)."""
    clean = pairs[0][1].clean_correct if pairs and pairs[0][1] is not None else None
    at = [r for c, r in pairs if c.attack is not None and (c.attack.norm, c.eps) == rank_by]
    worst = np.logical_and.reduce([r.robust_correct for r in at]) if at and all(r is not None for r in at) else None
    return clean, worst


def _total(costs: list[tuple[float, float] | None]) -> float | None:
    """Forward plus gradient evaluations summed over cells; None when any cell's is unknown."""
    return None if any(c is None for c in costs) else float(sum(f + g for f, g in costs))


def render_markdown(board: Leaderboard, *, command: str, figure: str, training_figure: str | None = None) -> str:
    # Long by design: the board's sections in reading order, one after another.
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
    rank_column = f"Worst {_column(*spec.rank_by)}"
    ranked = passes_sanity(board.verdicts, board.summary["Defense"])
    ranking = ranking_frame(board.summary, board.vectors, rank_column, ranked)
    worst = board.summary[rank_column][ranked].dropna()  # the ranked rows: a failing one's numbers mean nothing
    near = min(max(float(worst.max()) / 100, 0.05), 0.95) if len(worst) else 0.5  # where the top of the board sits
    lines += ["## Ranking", "", _markdown(ranking), "",
              ranking_note(rank_column, max(sum(ranked) - 1, 0), spec.eval_examples, near), ""]
    if board.seeds:
        lines += ["## Training-seed spread", "", seed_spread_note(rank_column), "",
                  _markdown(seed_spread_frame(board.seeds, rank_column)), ""]
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
        lines += [f"## {norm.symbol} attacks", "", _markdown(with_intervals(frame, spec.eval_examples), intervals=False), ""]
    lines += [interval_footnote(spec.eval_examples), ""]
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


def _guard_note(training: dict) -> str:
    guard = training.get("guard")
    if not guard:
        return "did not fire" if any("guard_pgd_accuracy" in e for e in training.get("epochs", [])) else "off"
    return (f"fired at epoch {guard['epoch']}: PGD accuracy {100 * guard['pgd_accuracy']:.0f}% after "
            f"{100 * guard['best_pgd_accuracy']:.0f}% at epoch {guard['best_epoch']} ({guard['action']})")
