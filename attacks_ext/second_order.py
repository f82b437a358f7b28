"""The second-order (S-O) attack of Li et al., "On Norm-Agnostic Robustness of Adversarial Training".

PGD whose step direction is the cross-entropy gradient averaged over Gaussian-perturbed points,
    d_t = mean_j grad_x L(x_t + r_j),  r_j ~ N(0, sigma^2 I),
then x_{t+1} = Proj(x_t + a * sign(d_t)) for Linf, or a * d_t / ||d_t||_2 for L2. It is a finite-difference,
one-step power-iteration estimate of the top Hessian direction, for points where the first-order gradient
vanishes (adversarially trained models). It is NOT torchattacks' PGDRS, which differentiates the loss of
the noise-averaged softmax instead of averaging the loss gradients.
"""
from __future__ import annotations

import torch

from attacks_ext.base import Attack
from attacks_ext.pgd import ProjectedGradientDescent
from harness.registry import ATTACKS
from harness.threat import Norm


class SecondOrderAttack(ProjectedGradientDescent):
    """S-O: PGD on the mean of `draws` gradients taken at x_t + N(0, sigma^2 I). Shapes as PGD."""

    deterministic_gradient = False  # fresh noise every step: an unchanged iterate is no fixed point

    def __init__(self, name: str, norm: Norm, *, steps: int = 40, step_fraction: float | None = None,
                 random_start: bool = True, sigma: float = 0.1, draws: int = 4):
        super().__init__(name, norm, steps=steps, step_fraction=step_fraction, random_start=random_start)
        if not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")
        if int(draws) != draws or draws < 1:
            raise ValueError(f"draws must be a positive integer, got {draws!r}")
        self.sigma, self.draws = float(sigma), int(draws)

    def gradient(self, model, x_adv, y, rng):
        # Each example's noise comes from its own stream, all draws at once. The draws then go through the model
        # one at a time: a batch of draws x N runs markedly slower per example on a CPU than N at a time. The
        # logits are at the noisy points, not at x_adv, so early stop needs its own forward.
        noise = rng.randn(self.draws, *x_adv.shape[1:]).to(x_adv.device, x_adv.dtype)
        total = torch.zeros_like(x_adv)
        for draw in range(self.draws):
            grad, _ = super().gradient(model, x_adv.detach() + self.sigma * noise[:, draw], y, rng)
            total += grad
        return total / self.draws, None


@ATTACKS.register("so-linf", norm="linf", family="iterative")
def second_order_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True,
                      sigma: float = 0.1, draws: int = 4) -> Attack:
    """Second-order (S-O) attack, Linf: PGD on gradients averaged over Gaussian draws (Li et al.)."""
    return SecondOrderAttack("so-linf", Norm.LINF, steps=steps, step_fraction=step_fraction,
                             random_start=random_start, sigma=sigma, draws=draws)


@ATTACKS.register("so-l2", norm="l2", family="iterative")
def second_order_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True,
                    sigma: float = 0.1, draws: int = 4) -> Attack:
    """Second-order (S-O) attack, L2: PGD on gradients averaged over Gaussian draws (Li et al.)."""
    return SecondOrderAttack("so-l2", Norm.L2, steps=steps, step_fraction=step_fraction,
                             random_start=random_start, sigma=sigma, draws=draws)
