"""Computing cells: a model under one attack (or a probe) on the evaluation examples, batch by batch, every
adversarial batch checked against the threat model. Executors call a `CellRunner`; they never write the store."""
from __future__ import annotations

import inspect
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from attacks_ext.base import ExampleRandomness, isolated_global_rng
from harness.cells import Cell
from harness.counting import EvaluationCounter
from harness.data import Dataset
from harness.models import AveragedOverDraws, correct_predictions, is_randomized
from harness.preparation import PreparedDefense
from harness.registry import PROBES
from harness.spec import BenchmarkSpec
from harness.store import CellRecord
from harness.threat import verify


@dataclass(frozen=True)
class CellOutcome:
    clean_correct: np.ndarray
    adv_correct: np.ndarray
    seconds: float
    forward_evals: int
    gradient_evals: int
    measurements: dict = field(default_factory=dict)  # a probe's named arrays

    @property
    def robust_correct(self) -> np.ndarray:
        return self.clean_correct & self.adv_correct


def evaluate_probe(cell: Cell, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                   device: torch.device, training: tuple[torch.Tensor, torch.Tensor] | None = None,
                   clean_correct: np.ndarray | None = None) -> CellOutcome:
    """Measure `model` on (x, y) with the probe the cell names (a sanity check's or the label-leak board's
    evidence), batch by batch where the probe allows it (its `shared` metadata is not None); a probe that takes `training` also
    gets the training split. `clean_correct`: the model's clean outcome on (x, y) where the caller has it."""
    counter = EvaluationCounter(model)
    generator = torch.Generator().manual_seed(cell.seed)
    if clean_correct is None:  # the harness's own pass, not counted
        clean_correct = correct_predictions(model, x, y, batch_size=batch_size, device=device)
    probe = PROBES.get(cell.probe.probe_id)
    shared = PROBES.info(cell.probe.probe_id)["shared"]
    options = dict(cell.probe.options)
    if "training" in inspect.signature(probe).parameters:
        if training is None:
            raise ValueError(f"probe {cell.probe.probe_id!r} needs the training split")
        options["training"] = training
    start = time.perf_counter()
    if shared is not None and len(x):
        parts = [probe(counter, x[begin : begin + batch_size].to(device), y[begin : begin + batch_size].to(device),
                       generator=generator, **options) for begin in range(0, len(x), batch_size)]
        arrays = {name: parts[0][name] if name in shared else np.concatenate([part[name] for part in parts])
                  for name in parts[0]}
    else:
        arrays = probe(counter, x.to(device), y.to(device), generator=generator, **options)
    seconds = time.perf_counter() - start
    return CellOutcome(clean_correct, clean_correct, seconds, counter.forward_evals, counter.gradient_evals,
                       {name: np.asarray(value) for name, value in arrays.items()})


def _craft(cell: Cell, attack, counter: EvaluationCounter, xb: torch.Tensor, yb: torch.Tensor, index: np.ndarray, *,
           eot_draws: int, stop_when_fooled: bool) -> tuple[torch.Tensor, float]:
    """One batch of the cell's adversarial examples (example i draws from its own stream (cell seed, i)), checked
    against the threat model, and the attack's seconds."""
    start = time.perf_counter()
    x_adv = attack(counter if eot_draws == 1 else AveragedOverDraws(counter, eot_draws), xb, yb, eps=cell.eps,
                   generator=ExampleRandomness(cell.seed, index), stop_when_fooled=stop_when_fooled)
    seconds = time.perf_counter() - start
    verify(xb, x_adv, cell.attack.norm, cell.eps)
    return x_adv, seconds


def evaluate_cell(cell: Cell, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                  device: torch.device, source_model: torch.nn.Module | None = None,
                  attacked: np.ndarray | None = None, clean_correct: np.ndarray | None = None,
                  training: tuple[torch.Tensor, torch.Tensor] | None = None, eot_draws: int = 1) -> CellOutcome:
    """Attack `model` on (x, y) batch by batch; every adversarial batch must pass the threat model.

    `attacked` (a cascade): attack only those examples; the others count as not robust. Example i's random
    draws come from its own stream (cell seed, i), and our iterative attacks stop per example at the first
    misclassified iterate. With `source_model` the examples are crafted on it and transferred to `model` (a
    black-box attack; no early stop, since the source being fooled says nothing about the target); the cost
    counted is then the source's. `clean_correct`: the model's clean outcome on (x, y) where the caller has it;
    `training`: the training split, for the probes that need it. `eot_draws` > 1: the attacked model is randomized,
    so the attack sees the mean of that many forward passes (expectation over transformation); each adversarial
    example is still judged by one pass of the model."""
    if cell.probe is not None:
        return evaluate_probe(cell, model, x, y, batch_size=batch_size, device=device, training=training,
                              clean_correct=clean_correct)
    counter = EvaluationCounter(model if source_model is None else source_model)
    if cell.attack is None:  # the clean evaluation's cost is its one forward pass
        start = time.perf_counter()
        correct = correct_predictions(counter, x, y, batch_size=batch_size, device=device)
        return CellOutcome(correct, correct, time.perf_counter() - start, counter.forward_evals, counter.gradient_evals)
    attack = cell.attack.build()
    if clean_correct is None:  # the harness's own pass, not counted
        clean_correct = correct_predictions(model, x, y, batch_size=batch_size, device=device)
    todo = np.arange(len(x)) if attacked is None else np.flatnonzero(attacked)
    adv_correct, seconds = np.zeros(len(x), dtype=bool), 0.0
    for begin in range(0, len(todo), batch_size):
        index = todo[begin : begin + batch_size]
        rows = torch.from_numpy(index)
        xb, yb = x[rows].to(device), y[rows].to(device)
        x_adv, batch_seconds = _craft(cell, attack, counter, xb, yb, index, eot_draws=eot_draws,
                                      stop_when_fooled=source_model is None)
        seconds += batch_seconds
        with torch.no_grad():
            adv_correct[index] = (model(x_adv).argmax(1) == yb).cpu().numpy()
    return CellOutcome(clean_correct, adv_correct, seconds, counter.forward_evals, counter.gradient_evals,
                       {} if attacked is None else {"attacked": np.asarray(attacked, dtype=bool)})


def evaluate_transfer(cell: Cell, source: torch.nn.Module, targets: list[torch.nn.Module], x: torch.Tensor,
                      y: torch.Tensor, *, batch_size: int, device: torch.device, clean_correct: np.ndarray,
                      targets_clean: list[np.ndarray], eot_draws: int = 1) -> CellOutcome:
    """Craft the cell's attack on `source` once (every example, run to the end: Kurakin et al.'s examples) and
    classify the result with every target. The outcome is the source's own; the measurements hold one row per target
    (in `cell.targets` order) of clean and adversarial correctness. The cost counted is the crafting."""
    counter = EvaluationCounter(source)
    attack = cell.attack.build()
    adv_correct = np.zeros(len(x), dtype=bool)
    target_adv = np.zeros((len(targets), len(x)), dtype=bool)
    seconds = 0.0
    for begin in range(0, len(x), batch_size):
        index = np.arange(begin, min(begin + batch_size, len(x)))
        xb, yb = x[begin : begin + batch_size].to(device), y[begin : begin + batch_size].to(device)
        x_adv, batch_seconds = _craft(cell, attack, counter, xb, yb, index, eot_draws=eot_draws, stop_when_fooled=False)
        seconds += batch_seconds
        with torch.no_grad():
            adv_correct[index] = (source(x_adv).argmax(1) == yb).cpu().numpy()
            for row, target in enumerate(targets):
                target_adv[row, index] = (target(x_adv).argmax(1) == yb).cpu().numpy()
    return CellOutcome(clean_correct, adv_correct, seconds, counter.forward_evals, counter.gradient_evals,
                       {"target_clean": np.stack(targets_clean), "target_adv": target_adv})


class CellRunner:
    """Computes cells; holds what a worker needs (data, prepared defenses, the store's finished cells for a
    cascade) and loads each model once."""

    def __init__(self, spec: BenchmarkSpec, data: Dataset, defenses: dict[str, PreparedDefense], device: torch.device,
                 finished: Callable[[list[str]], dict[str, CellRecord]] | None = None):
        self.spec, self.data, self.defenses, self.device = spec, data, defenses, device
        self.batch_size = spec.batch_size
        self.x = data.x_test[: spec.eval_examples]
        self.y = data.y_test[: spec.eval_examples]
        self.finished = finished
        self.eot_samples = spec.eot_samples
        self._models: dict[str, torch.nn.Module] = {}
        self._randomized: dict[str, bool] = {}
        self._clean: dict[tuple[str, int], np.ndarray] = {}

    def model(self, defense: str) -> torch.nn.Module:
        prepared = self.defenses[defense]
        if prepared.key not in self._models:
            self._models[prepared.key] = prepared.load_model(self.data, self.device)
        return self._models[prepared.key]

    def eot_draws(self, defense: str) -> int:
        """Forward passes an attack averages on this defense's model: `eot_samples` where identical passes disagree
        (a randomized model), 1 otherwise."""
        key = self.defenses[defense].key
        if key not in self._randomized:
            with isolated_global_rng(0, self.device):
                self._randomized[key] = is_randomized(self.model(defense), self.x[:100].to(self.device))
        return self.eot_samples if self._randomized[key] else 1

    def clean_correct(self, cell: Cell, defense: str | None = None) -> np.ndarray:
        """The clean outcome of the cell's model (or `defense`'s) on the cell's examples, computed once per model and
        example count."""
        defense = cell.defense if defense is None else defense
        key = (self.defenses[defense].key, cell.examples)
        if key not in self._clean:
            self._clean[key] = correct_predictions(self.model(defense), self.x[: cell.examples],
                                                   self.y[: cell.examples], batch_size=self.batch_size,
                                                   device=self.device)
        return self._clean[key]

    def survivors(self, cell: Cell) -> np.ndarray | None:
        """The examples a cascaded cell attacks: robust through every cell before it; None: every example."""
        if not cell.after:
            return None
        records = self._records(list(cell.after), cell)
        survivors = np.logical_and.reduce([records[key].robust_correct[: cell.examples] for key in cell.after])
        if cell.sample is not None:  # the first `sample` survivors, in example order
            survivors[np.flatnonzero(survivors)[cell.sample:]] = False
        return survivors

    def _records(self, keys: list[str], cell: Cell) -> dict[str, CellRecord]:
        records = self.finished(keys) if self.finished is not None else {}
        missing = [key for key in keys if key not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} earlier cells that {cell.describe()} builds on are not in the store "
                               "(they failed or were not run)")
        return records

    def __call__(self, cell: Cell) -> CellOutcome:
        # torch's and numpy's global generators are seeded per cell (and restored after it): a randomized model
        # draws the same noise on every run, so its cells reproduce like any other.
        with isolated_global_rng(cell.seed, self.device):
            return self._compute(cell)

    def _compute(self, cell: Cell) -> CellOutcome:
        x, y = self.x[: cell.examples], self.y[: cell.examples]
        model = self.model(cell.defense)
        if cell.targets:
            return evaluate_transfer(cell, model, [self.model(t) for t in cell.targets], x, y,
                                     batch_size=self.batch_size, device=self.device,
                                     clean_correct=self.clean_correct(cell),
                                     targets_clean=[self.clean_correct(cell, t) for t in cell.targets],
                                     eot_draws=self.eot_draws(cell.defense))
        if cell.reuses is None:
            # The clean cell's own pass is its counted cost; attacks and probes reuse the model's clean outcome.
            clean_correct = None if cell.attack is None and cell.probe is None else self.clean_correct(cell)
            return evaluate_cell(cell, model, x, y, batch_size=self.batch_size, device=self.device,
                                 source_model=None if cell.source is None else self.model(cell.source),
                                 attacked=self.survivors(cell), training=(self.data.x_train, self.data.y_train),
                                 clean_correct=clean_correct, eot_draws=self.eot_draws(cell.source or cell.defense))
        column = self._records([cell.reuses], cell)[cell.reuses]
        ran = column.measurements.get("attacked")
        ran = np.ones(cell.examples, dtype=bool) if ran is None else np.asarray(ran[: cell.examples], dtype=bool)
        outcome = evaluate_cell(cell, model, x, y, batch_size=self.batch_size, device=self.device,
                                attacked=~ran & column.clean_correct[: cell.examples], clean_correct=self.clean_correct(cell),
                                eot_draws=self.eot_draws(cell.defense))
        adv_correct = np.where(ran, column.adv_correct[: cell.examples], outcome.adv_correct)
        return CellOutcome(outcome.clean_correct, adv_correct, outcome.seconds, outcome.forward_evals,
                           outcome.gradient_evals, {**outcome.measurements, "reused": ran})


class SequentialExecutor:
    """Runs cells one after another in this process; yields (cell, outcome or the exception it raised).
    The next cell starts only after the driver has stored the last one, which a cascade relies on."""

    def map(self, function: Callable[[Cell], CellOutcome], cells: Iterable[Cell]) -> Iterator[tuple[Cell, object]]:
        for cell in cells:
            try:
                yield cell, function(cell)
            except Exception as error:  # a failing cell is reported; the others still run
                error.traceback_text = traceback.format_exc()
                yield cell, error
