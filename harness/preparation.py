"""Defenses made ready for evaluation: trained (or loaded from the checkpoint cache) recipes and validated
external models, each identified by a key that does not need training to compute."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from defenses.checkpoints import Checkpoint, checkpoint_key, file_sha256, load_checkpoint_model, obtain_checkpoint
from harness.data import Dataset
from harness.models import check_finite_outputs, load_external
from harness.spec import BenchmarkSpec, DefenseSpec


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
    by_name = spec.defenses_by_name
    keys: dict[str, str] = {}

    def key_of(defense: DefenseSpec) -> str:
        if defense.name not in keys:
            if defense.recipe is None:
                keys[defense.name] = external_key(defense)
            else:
                sources = tuple(key_of(by_name[name]) for name in defense.recipe.ensemble_sources)
                keys[defense.name] = checkpoint_key(defense.recipe, data, spec.training_seed(defense), sources)
        return keys[defense.name]

    for defense in spec.all_defenses:
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


def prepare_defenses(spec: BenchmarkSpec, names: Iterable[str], data: Dataset, *, cache_dir: Path, device: torch.device,
                     progress: bool = True, on_prepared: Callable[[str, PreparedDefense], None] | None = None,
                     failed: dict[str, str] | None = None) -> dict[str, PreparedDefense]:
    """Train (or load from the cache) the named defenses and the ensemble sources they need. External models are
    validated first (import, build, load, a forward pass with finite logits), before any training starts.
    With `failed`, a trained defense that cannot be used (non-finite outputs) is recorded there (name -> reason)
    and the others go on; a bad external model, or any failure without `failed`, raises."""
    by_name = spec.defenses_by_name
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
            prepared[name] = prepare_defense(defense, data, seed=spec.training_seed(defense), cache_dir=cache_dir, device=device,
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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use 'cpu' or 'auto'")
    return device
