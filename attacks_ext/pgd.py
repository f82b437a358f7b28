"""Reference projected gradient descent (Madry et al. 2018), Linf and L2, on cross-entropy.

Written out in full so the harness has an implementation it controls, to check the libraries' PGD
against and to use as the adversary in adversarial training. Random starts draw from the caller's
generator on the CPU, so the same seed gives the same perturbation on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attacks_ext.base import Attack
from harness.registry import ATTACKS
from harness.threat import Norm


def _per_example_l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def random_start(x: torch.Tensor, eps, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """A point drawn in the eps-ball around x, clipped to [0, 1]: uniform in the Linf box; for L2 a
    uniform direction with radius eps * U(0, 1). Drawn on the CPU so every device sees the same numbers."""
    if norm is Norm.LINF:
        unit = torch.rand(x.shape, generator=generator) * 2 - 1
    else:
        direction = torch.randn(x.shape, generator=generator)
        radius = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=generator)
        unit = direction / _per_example_l2(direction).clamp_min(1e-12) * radius
    return (x + unit.to(device=x.device, dtype=x.dtype) * eps).clamp(0, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps, norm: Norm) -> torch.Tensor:
    """Project x_adv onto the eps-ball around x intersected with [0, 1]."""
    if norm is Norm.LINF:
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    else:
        delta = x_adv - x
        delta = delta * (eps / _per_example_l2(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0, 1)


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for Linf, grad / ||grad||_2 for L2."""
    if norm is Norm.LINF:
        return grad.sign()
    return grad / _per_example_l2(grad).clamp_min(1e-12)


def madry_step_fraction(steps: int, step_fraction: float | None) -> float:
    """Validated step size as a fraction of eps; by default Madry et al.'s 2.5 * eps / steps, which lets the
    walk cross the ball and come back."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if step_fraction is not None and not step_fraction > 0:
        raise ValueError(f"step_fraction must be > 0, got {step_fraction!r}")
    return float(step_fraction) if step_fraction is not None else 2.5 / steps


class ProjectedGradientDescent(Attack):
    """PGD on the cross-entropy of the true label; `steps` iterations of size `step_fraction * eps`.

    Linf steps along sign(grad), L2 along grad / ||grad||_2; each iterate is projected onto the
    eps-ball and [0, 1]. Returns the last iterate. Shapes: x (N, C, H, W) in [0, 1], y (N,).
    """

    per_example_eps = True

    def __init__(self, name: str, norm: Norm, *, steps: int = 40, step_fraction: float | None = None,
                 random_start: bool = True):
        super().__init__(name, norm, uses_true_label=True)
        self.step_fraction = madry_step_fraction(steps, step_fraction)
        self.steps = int(steps)
        self.random_start = bool(random_start)

    def gradient(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The ascent direction's source: the cross-entropy gradient at x_adv (subclasses estimate it otherwise)."""
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        return grad

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
            generator: torch.Generator) -> torch.Tensor:
        step = self.step_fraction * eps
        x_adv = random_start(x, eps, self.norm, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            grad = self.gradient(model, x_adv, y, generator)
            x_adv = project(x_adv.detach() + step * ascent_direction(grad, self.norm), x, eps, self.norm)
        return x_adv


@ATTACKS.register("pgd-linf")
def pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """Our reference PGD, Linf (Madry et al. 2018)."""
    return ProjectedGradientDescent("pgd-linf", Norm.LINF, steps=steps, step_fraction=step_fraction, random_start=random_start)


@ATTACKS.register("pgd-l2")
def pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """Our reference PGD, L2 (Madry et al. 2018)."""
    return ProjectedGradientDescent("pgd-l2", Norm.L2, steps=steps, step_fraction=step_fraction, random_start=random_start)
