"""Cell identity: what decides a cell's outcome, hashed into its key, and the seed its attack draws from."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from harness.check_types import ProbeRequest
from harness.data import Dataset
from harness.spec import AttackSpec, BenchmarkSpec

CLEAN = "clean"
LABEL_LEAK = "label-leak"  # the `check` of the label-leak board's probe cells (not a sanity check's)
PERTURBATION_PROBE, ROBUST_FEATURES = "perturbation-probe", "robust-features"  # their request names
FINDINGS, DEAD_UNITS = "findings", "dead-units"  # the findings board's probe cells: their `check` and request name


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
    targets: tuple[str, ...] = ()  # [transfer]: the defenses that classify the examples crafted on `defense`

    @property
    def models(self) -> tuple[str, ...]:
        """Every defense whose model the cell loads: its own, its transfer source and its targets."""
        return tuple(dict.fromkeys(n for n in (self.defense, self.source, *self.targets) if n is not None))

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
          reuses: str | None = None, sample: int | None = None, targets: tuple[tuple[str, str], ...] = ()) -> Cell:
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
    if targets:  # (defense name, model key) pairs, in order: the stored rows follow it
        identity["targets"] = [key for _, key in targets]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
    seed = int(hashlib.sha256(json.dumps(randomness, sort_keys=True, default=str).encode()).hexdigest()[:8], 16)
    return Cell(key, defense, model_key, attack, eps, seed, examples, probe, check, request,
                None if source is None else source[0], tuple(after), reuses, sample, tuple(name for name, _ in targets))
