"""The evaluation matrix: defense x attack x norm x eps cells, run by an executor, written by the driver.

A cell is a unit of work: given its defense's model and the evaluation data it returns per-example outcome
vectors and its cost. Executors only compute; the driver (`run`) alone writes the store, one transaction per
cell, so an interrupted run resumes where it stopped.

Cascade (`[benchmark] cascade = true`): at each (defense, norm, eps) the attack columns run in a chain, and
each attacks only the examples that the clean evaluation and every earlier column of the chain left
correctly classified; its stored vector is then the accuracy left after it and every column before it.
Examples the chain skips are broken already, so the per-example worst case is the same as with every attack
on every example: attack randomness depends only on (cell seed, example index), and the cell seed does not
depend on the chain. Iterative attacks of our own also stop per example at the first misclassified iterate.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.cells import CLEAN, LABEL_LEAK, PERTURBATION_PROBE, ROBUST_FEATURES, Cell, _cell
from harness.data import Dataset, load_dataset
from harness.evaluation import CellRunner, SequentialExecutor
from harness.preparation import defense_keys, describe_defense, prepare_defenses
from harness.provenance import code_commit, library_versions
from harness.registry import ATTACKS
from harness.spec import AttackSpec, BenchmarkSpec
from harness.store import CellRecord, ResultStore
from harness.check_types import ProbeRequest


FAMILY_ORDER = ("one-step", "iterative", "noise", "gradient-free", "transfer")
WHITE_BOX = ("one-step", "iterative")  # families that follow the target model's own gradients


def cascade_order(spec: BenchmarkSpec) -> list[AttackSpec]:
    """The columns in the order a cascade runs them: the label-leak twins first (they run on every example:
    Kurakin's count needs clean-misclassified examples too), then white-box columns (one-step, iterative),
    then noise, gradient-free and transfer ones, each group in TOML order. White-box columns run before the
    others so that the sanity checks can tell what only the gradient-free or transfer attacks broke."""
    return sorted(spec.attacks, key=lambda a: (a.label not in spec.label_leak_columns, FAMILY_ORDER.index(a.family)))


def runs_on_every_example(spec: BenchmarkSpec, attack: AttackSpec) -> bool:
    return not spec.cascade or attack.label in spec.label_leak_columns


def _same_draws(attack: AttackSpec, eps: float) -> tuple:
    """What decides an attack cell's seed and outcome per example, apart from the examples it runs on."""
    return attack.attack_id, tuple(sorted(attack.options)), attack.norm.value, eps


def plan(spec: BenchmarkSpec, data: Dataset) -> list[Cell]:
    """Every cell of the matrix, then every cell its sanity checks ask for. Two checks asking for the same
    evidence get cells with the same key; `run` computes each key once. In a cascade a cell comes after the
    cells it depends on.

    A check's attack request that repeats a matrix column (same attack, options and eps, no restart, crafted
    on the target) reuses that column's cell: each example's draws come from (cell seed, example index) and
    the seeds are equal, so the column's outcome on every example it attacked is the request's outcome there,
    and the request only attacks the clean-correct examples the column skipped (a cascade's fallen ones)."""
    # Long by design: the cascade's order is easiest to check when every kind of cell is planned in one place.
    cells = []
    keys = defense_keys(spec, data)
    context = spec.check_context()
    checks = [(check_spec.check_id, check_spec.build()) for check_spec in spec.checks]
    for defense in spec.defenses:
        model_key = keys[defense.name]
        clean = _cell(spec, data, defense.name, model_key, None, 0.0)
        cells.append(clean)
        chains: dict[tuple[str, float], list[str]] = {}
        white_box: dict[tuple[str, float], list[str]] = {}  # the clean cell and the white-box columns
        columns: dict[tuple, Cell] = {}
        for attack in cascade_order(spec) if spec.cascade else spec.attacks:
            for eps in attack.eps:
                chain = chains.setdefault((attack.norm.value, eps), [clean.key])
                after = () if runs_on_every_example(spec, attack) else tuple(chain)
                source = None if attack.source is None else (attack.source, keys[attack.source])
                cell = _cell(spec, data, defense.name, model_key, attack, eps, source=source, after=after)
                cells.append(cell)
                chain.append(cell.key)
                if attack.family in WHITE_BOX:
                    white_box.setdefault((attack.norm.value, eps), [clean.key]).append(cell.key)
                if source is None:
                    columns.setdefault(_same_draws(attack, eps), cell)
        if spec.perturbation_probe:  # on every evaluation example, 5-fold cross-validated
            probe = ProbeRequest(PERTURBATION_PROBE, "perturbation-labels", (("folds", 5),), spec.eval_examples)
            cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=probe, check=LABEL_LEAK,
                               request=probe.name))
        options = dict(spec.robust_features)
        if options.pop("source", None) == defense.name:  # D_rand / D_det crafted on this model, tested on every example
            probe = ProbeRequest(ROBUST_FEATURES, "robust-features", tuple(sorted(options.items())), spec.eval_examples)
            cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=probe, check=LABEL_LEAK,
                               request=probe.name))
        for check_id, check in checks:
            named: dict[str, str] = {}  # this check's request names -> cell keys, for requests that come after others
            for request in check.requests_for(context, defense.name):
                common = dict(examples=request.examples, check=check_id, request=request.name)
                if isinstance(request, ProbeRequest):
                    cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=request, **common))
                    continue
                attack_spec = AttackSpec(f"{check_id}: {request.name}", request.attack_id, tuple(sorted(request.options)),
                                         ATTACKS.get(request.attack_id)(**dict(request.options)).norm, (request.eps,))
                source = None if request.source is None else (request.source, keys[request.source])
                after = tuple(named[name] for name in request.after)
                if request.survivors_of is not None:
                    survivors = {"matrix": chains, "white-box": white_box}[request.survivors_of]
                    after += tuple(survivors.get((attack_spec.norm.value, request.eps), [clean.key]))
                column = (None if request.restart or source is not None or after
                          else columns.get(_same_draws(attack_spec, request.eps)))
                cells.append(_cell(spec, data, defense.name, model_key, attack_spec, request.eps, restart=request.restart,
                                   source=source, reuses=None if column is None else column.key, after=after,
                                   sample=request.sample, **common))
                named[request.name] = cells[-1].key
    return cells


@dataclass
class RunSummary:
    planned: int
    computed: int
    skipped: int
    failed: list[tuple[str, str]]


def run(spec: BenchmarkSpec, *, store: ResultStore, cache_dir: Path, device: torch.device,
        executor=None, progress: bool = True, data: Dataset | None = None) -> RunSummary:
    """Run every cell of `spec` that the store does not have yet; only this driver writes the store."""
    data = data if data is not None else load_dataset(spec.dataset, **dict(spec.dataset_options))
    if spec.eval_examples > len(data.x_test):
        raise ValueError(f"{spec.path}: [benchmark.eval_examples] {spec.eval_examples} exceeds the "
                         f"{len(data.x_test)} test examples of {data.name}")
    unique: dict[str, Cell] = {}
    for cell in plan(spec, data):
        unique.setdefault(cell.key, cell)  # checks asking for the same evidence share one cell
    cells = list(unique.values())
    todo = [cell for cell in cells if not store.has(cell.key)]
    summary = RunSummary(planned=len(cells), computed=0, skipped=len(cells) - len(todo), failed=[])
    if not todo:
        return summary
    names = dict.fromkeys(name for cell in todo for name in (cell.defense, cell.source) if name is not None)
    unusable: dict[str, str] = {}
    prepared = prepare_defenses(spec, names, data, cache_dir=cache_dir, device=device, progress=progress,
                                on_prepared=lambda name, p: store.write_defense(
                                    p.key, name, p.spec.kind, describe_defense(p.spec), p.training),
                                failed=unusable)
    for name, reason in unusable.items():
        print(f"harness: defense {name!r} cannot be evaluated: {reason}", file=sys.stderr)
    blocked = [cell for cell in todo if cell.defense in unusable or cell.source in unusable]
    summary.failed += [(cell.describe(), f"defense {cell.source if cell.source in unusable else cell.defense!r} "
                                         "cannot be evaluated") for cell in blocked]
    todo = [cell for cell in todo if cell not in blocked]
    runner = CellRunner(spec, data, prepared, device, finished=store.cells)
    versions, commit = library_versions(), code_commit()
    executor = executor or SequentialExecutor()
    bar = tqdm(total=len(todo), desc=f"{spec.name} cells", unit="cell", disable=not progress)
    for cell, result in executor.map(runner, todo):
        bar.set_postfix_str(cell.describe(), refresh=False)
        bar.update()
        if isinstance(result, BaseException):
            summary.failed.append((cell.describe(), f"{type(result).__name__}: {result}"))
            print(f"\nharness: cell {cell.describe()} FAILED: {type(result).__name__}: {result}", file=sys.stderr)
            continue
        attack, probe = cell.attack, cell.probe
        attack_id = (f"probe:{probe.probe_id}" if probe is not None else CLEAN) if attack is None else attack.attack_id
        options = dict(probe.options) if probe is not None else {} if attack is None else dict(attack.options)
        store.write_cell(CellRecord(
            key=cell.key, benchmark=spec.name, defense=cell.defense, defense_key=cell.defense_key, attack=cell.label,
            attack_id=attack_id, options=options,
            norm=cell.norm, eps=cell.eps, clean_correct=result.clean_correct, adv_correct=result.adv_correct,
            seconds=result.seconds, forward_evals=result.forward_evals, gradient_evals=result.gradient_evals,
            seed=cell.seed, versions=versions, git_commit=commit, device=str(device),
            finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            measurements=result.measurements,
        ))
        summary.computed += 1
    bar.close()
    return summary
