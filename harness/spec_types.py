"""The frozen objects a benchmark TOML loads into (`harness.spec.load` builds and validates them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attacks_ext.base import Attack
from harness.check_types import Column, Context
from defenses.recipes import Recipe
from harness.registry import ATTACKS, CHECKS
from harness.threat import Norm


@dataclass(frozen=True)
class ExternalModel:
    """A user's model: an importable factory plus safetensors weights; never trained here."""

    factory: str
    weights: Path
    options: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class DefenseSpec:
    """One leaderboard row: a recipe we train, or an external model a user brings."""

    name: str
    recipe: Recipe | None = None
    external: ExternalModel | None = None
    seed: int | None = None  # the training seed; None: the benchmark's seed
    replica_of: str | None = None  # a training-seed replica of this row (no row of its own; the seed-spread table)

    @property
    def kind(self) -> str:
        return "external" if self.external is not None else "trained"


@dataclass(frozen=True)
class AttackSpec:
    """One leaderboard column group: an attack with fixed options, run at each eps of its grid."""

    label: str
    attack_id: str
    options: tuple[tuple[str, object], ...]
    norm: Norm
    eps: tuple[float, ...]
    source: str | None = None  # a transfer (black-box) column: examples crafted on this defense's model
    standalone: bool = False  # in a cascade, runs on every example anyway: its column is the attack's own accuracy
    restart: int = 0  # > 0: the same attack from other random draws (a second start on what the first one left)

    @property
    def family(self) -> str:
        """The attack's family; 'transfer' for a column crafted on another model."""
        return "transfer" if self.source is not None else ATTACKS.info(self.attack_id)["family"].value

    def build(self) -> Attack:
        return ATTACKS.get(self.attack_id)(**dict(self.options))


@dataclass(frozen=True)
class CheckSpec:
    """One sanity check with fixed options; its verdicts become the leaderboard's Sanity column."""

    check_id: str
    options: tuple[tuple[str, object], ...]

    def build(self):
        return CHECKS.get(self.check_id)(**dict(self.options))


@dataclass(frozen=True)
class TransferSpec:
    """[transfer]: Kurakin et al.'s transferability study. Each attack crafts on each model once at each eps and
    every model classifies the result (source x target matrices); `sweep`: more eps for the first model's examples
    (Fig. 2)."""

    models: tuple[str, ...]  # defenses of the benchmark, rows or `row = false` models
    attacks: tuple[AttackSpec, ...]  # one per attack id, default options, at every eps of `eps` and `sweep`
    eps: tuple[float, ...]
    sweep: tuple[float, ...] = ()

    def eps_for(self, source: str) -> tuple[float, ...]:
        """The eps the examples of `source` are crafted at: the tables' and, for the first model, the sweep's."""
        return tuple(sorted(set(self.eps) | (set(self.sweep) if source == self.models[0] else set())))


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: Path
    dataset: str
    dataset_options: tuple[tuple[str, object], ...]
    seed: int
    eval_examples: int
    batch_size: int
    eps: tuple[tuple[Norm, tuple[float, ...]], ...]
    defenses: tuple[DefenseSpec, ...]
    attacks: tuple[AttackSpec, ...]
    rank_by: tuple[Norm, float]
    label_leak_pairs: tuple[tuple[str, str], ...] = ()  # (true-label column, label-free twin column)
    checks: tuple[CheckSpec, ...] = ()
    cascade: bool = False  # attack columns run on the examples still robust (harness.matrix's docstring)
    perturbation_probe: bool = False  # [label_leak] perturbation_probe: linear probes on sign-gradient perturbations
    robust_features: tuple[tuple[str, object], ...] = ()  # [label_leak] robust_features: source defense and options
    findings: bool = False  # [findings]: the findings board (each source paper's claim beside our measurement)
    dead_units: bool = False  # [findings] dead_units: penultimate units never active, per defense (a probe cell)
    eot_samples: int = 8  # forward passes attacks average on a model whose outputs are randomized (EOT)
    replicas: tuple[DefenseSpec, ...] = ()  # the same recipes trained with the other `training_seeds`
    # torch's CPU threads in every process that trains or attacks (None: torch's own count, the machine's cores).
    # 1 and 2 threads give different bits, so fixing it makes the board's numbers independent of the machine
    # and of the executor (a sequential run and Ray's one-thread tasks train the same weights).
    threads: int | None = None
    transfer: TransferSpec | None = None  # [transfer]: source x target matrices between the named models
    extra_models: tuple[DefenseSpec, ...] = ()  # `row = false` defenses: trained for [transfer] only, no row or column

    @property
    def all_defenses(self) -> tuple[DefenseSpec, ...]:
        """The rows, their training-seed replicas and the models [transfer] alone needs: every model the benchmark
        trains or loads."""
        return self.defenses + self.replicas + self.extra_models

    @property
    def defenses_by_name(self) -> dict[str, DefenseSpec]:
        """Every model the benchmark trains or loads, by name."""
        return {d.name: d for d in self.all_defenses}

    def training_seed(self, defense: DefenseSpec) -> int:
        return self.seed if defense.seed is None else defense.seed

    @property
    def label_leak_columns(self) -> frozenset[str]:
        """The columns named by a label-leak pair: they run on every example, cascade or not."""
        return frozenset(label for pair in self.label_leak_pairs for label in pair)

    def eps_grid(self, norm: Norm) -> tuple[float, ...]:
        return dict(self.eps).get(norm, ())

    def check_context(self) -> Context:
        return _context(dict(self.eps), self.rank_by, self.eval_examples, self.defenses, self.attacks, self.cascade)


def _context(grid, rank_by, eval_examples, defenses, attacks, cascade) -> Context:
    columns = tuple(Column(a.label, a.norm, a.family, a.eps, a.attack_id, a.options) for a in attacks)
    return Context(grid=grid, rank_by=rank_by, eval_examples=eval_examples,
                   defenses=tuple(d.name for d in defenses), columns=columns, cascade=cascade)
