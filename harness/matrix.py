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
import hashlib
import inspect
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from attacks_ext.base import ExampleRandomness, isolated_global_rng
from attacks_ext.checks import BATCHED_PROBES, PROBES, ProbeRequest
from defenses.train import Checkpoint, checkpoint_key, file_sha256, load_checkpoint_model, obtain_checkpoint
from harness.counting import EvaluationCounter
from harness.data import Dataset, load_dataset
from harness.models import AveragedOverDraws, check_finite_outputs, correct_predictions, is_randomized, load_external
from harness.registry import ATTACKS
from harness.spec import AttackSpec, BenchmarkSpec, DefenseSpec
from harness.store import CellRecord, ResultStore
from harness.threat import verify

REPO_ROOT = Path(__file__).resolve().parent.parent
CLEAN = "clean"
LABEL_LEAK = "label-leak"  # the `check` of the label-leak board's probe cells (not a sanity check's)
PERTURBATION_PROBE, ROBUST_FEATURES = "perturbation-probe", "robust-features"  # their request names


# --- provenance -------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name, module in (("art", "art"), ("torchattacks", "torchattacks")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def code_commit() -> str:
    """The git commit of the harness code, with '-dirty' when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# --- defenses ---------------------------------------------------------------------------------------

def external_key(defense: DefenseSpec) -> str:
    """Identity of an external model: a hash of its factory, options and weights file."""
    external = defense.external
    if not external.weights.is_file():
        raise FileNotFoundError(f"defense {defense.name!r}: external weights {str(external.weights)!r} not found")
    payload = [external.factory, list(external.options), file_sha256(external.weights)]
    return "ext-" + hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:16]


def defense_keys(spec: BenchmarkSpec, data: Dataset) -> dict[str, str]:
    """The model identity of every defense row, computed without training: checkpoint keys (which include
    the keys of ensemble sources) or external-file hashes."""
    by_name = {d.name: d for d in spec.defenses}
    keys: dict[str, str] = {}

    def key_of(defense: DefenseSpec) -> str:
        if defense.name not in keys:
            if defense.recipe is None:
                keys[defense.name] = external_key(defense)
            else:
                sources = tuple(key_of(by_name[name]) for name in defense.recipe.ensemble_sources)
                keys[defense.name] = checkpoint_key(defense.recipe, data, spec.seed, sources)
        return keys[defense.name]

    for defense in spec.defenses:
        key_of(defense)
    return keys


@dataclass(frozen=True)
class PreparedDefense:
    """A defense ready for evaluation: trained (checkpoint on disk) or external (factory + weights)."""

    spec: DefenseSpec
    key: str
    weights: Path
    training: dict

    def load_model(self, data: Dataset, device: torch.device) -> torch.nn.Module:
        if self.spec.recipe is not None:
            return load_checkpoint_model(self.spec.recipe, data, Checkpoint(self.key, self.weights, self.training), device)
        external = self.spec.external
        return load_external(external.factory, external.weights, dict(external.options)).to(device).eval()


def prepare_defense(defense: DefenseSpec, data: Dataset, *, seed: int, cache_dir: Path, device: torch.device,
                    progress: bool = True, sources: dict[str, PreparedDefense] | None = None) -> PreparedDefense:
    """Train (or load from the cache) a recipe; check that an external model loads.

    `sources` holds the prepared defenses that `defense.recipe.ensemble_sources` names."""
    if defense.recipe is not None:
        sources = sources or {}
        models = {name: (sources[name].key, sources[name].load_model(data, device)) for name in defense.recipe.ensemble_sources}
        checkpoint = obtain_checkpoint(defense.recipe, data, seed=seed, cache_dir=cache_dir, device=device,
                                       progress=progress, sources=models)
        prepared = PreparedDefense(defense, checkpoint.key, checkpoint.weights, checkpoint.log)
    else:
        prepared = PreparedDefense(defense, external_key(defense), defense.external.weights, {})
    validate_model(prepared, data, device)
    return prepared


def validate_model(prepared: PreparedDefense, data: Dataset, device: torch.device) -> None:
    """Load the model and run one forward pass on test images: it must build, load and give finite logits of the
    data set's shape. Fails now, with the factory's, the file's or the outputs' problem, not inside a cell."""
    model = prepared.load_model(data, device)
    check_finite_outputs(model, data.x_test[:64].to(device), prepared.spec.name, num_classes=data.num_classes)


def describe_defense(defense: DefenseSpec) -> dict:
    if defense.recipe is not None:
        return {"recipe": defense.recipe.as_dict()}
    external = defense.external
    return {"factory": external.factory, "weights": str(external.weights), "options": dict(external.options)}


# --- cells ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One unit of work: a defense's model under one attack at one eps, the clean evaluation, or a sanity
    check's probe (a measurement of the model), on the first `examples` evaluation images."""

    key: str
    defense: str
    defense_key: str
    attack: AttackSpec | None  # None: the clean evaluation or a probe
    eps: float
    seed: int
    examples: int
    probe: ProbeRequest | None = None
    check: str | None = None  # the sanity check that asked for this cell; None: a cell of the matrix itself
    request: str | None = None  # the check's name for it
    source: str | None = None  # transfer: the defense whose model crafts the examples; None: the target itself
    after: tuple[str, ...] = ()  # cascade: keys of the cells whose survivors this cell attacks; (): every example
    reuses: str | None = None  # a matrix cell of the same attack and seed whose attacked examples' outcomes this
    #                            cell takes over; it attacks only the clean-correct examples that cell skipped
    sample: int | None = None  # attack at most this many of the examples `after` leaves (the first ones)

    @property
    def label(self) -> str:
        if self.check is not None:
            return f"{self.check}: {self.request}"
        return CLEAN if self.attack is None else self.attack.label

    @property
    def norm(self) -> str:
        return "none" if self.attack is None else self.attack.norm.value

    def describe(self) -> str:
        return f"{self.defense} / {self.label}" + ("" if self.attack is None else f" / {self.norm} eps={self.eps:g}")


def _cell(spec: BenchmarkSpec, data: Dataset, defense: str, model_key: str, attack: AttackSpec | None, eps: float, *,
          examples: int | None = None, restart: int = 0, probe: ProbeRequest | None = None, check: str | None = None,
          request: str | None = None, source: tuple[str, str] | None = None, after: tuple[str, ...] = (),
          reuses: str | None = None, sample: int | None = None) -> Cell:
    """A cell keyed by everything that decides its outcome (and nothing that does not: the check that asked
    for it is not part of its identity, so identical requests share one cell).

    Its seed comes from the attack, eps, restart and benchmark seed only, not from the model, the data or the
    cascade: every defense sees the same random starts (common random numbers), a code change that re-keys
    the checkpoints does not move them, and a cascaded cell draws what the same attack on every example would."""
    examples = spec.eval_examples if examples is None else examples
    randomness = {
        "attack": None if attack is None else [attack.attack_id, [list(o) for o in attack.options], attack.norm.value],
        "eps": eps, "seed": spec.seed,
    }
    if restart:
        randomness["restart"] = restart
    if probe is not None:
        randomness["probe"] = [probe.probe_id, [list(o) for o in probe.options]]
    identity = {**randomness, "data": [data.name, data.fingerprint, spec.eval_examples, spec.batch_size], "model": model_key}
    if attack is not None:  # used only where the model turns out randomized, but decides the outcome there
        identity["eot"] = spec.eot_samples
    if examples != spec.eval_examples:
        identity["examples"] = examples
    if source is not None:  # (defense name, model key): the crafting model is part of the identity
        identity["source"] = source[1]
    if after:
        identity["after"] = list(after)
    if reuses is not None:
        identity["reuses"] = reuses
    if sample is not None:
        identity["sample"] = sample
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
    seed = int(hashlib.sha256(json.dumps(randomness, sort_keys=True, default=str).encode()).hexdigest()[:8], 16)
    return Cell(key, defense, model_key, attack, eps, seed, examples, probe, check, request,
                None if source is None else source[0], tuple(after), reuses, sample)


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
    evidence), batch by batch where the probe allows it (`BATCHED_PROBES`); a probe that takes `training` also
    gets the training split. `clean_correct`: the model's clean outcome on (x, y) where the caller has it."""
    counter = EvaluationCounter(model)
    generator = torch.Generator().manual_seed(cell.seed)
    if clean_correct is None:  # the harness's own pass, not counted
        clean_correct = correct_predictions(model, x, y, batch_size=batch_size, device=device)
    probe = PROBES[cell.probe.probe_id]
    options = dict(cell.probe.options)
    if "training" in inspect.signature(probe).parameters:
        if training is None:
            raise ValueError(f"probe {cell.probe.probe_id!r} needs the training split")
        options["training"] = training
    start = time.perf_counter()
    if cell.probe.probe_id in BATCHED_PROBES and len(x):
        shared = BATCHED_PROBES[cell.probe.probe_id]
        parts = [probe(counter, x[begin : begin + batch_size].to(device), y[begin : begin + batch_size].to(device),
                       generator=generator, **options) for begin in range(0, len(x), batch_size)]
        arrays = {name: parts[0][name] if name in shared else np.concatenate([part[name] for part in parts])
                  for name in parts[0]}
    else:
        arrays = probe(counter, x.to(device), y.to(device), generator=generator, **options)
    seconds = time.perf_counter() - start
    return CellOutcome(clean_correct, clean_correct, seconds, counter.forward_evals, counter.gradient_evals,
                       {name: np.asarray(value) for name, value in arrays.items()})


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
        start = time.perf_counter()
        x_adv = attack(counter if eot_draws == 1 else AveragedOverDraws(counter, eot_draws), xb, yb, eps=cell.eps,
                       generator=ExampleRandomness(cell.seed, index), stop_when_fooled=source_model is None)
        seconds += time.perf_counter() - start
        verify(xb, x_adv, cell.attack.norm, cell.eps)
        with torch.no_grad():
            adv_correct[index] = (model(x_adv).argmax(1) == yb).cpu().numpy()
    return CellOutcome(clean_correct, adv_correct, seconds, counter.forward_evals, counter.gradient_evals,
                       {} if attacked is None else {"attacked": np.asarray(attacked, dtype=bool)})


class CellRunner:
    """Computes cells; holds what a worker needs (data, prepared defenses, the store's finished cells for a
    cascade) and loads each model once."""

    def __init__(self, spec: BenchmarkSpec, data: Dataset, defenses: dict[str, PreparedDefense], device: torch.device,
                 finished: Callable[[list[str]], dict[str, CellRecord]] | None = None):
        self.data, self.defenses, self.device = data, defenses, device
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

    def clean_correct(self, cell: Cell) -> np.ndarray:
        """The cell's model's clean outcome on its examples, computed once per model and example count."""
        key = (self.defenses[cell.defense].key, cell.examples)
        if key not in self._clean:
            self._clean[key] = correct_predictions(self.model(cell.defense), self.x[: cell.examples],
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


def prepare_defenses(spec: BenchmarkSpec, names: Iterable[str], data: Dataset, *, cache_dir: Path, device: torch.device,
                     progress: bool = True, on_prepared: Callable[[str, PreparedDefense], None] | None = None,
                     failed: dict[str, str] | None = None) -> dict[str, PreparedDefense]:
    """Train (or load from the cache) the named defenses and the ensemble sources they need. External models are
    validated first (import, build, load, a forward pass with finite logits), before any training starts.
    With `failed`, a trained defense that cannot be used (non-finite outputs) is recorded there (name -> reason)
    and the others go on; a bad external model, or any failure without `failed`, raises."""
    by_name = {d.name: d for d in spec.defenses}
    prepared: dict[str, PreparedDefense] = {}
    names = list(dict.fromkeys(names))

    def prepare(name: str) -> None:
        if name in prepared or (failed is not None and name in failed):
            return
        defense = by_name[name]
        for source in defense.recipe.ensemble_sources if defense.recipe else ():
            prepare(source)  # the spec loader has ruled out cycles
            if failed is not None and source in failed:
                failed[name] = f"its ensemble source {source!r} failed: {failed[source]}"
                return
        try:
            prepared[name] = prepare_defense(defense, data, seed=spec.seed, cache_dir=cache_dir, device=device,
                                             progress=progress, sources=prepared)
        except (ValueError, FileNotFoundError) as error:
            if failed is None or defense.recipe is None:  # a user's model that does not work stops the run at once
                raise
            failed[name] = str(error)
            return
        if on_prepared is not None:
            on_prepared(name, prepared[name])

    for name in sorted(names, key=lambda n: by_name[n].recipe is not None):  # external models first: no training
        prepare(name)                                                            # before a bad one is found
    return prepared


@dataclass
class RunSummary:
    planned: int
    computed: int
    skipped: int
    failed: list[tuple[str, str]]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use 'cpu' or 'auto'")
    return device


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
