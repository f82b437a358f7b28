"""The one training loop, and the checkpoint cache in front of it.

Checkpoints are safetensors files keyed by a hash of (recipe, data set, seed, training code); a JSON
sidecar holds the file's sha256 and the training log. A file that fails to load or verify is reported
and retrained, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from harness.counting import EvaluationCounter
from harness.data import Dataset
from harness.models import build_model
from harness.registry import ATTACKS
from defenses.recipes import Recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
# Source that decides what a recipe trains into; editing any of it invalidates the cached checkpoints.
TRAINING_CODE = ("defenses", "attacks_ext", "harness/models.py", "harness/data.py", "harness/counting.py")


def training_code_version() -> str:
    digest = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = REPO_ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(REPO_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainingLog:
    """Per-epoch metrics and the total cost of one training run."""

    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    forward_passes: int = 0  # examples sent through the model, adversary included
    backward_passes: int = 0  # examples whose gradient flowed back through the model, adversary included

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "seconds": self.seconds, "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes}


def train(recipe: Recipe, data: Dataset, *, seed: int, device: torch.device | str = "cpu",
          progress: bool = True) -> tuple[nn.Module, TrainingLog]:
    """Train `recipe` on `data.x_train` from scratch; returns the model in eval mode and its log."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_model(recipe.model, num_classes=data.num_classes, in_channels=data.input_shape[0], width=recipe.width)
    model.to(device)
    counted = EvaluationCounter(model)
    if recipe.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    adversary = ATTACKS.get(recipe.adversary)(**dict(recipe.adversary_options)) if recipe.adversary else None
    shuffle = torch.Generator().manual_seed(seed)
    adversary_rng = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = data.x_train, data.y_train
    log = TrainingLog()
    start = time.perf_counter()
    epochs = tqdm(range(recipe.epochs), desc=f"train {recipe.name}", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        eps = recipe.eps_at(epoch)
        order = torch.randperm(len(x_all), generator=shuffle)
        loss_sum = clean_correct = trained_correct = seen = 0.0
        model.train()
        for begin in range(0, len(order), recipe.batch_size):
            index = order[begin : begin + recipe.batch_size]
            x, y = x_all[index].to(device), y_all[index].to(device)
            x_train = adversary(counted, x, y, eps=eps, generator=adversary_rng) if adversary and eps > 0 else x
            logits = counted(x_train)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            trained_correct += float((logits.argmax(1) == y).sum())
            if x_train is x:
                clean_correct += float((logits.argmax(1) == y).sum())
            else:
                with torch.no_grad():
                    clean_correct += float((counted(x).argmax(1) == y).sum())
            seen += len(y)
        record = {"epoch": epoch + 1, "eps": eps, "loss": loss_sum / seen, "clean_accuracy": clean_correct / seen,
                  "adversary_accuracy": trained_correct / seen if adversary else None,
                  "seconds": time.perf_counter() - start}
        log.epochs.append(record)
        epochs.set_postfix(loss=f"{record['loss']:.3f}", clean=f"{record['clean_accuracy']:.3f}")
    optimizer.zero_grad(set_to_none=True)  # a checkpointed model carries no stale gradients
    log.seconds = time.perf_counter() - start
    log.forward_passes, log.backward_passes = counted.forward_evals, counted.gradient_evals
    return model.eval(), log


# --- the checkpoint cache ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """A trained model on disk: its key, weights file and training log."""

    key: str
    weights: Path
    log: dict


def checkpoint_key(recipe: Recipe, data: Dataset, seed: int) -> str:
    payload = {"recipe": recipe.as_dict(), "dataset": [data.name, data.fingerprint], "seed": seed,
               "code": training_code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _paths(cache_dir: Path, recipe: Recipe, key: str) -> tuple[Path, Path]:
    stem = cache_dir / f"{recipe.name}-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _verified(recipe: Recipe, data: Dataset, key: str, weights: Path, sidecar: Path) -> Checkpoint:
    """Load the cache entry and prove it is what it claims, or raise ValueError saying why not."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"sidecar {sidecar.name} unreadable: {error}") from None
    if meta.get("key") != key:
        raise ValueError(f"sidecar {sidecar.name} is for key {meta.get('key')!r}, expected {key!r}")
    if meta.get("sha256") != file_sha256(weights):
        raise ValueError(f"{weights.name} does not match the sha256 recorded when it was written")
    try:
        state = load_file(weights)
        model = build_model(recipe.model, num_classes=data.num_classes, in_channels=data.input_shape[0], width=recipe.width)
        model.load_state_dict(state, strict=True)
    except Exception as error:  # safetensors and torch raise several types for a bad file
        raise ValueError(f"{weights.name} does not load into {recipe.model}: {error}") from None
    return Checkpoint(key, weights, meta.get("training", {}))


def obtain_checkpoint(recipe: Recipe, data: Dataset, *, seed: int, cache_dir: Path, device: torch.device | str = "cpu",
                      progress: bool = True) -> Checkpoint:
    """The cached checkpoint for (recipe, data, seed, code), training it first when absent or broken."""
    cache_dir = Path(cache_dir)
    key = checkpoint_key(recipe, data, seed)
    weights, sidecar = _paths(cache_dir, recipe, key)
    if weights.exists() or sidecar.exists():
        try:
            return _verified(recipe, data, key, weights, sidecar)
        except (ValueError, OSError) as error:
            print(f"harness: cached checkpoint for {recipe.name!r} failed verification ({error}); retraining",
                  file=sys.stderr)
    model, log = train(recipe, data, seed=seed, device=device, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = weights.with_suffix(".tmp")
    save_file(state, str(temporary), metadata={"key": key, "recipe": json.dumps(recipe.as_dict(), sort_keys=True)})
    os.replace(temporary, weights)
    meta = {"key": key, "sha256": file_sha256(weights), "recipe": recipe.as_dict(), "dataset": data.name,
            "seed": seed, "training": log.as_dict()}
    sidecar.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Checkpoint(key, weights, log.as_dict())


def load_checkpoint_model(recipe: Recipe, data: Dataset, checkpoint: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    model = build_model(recipe.model, num_classes=data.num_classes, in_channels=data.input_shape[0], width=recipe.width)
    model.load_state_dict(load_file(checkpoint.weights), strict=True)
    return model.to(device).eval()
