"""The checkpoint cache: trained weights on disk (safetensors) with a sidecar naming their key and sha256.

A key hashes everything that decides the weights (recipe, data, seed, the training code's import closure, the
ensemble sources' keys, torch's thread count); this module is not part of that closure, so changing how the cache
is written leaves every checkpoint valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from defenses.recipes import Recipe
from defenses.train import build_recipe_model, recipe_code_roots, train, training_code_version
from harness.data import Dataset

@dataclass(frozen=True)
class Checkpoint:
    """A trained model on disk: its key, weights file and training log."""

    key: str
    weights: Path
    log: dict


def checkpoint_key(recipe: Recipe, data: Dataset, seed: int, source_keys: tuple[str, ...] = ()) -> str:
    """Hash of everything that decides the trained weights; `source_keys` are the ensemble sources' keys.

    torch's intra-op thread count is part of it: CPU kernels split their reductions by thread, so the same recipe
    trained with 1 and 2 threads gives different bits (measured on the small CNN), and a checkpoint trained by a
    one-thread worker must not stand in for a two-thread one."""
    payload = {"recipe": recipe.as_dict(), "dataset": [data.name, data.fingerprint], "seed": seed,
               "code": training_code_version(recipe_code_roots(recipe)), "sources": list(source_keys),
               "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, values), not of its bytes: a checkpoint's
    file carries its key in the metadata, so the same weights trained under another code version hash alike here."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
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
        build_recipe_model(recipe, data).load_state_dict(state, strict=True)
    except Exception as error:  # safetensors and torch raise several types for a bad file
        raise ValueError(f"{weights.name} does not load into {recipe.model}: {error}") from None
    return Checkpoint(key, weights, meta.get("training", {}))


def cached_checkpoint(recipe: Recipe, data: Dataset, key: str, cache_dir: Path) -> Checkpoint | None:
    """The verified cache entry for `key`; None when there is none or it fails verification (then it is retrained)."""
    weights, sidecar = _paths(Path(cache_dir), recipe, key)
    if not (weights.exists() or sidecar.exists()):
        return None
    try:
        return _verified(recipe, data, key, weights, sidecar)
    except (ValueError, OSError) as error:
        print(f"harness: cached checkpoint for {recipe.name!r} failed verification ({error}); retraining", file=sys.stderr)
        return None


def checkpoint_bytes(recipe: Recipe, key: str, model: nn.Module) -> bytes:
    """The trained weights as a safetensors file's bytes (what a remote training task sends back)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    return save(state, metadata={"key": key, "recipe": json.dumps(recipe.as_dict(), sort_keys=True)})


def write_checkpoint(recipe: Recipe, data: Dataset, *, key: str, seed: int, weights_bytes: bytes, log: dict,
                     cache_dir: Path, sha256: str | None = None) -> Checkpoint:
    """Write a cache entry atomically (weights, then the sidecar with their sha256). `sha256`: the hash the bytes
    had where they were made (a remote worker); the written file must match it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, sidecar = _paths(cache_dir, recipe, key)
    temporary = weights.with_suffix(".tmp")
    temporary.write_bytes(weights_bytes)
    written = file_sha256(temporary)
    if sha256 is not None and written != sha256:
        temporary.unlink()
        raise ValueError(f"the weights of {recipe.name!r} arrived damaged: sha256 {written[:12]}, made as {sha256[:12]}")
    os.replace(temporary, weights)
    meta = {"key": key, "sha256": written, "recipe": recipe.as_dict(), "dataset": data.name, "seed": seed,
            "threads": torch.get_num_threads(), "training": log}
    sidecar.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return Checkpoint(key, weights, log)


def obtain_checkpoint(recipe: Recipe, data: Dataset, *, seed: int, cache_dir: Path, device: torch.device | str = "cpu",
                      progress: bool = True, sources: dict[str, tuple[str, nn.Module]] | None = None) -> Checkpoint:
    """The cached checkpoint for (recipe, data, seed, code, sources, threads), training it first when absent or broken.

    `sources` maps each of `recipe.ensemble_sources` to (its checkpoint key, its model)."""
    sources = sources or {}
    key = checkpoint_key(recipe, data, seed, tuple(sources[name][0] for name in recipe.ensemble_sources))
    cached = cached_checkpoint(recipe, data, key, cache_dir)
    if cached is not None:
        return cached
    model, log = train(recipe, data, seed=seed, device=device, progress=progress,
                       sources={name: model for name, (_, model) in sources.items()})
    return write_checkpoint(recipe, data, key=key, seed=seed, weights_bytes=checkpoint_bytes(recipe, key, model),
                            log=log.as_dict(), cache_dir=cache_dir)


def load_checkpoint_model(recipe: Recipe, data: Dataset, checkpoint: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    model = build_recipe_model(recipe, data)
    model.load_state_dict(load_file(checkpoint.weights), strict=True)
    return model.to(device).eval()
