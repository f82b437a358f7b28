"""Reference projected gradient descent (Madry et al. 2018), Linf and L2, on cross-entropy or on the
Carlini-Wagner margin loss.

Written out in full so the harness has an implementation it controls, to check the libraries' PGD
against and to use as the adversary in adversarial training. Random starts draw from each example's own
stream on the CPU, so the same seed gives the same perturbation on any device and in any batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks_ext.base import Attack, ExampleRandomness
from harness.registry import ATTACKS
from harness.threat import Norm


def _per_example_l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def random_start(x: torch.Tensor, eps, norm: Norm, rng: ExampleRandomness) -> torch.Tensor:
    """A point drawn in the eps-ball around x, clipped to [0, 1]: uniform in the Linf box; for L2 a
    uniform direction with radius eps * U(0, 1). Drawn on the CPU so every device sees the same numbers."""
    shape = tuple(x.shape[1:])
    if norm is Norm.LINF:
        unit = rng.rand(*shape) * 2 - 1
    else:
        direction = rng.randn(*shape)
        radius = rng.rand(*([1] * len(shape)))
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


def _rows(value, keep: torch.Tensor):
    """The rows `keep` of a per-example tensor (eps, step size); a float applies to every row."""
    return value[keep] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


# gradient(model, x_at, labels_at, rng) -> (ascent gradient, logits at x_at or None when it did not compute them)
Gradient = Callable[[nn.Module, torch.Tensor, torch.Tensor, ExampleRandomness], tuple[torch.Tensor, torch.Tensor | None]]


def ascend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, steps: int, step, eps,
           norm: Norm, gradient: Gradient, rng: ExampleRandomness, stop_when_fooled: bool = False,
           target: torch.Tensor | None = None, deterministic: bool = False) -> torch.Tensor:
    """The one iterative loop: `steps` times x_adv <- Proj(x_adv + step * direction(gradient)).

    `gradient` sees the rows still in play with their `target` labels (default: the true labels `y`). With
    `stop_when_fooled`, an example whose iterate the model misclassifies (against `y`) leaves the loop at once and
    keeps that iterate; the check reads the logits the gradient already computed where it can (no extra forward).
    With `deterministic` too (the gradient is a function of the point alone: no fresh draws per step), an example
    whose step left its iterate exactly where it was is at a fixed point, where every later step would repeat it,
    so it leaves the loop as well: a zero gradient (masking) costs one step, not all of them.
    Every example's trajectory depends only on its own data and random stream, so its outcome equals that of
    the same attack run to the end that keeps any misclassified iterate."""
    target = y if target is None else target
    x_adv = x_adv.clone()
    active = torch.arange(len(x), device=x.device)
    streams = rng
    for _ in range(steps):
        grad, logits = gradient(model, x_adv[active], target[active], streams)
        before = len(active)
        if stop_when_fooled:
            if logits is None:
                with torch.no_grad():
                    logits = model(x_adv[active])
            still = logits.argmax(1) == y[active]
            active, grad = active[still], grad[still]
        current = x_adv[active].detach()
        moved = project(current + _rows(step, active) * ascent_direction(grad, norm), x[active], _rows(eps, active), norm)
        x_adv[active] = moved
        if stop_when_fooled and deterministic:  # at a fixed point every later step would repeat this one
            active = active[(moved != current).flatten(1).any(1)]
        if len(active) < before:  # the active set changed: keep the remaining examples' streams
            if len(active) == 0:
                break
            streams = rng.subset(active.cpu())
    return x_adv


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_i CE(logits_i, labels_i)."""
    return F.cross_entropy(logits, labels, reduction="sum")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_i [max_{j != y_i} z_j - z_{y_i}]: the Carlini-Wagner margin loss (their f_6 without the confidence
    clamp), which does not saturate where the softmax does."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return (others - true).sum()


LOSSES = {"ce": cross_entropy, "cw": margin}


def loss_gradient(loss, model: nn.Module, x_at: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x loss(model(x_at), labels), the logits at x_at) for a loss of (logits, labels)."""
    x_at = x_at.detach().requires_grad_(True)
    logits = model(x_at)
    (grad,) = torch.autograd.grad(loss(logits, labels), x_at)
    return grad, logits.detach()


def cross_entropy_gradient(model: nn.Module, x_at: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x sum CE(model(x_at), labels), the logits at x_at)."""
    return loss_gradient(cross_entropy, model, x_at, labels)


def margin_gradient(model: nn.Module, x_at: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x of the summed Carlini-Wagner margin, the logits at x_at)."""
    return loss_gradient(margin, model, x_at, labels)


class ProjectedGradientDescent(Attack):
    """PGD on the true label's cross-entropy (`loss="ce"`) or Carlini-Wagner margin (`loss="cw"`); `steps`
    iterations of size `step_fraction * eps`.

    Linf steps along sign(grad), L2 along grad / ||grad||_2; each iterate is projected onto the
    eps-ball and [0, 1]. Returns the last iterate, or with early stop the first misclassified one.
    Shapes: x (N, C, H, W) in [0, 1], y (N,).
    """

    per_example_eps = True
    stops_early = True
    draws = 1  # model evaluations per example and step
    deterministic_gradient = True  # the gradient depends on the point alone (S-O draws fresh noise every step)

    def __init__(self, name: str, norm: Norm, *, steps: int = 40, step_fraction: float | None = None,
                 random_start: bool = True, loss: str = "ce"):
        super().__init__(name, norm, uses_true_label=True)
        self.step_fraction = madry_step_fraction(steps, step_fraction)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} unknown; allowed: {', '.join(map(repr, LOSSES))}")
        self.loss = loss

    def gradient(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, rng: ExampleRandomness):
        """The ascent direction's source: the loss gradient at x_adv (subclasses estimate it otherwise)."""
        return loss_gradient(LOSSES[self.loss], model, x_adv, y)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps, rng: ExampleRandomness,
            stop_when_fooled: bool = False) -> torch.Tensor:
        start = random_start(x, eps, self.norm, rng) if self.random_start else x
        return ascend(model, x, y, start, steps=self.steps, step=self.step_fraction * eps, eps=eps, norm=self.norm,
                      gradient=self.gradient, rng=rng, stop_when_fooled=stop_when_fooled,
                      deterministic=self.deterministic_gradient)

    def evaluations_to_end(self, examples: int, eps: float) -> tuple[int, int]:
        count = examples * self.steps * self.draws
        return count, count


@ATTACKS.register("pgd-linf", norm="linf", family="iterative")
def pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True,
             loss: str = "ce") -> Attack:
    """Our reference PGD, Linf (Madry et al. 2018); loss "ce" (cross-entropy) or "cw" (Carlini-Wagner margin)."""
    return ProjectedGradientDescent("pgd-linf", Norm.LINF, steps=steps, step_fraction=step_fraction,
                                    random_start=random_start, loss=loss)


@ATTACKS.register("pgd-l2", norm="l2", family="iterative")
def pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True,
           loss: str = "ce") -> Attack:
    """Our reference PGD, L2 (Madry et al. 2018); loss "ce" (cross-entropy) or "cw" (Carlini-Wagner margin)."""
    return ProjectedGradientDescent("pgd-l2", Norm.L2, steps=steps, step_fraction=step_fraction,
                                    random_start=random_start, loss=loss)
