"""`python -m harness convert-weights`: a published `.pt` / `.pth` state dict to the safetensors file the harness reads.

The harness never unpickles a file it did not write. Most published robust models (RobustBench, torchvision)
ship as pickled state dicts, so this reads them with `torch.load(weights_only=True)`, PyTorch's restricted
loader (tensors and plain containers only, never arbitrary objects), unwraps the usual containers, and writes
safetensors. With `factory` the result must fit the model the factory builds, key for key and shape for shape.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params")
PREFIXES = ("module.", "model.")  # DataParallel's wrapper, and a common training-script wrapper


def _unwrap(loaded, notes: list[str]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: the dict itself, or one of CONTAINER_KEYS (nested), without prefixes."""
    for _ in range(3):
        if not isinstance(loaded, dict):
            raise ValueError(f"the file holds a {type(loaded).__name__}, not a state dict (a dict of tensors)")
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            break
        inner = next((key for key in CONTAINER_KEYS if isinstance(loaded.get(key), dict)), None)
        if inner is None:
            found = ", ".join(map(repr, list(loaded)[:8]))
            raise ValueError(f"no state dict found: the file's top-level keys are {found}; expected tensors or one "
                             f"of {', '.join(CONTAINER_KEYS)}")
        notes.append(f"took the state dict under {inner!r}")
        loaded = loaded[inner]
    else:
        raise ValueError("no state dict found within three levels of containers")
    state = dict(loaded)
    for prefix in PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
            notes.append(f"removed the {prefix!r} prefix from every key")
    return state


def _check_fits(state: dict[str, torch.Tensor], factory: str, options: dict) -> None:
    from harness.models import build_external

    expected = build_external(factory, options).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"the weights do not fit {factory!r}: " + "; ".join(problems))


def convert_weights(source: Path, target: Path, *, factory: str | None = None, options: dict | None = None) -> list[str]:
    """Write `source`'s state dict to `target` as safetensors; returns what was done, line by line."""
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    if target.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {target.name!r}")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as error:
        raise ValueError(f"{source}: the restricted loader (torch.load weights_only=True) refused it: "
                         f"{str(error).splitlines()[0]}. It holds more than tensors; the harness will not unpickle "
                         "arbitrary objects. Re-save it as a plain state dict: torch.save(model.state_dict(), path)") from None
    notes: list[str] = [f"read {source.name} with torch.load(weights_only=True)"]
    state = _unwrap(loaded, notes)
    if factory is not None:
        _check_fits(state, factory, options or {})
        notes.append(f"checked every key and shape against {factory}")
    # safetensors stores each tensor once: contiguous copies, no shared storage
    save_file({key: value.detach().contiguous().clone() for key, value in state.items()}, str(target))
    notes.append(f"wrote {len(state)} tensors to {target}")
    return notes
