"""The leaderboard from the store: every number aggregated into pandas frames from the stored per-example vectors.

The boards render from a `Leaderboard`: `leaderboard` (the main board), `sanity`, `label_leak`, `figures`, all
through `markdown` (the one table writer); `drift` compares stored numbers; `boards.write` writes them all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.data import Dataset
from harness.cells import DEAD_UNITS, FINDINGS, LABEL_LEAK, PERTURBATION_PROBE, ROBUST_FEATURES, Cell
from harness.planning import plan
from harness.provenance import library_versions
from harness.spec import BenchmarkSpec
from harness.check_types import Check, Evidence, Status, Verdict
from harness.store import CellRecord, ResultStore
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
    dead_units: dict[str, CellRecord | None] | None = None  # defense -> its penultimate-units cell (findings board)
    transfer: dict[tuple[str, str, float], CellRecord | None] | None = None  # [transfer]: (source, attack, eps) -> cell


def board_file(spec: BenchmarkSpec, board: str) -> str:
    """A secondary board's file: `<board>.md` for the default benchmark, `<name>-<board>.md` for any other."""
    return f"{board}.md" if spec.name == "mnist-quick" else f"{spec.name}-{board}.md"


def defense_anchor(name: str) -> str:
    """The GitHub anchor of the '## Defense: <name>' heading in the sanity board."""
    return "defense-" + re.sub(r"[^a-z0-9 _-]", "", f"{name}".lower()).replace(" ", "-")


def gather_evidence(spec: BenchmarkSpec, checks: dict[str, Check], cells: list[Cell],
                    records: dict[str, CellRecord]) -> dict[str, dict[str, Evidence]]:
    """Per check and defense: the matrix's cells of that defense and the cells the check asked for, each under
    the check's own request object (the store names a request's cell by the request's name)."""
    context = spec.check_context()
    columns = {c.label: c for c in context.columns}
    matrix: dict[str, dict] = {}
    stored: dict[tuple[str, str, str], CellRecord | None] = {}  # (check, defense, request name) -> record
    for cell in cells:
        if cell.check is None:
            matrix.setdefault(cell.defense, {})[(cell.label, cell.eps)] = records.get(cell.key)
        else:
            stored[(cell.check, cell.defense, cell.request)] = records.get(cell.key)
    return {check_id: {d.name: Evidence(d.name, context, columns, matrix.get(d.name, {}),
                                         {request: stored.get((check_id, d.name, request.name))
                                          for request in check.requests_for(context, d.name)})
                       for d in spec.defenses}
            for check_id, check in checks.items()}


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
    checks = {check.check_id: check.build() for check in spec.checks}
    evidence = gather_evidence(spec, checks, all_cells, records)
    naive = naive_costs(all_cells, records)
    verdicts = {d.name: {check_id: checks[check_id].evaluate(evidence[check_id][d.name]) for check_id in checks}
                for d in spec.defenses}

    sanity_cells: dict[str, dict[str, CellRecord]] = {}  # defense -> stored check cells, each key once
    for cell in all_cells:
        if cell.check in checks and cell.key in records:
            sanity_cells.setdefault(cell.defense, {})[cell.key] = records[cell.key]
    extra_cells: dict[str, list[Cell]] = {}  # defense -> its label-leak and findings boards' cells (probes, D_rand / D_det)
    for cell in all_cells:
        if cell.check in (LABEL_LEAK, FINDINGS):
            extra_cells.setdefault(cell.defense, []).append(cell)
    probes = {cell.defense: cell for cells in extra_cells.values() for cell in cells if cell.request == PERTURBATION_PROBE}
    robust_cell = next((cell for cells in extra_cells.values() for cell in cells if cell.request == ROBUST_FEATURES), None)

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
                                 f"[{status.label}]({board_file(spec, 'sanity')}#{defense_anchor(defense.name)})")
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
        own = pairs + [(cell, records.get(cell.key)) for cell in extra_cells.get(defense.name, [])]
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
    dead_units = {cell.defense: records.get(cell.key) for cells in extra_cells.values() for cell in cells
                  if cell.request == DEAD_UNITS}
    transfer = {(c.defense, c.attack.attack_id, c.eps): records.get(c.key) for c in all_cells if c.targets}
    return Leaderboard(spec, summary, details, curves, costs, trainings, outcomes, missing, commits, versions,
                       checks, evidence, verdicts, perturbation, vectors, seeds,
                       None if robust_cell is None else records.get(robust_cell.key), dead_units, transfer)


def _clean_and_worst(pairs: list[tuple[Cell, CellRecord | None]], rank_by) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One model's clean vector and its per-example worst case at the rank-by threat (None while missing)."""
    clean = pairs[0][1].clean_correct if pairs and pairs[0][1] is not None else None
    at = [r for c, r in pairs if c.attack is not None and (c.attack.norm, c.eps) == rank_by]
    worst = np.logical_and.reduce([r.robust_correct for r in at]) if at and all(r is not None for r in at) else None
    return clean, worst


def _total(costs: list[tuple[float, float] | None]) -> float | None:
    """Forward plus gradient evaluations summed over cells; None when any cell's is unknown."""
    return None if any(c is None for c in costs) else float(sum(f + g for f, g in costs))
