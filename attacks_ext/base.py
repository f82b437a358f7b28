"""The one attack interface.

An attack is a name, a norm, whether it reads the true label, and
`__call__(model, x, y, *, eps, generator) -> x_adv` with inputs in [0, 1] on any device. The base class
validates eps, puts the model in eval mode and restores every module's mode and every parameter's
`.grad` afterwards, so an attack never leaves a trace on the model it was given. Subclasses implement
`run`. Threat-model enforcement is the harness's job (`harness.threat.verify`), not the attack's.
"""
from __future__ import annotations

import abc
import contextlib
import math

import numpy as np
import torch
from torch import nn

from harness.threat import Norm


def check_eps(eps, norm: Norm) -> float | torch.Tensor:
    """eps in input units of [0, 1] data: finite, non-negative, and <= 1 for Linf.

    A float, or (for our own attacks, as adversarial training needs) a 1-D tensor with one eps per example.
    """
    if isinstance(eps, torch.Tensor) and eps.ndim > 0:
        if eps.ndim != 1:
            raise ValueError(f"per-example eps must be a 1-D tensor, got shape {tuple(eps.shape)}")
        if not torch.isfinite(eps).all() or bool((eps < 0).any()):
            raise ValueError("eps must be finite numbers >= 0")
        if norm is Norm.LINF and bool((eps > 1).any()):
            raise ValueError(f"Linf eps={float(eps.max()):g} exceeds 1, the whole [0, 1] input range; eps is in input units")
        return eps
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm is Norm.LINF and value > 1:
        raise ValueError(
            f"Linf eps={value:g} exceeds 1, the whole [0, 1] input range; eps is in input units "
            f"(did you mean {value:g}/255 = {value / 255:.4f}?)"
        )
    return value


FAMILIES = ("one-step", "iterative", "gradient-free", "noise")


class Attack(abc.ABC):
    """Base class of every attack; see the module docstring for the contract."""

    norm: Norm
    uses_true_label: bool = True
    uses_gradients: bool = True  # False for noise baselines; gradient-free attacks set it too
    family: str = "iterative"  # one of FAMILIES; the sanity checks compare families against each other
    per_example_eps: bool = False  # True where `run` accepts eps as an (N, 1, ..., 1) tensor

    def __init__(self, name: str, norm: Norm | str, *, uses_true_label: bool = True, family: str | None = None):
        self.name = name
        self.norm = Norm.parse(norm)
        self.uses_true_label = uses_true_label
        if family is not None:
            if family not in FAMILIES:
                raise ValueError(f"attack family {family!r} unknown; allowed: {', '.join(FAMILIES)}")
            self.family = family
            self.uses_gradients = family in ("one-step", "iterative")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, norm={self.norm.value})"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        eps = check_eps(eps, self.norm)
        if isinstance(eps, torch.Tensor):
            if not self.per_example_eps:
                raise TypeError(f"{self.name} takes one eps per batch; per-example eps needs one of our own attacks")
            if len(eps) != len(x):
                raise ValueError(f"per-example eps has {len(eps)} entries for a batch of {len(x)}")
            eps = eps.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        modes = [(module, module.training) for module in model.modules()]
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        model.eval()
        try:
            with torch.enable_grad():
                x_adv = self.run(model, x.detach(), y.detach(), eps=eps, generator=generator)
        finally:
            for module, training in modes:
                module.training = training
            for p, grad in grads:
                p.grad = grad
        return x_adv.detach().to(device=x.device, dtype=x.dtype)

    @abc.abstractmethod
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
        """Return x_adv for the batch; model is in eval mode; eps a float or an (N, 1, ..., 1) tensor."""


def seed_from(generator: torch.Generator) -> int:
    """Draw a 31-bit seed from our generator for libraries that only read global RNG state."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@contextlib.contextmanager
def isolated_global_rng(seed: int, device: torch.device):
    """Seed torch's and numpy's global RNGs for a library call and restore them afterwards."""
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
