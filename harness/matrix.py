"""The driver of the evaluation matrix: the cells `planning.plan` lays out (defense x attack x norm x eps, checks'
requests, probes) are computed by an executor (`evaluation.py`) and written here.

A cell is a unit of work: given its defense's model and the evaluation data it returns per-example outcome
vectors and its cost. Executors only compute; the driver (`run`) alone writes the store, one transaction per
cell, so an interrupted run resumes where it stopped.

Cascade (`[benchmark] cascade = true`): at each (defense, norm, eps) the attack columns run in a chain, and
each attacks only the examples that the clean evaluation and every earlier column of the chain left
correctly classified; its stored vector is then the accuracy left after it and every column before it.
Examples the chain skips are broken already, so for our own attacks the per-example worst case is the same as
with every attack on every example: their randomness depends only on (cell seed, example index), and the cell
seed does not depend on the chain. Library attacks (torchattacks, ART) draw for the whole batch from one seed
(`ExampleRandomness.library_seed`), so their draws, though reproducible, depend on which examples the chain left.
Iterative attacks of our own also stop per example at the first misclassified iterate.
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.cells import CLEAN, Cell
from harness.data import Dataset, load_dataset
from harness.evaluation import CellRunner, SequentialExecutor
from harness.planning import plan
from harness.preparation import describe_defense, prepare_defenses
from harness.provenance import code_commit, library_versions
from harness.spec import BenchmarkSpec
from harness.store import CellRecord, ResultStore


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
    names = dict.fromkeys(name for cell in todo for name in cell.models)
    unusable: dict[str, str] = {}
    if hasattr(executor, "train"):  # a parallel executor trains the missing checkpoints first; the driver writes them
        executor.train(spec, names, data, cache_dir=cache_dir, device=device, failed=unusable)
    prepared = prepare_defenses(spec, names, data, cache_dir=cache_dir, device=device, progress=progress,
                                on_prepared=lambda name, p: store.write_defense(
                                    p.key, name, p.spec.kind, describe_defense(p.spec), p.training),
                                failed=unusable)
    for name, reason in unusable.items():
        print(f"harness: defense {name!r} cannot be evaluated: {reason}", file=sys.stderr)
    blocked = [cell for cell in todo if set(cell.models) & set(unusable)]
    summary.failed += [(cell.describe(), f"defense {next(n for n in cell.models if n in unusable)!r} cannot be "
                                         "evaluated") for cell in blocked]
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
