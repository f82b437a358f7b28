"""The one-step and basic iterative methods of Kurakin, Goodfellow & Bengio, "Adversarial Machine
Learning at Scale" (ICLR 2017), Appendix A and Section 2.

One step, x_adv = clip01(x + eps * d):
    fgsm            d = sign(grad CE(x, y_true))                 Linf, reads the true label
    fgsm-pred       d = sign(grad CE(x, y_pred))                 Linf, label-free
    fast-entropy    d = sign(grad H(softmax f(x)))               Linf, label-free
    fast-grad-linf  d = g / ||g||_inf, g = grad CE(x, y_true)    Linf, reads the true label
    fast-grad-l2    d = g / ||g||_2,   g = grad CE(x, y_true)    L2,   reads the true label
    step-ll         d = -sign(grad CE(x, y_least_likely))        Linf, label-free
    step-rnd        d = -sign(grad CE(x, y_random)), y_random uniform over the classes other than y_true
                    (the true label is read only to exclude it)
    random-sign     d = sign(N(0, I))                            Linf, label-free, no gradient
    truncnorm-noise x + N(0, (eps/2)^2) truncated to [-eps, eps]  Linf, label-free, no gradient
Iterative (step 1/255, min(eps + 4, 1.25 eps) iterations with eps in 0-255 units, rounded up):
    iter-basic      ascend CE(x, y_true), clip to the eps-ball each step
    iter-ll         descend CE(x, y_least_likely of the clean prediction), clip each step
All accept a per-example eps tensor (adversarial training draws one eps per example).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attacks_ext.base import Attack, ExampleRandomness, LabelMode
from attacks_ext.pgd import ascend, cross_entropy_gradient
from harness.registry import ATTACKS, Family
from harness.threat import Norm

TARGETS = tuple(LabelMode)


def _input_gradient(model, x: torch.Tensor, target: LabelMode, y: torch.Tensor, rng: ExampleRandomness) -> torch.Tensor:
    """Gradient at x of the loss whose sign the method follows (ascent for true/predicted/entropy,
    the caller descends for least-likely/random targets)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if target == LabelMode.ENTROPY:
        log_p = F.log_softmax(logits, dim=1)
        loss = -(log_p.exp() * log_p).sum()
    else:
        labels = choose_labels(logits.detach(), y, target, rng)
        loss = F.cross_entropy(logits, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def choose_labels(logits: torch.Tensor, y: torch.Tensor, target: LabelMode, rng: ExampleRandomness) -> torch.Tensor:
    if target == LabelMode.TRUE:
        return y
    if target == LabelMode.PREDICTED:
        return logits.argmax(1)
    if target == LabelMode.LEAST_LIKELY:
        return logits.argmin(1)
    if target == LabelMode.RANDOM:  # uniform over the other classes: offset 1..C-1 from the true label
        classes = logits.shape[1]
        offset = rng.randint(1, classes).to(y.device)
        return (y + offset) % classes
    raise ValueError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)}")


def _scale(grad: torch.Tensor, how: str) -> torch.Tensor:
    flat = grad.flatten(1)
    shape = (-1,) + (1,) * (grad.ndim - 1)
    if how == "sign":
        return grad.sign()
    if how == "linf":
        return grad / flat.abs().amax(1).clamp_min(1e-12).view(shape)
    return grad / flat.norm(dim=1).clamp_min(1e-12).view(shape)


class OneStepAttack(Attack):
    """x_adv = clip01(x + eps * d) for one gradient (or noise) direction d; see the module docstring."""

    per_example_eps = True

    def __init__(self, name: str, norm: Norm, *, target: LabelMode | str | None, scaling: str = "sign", descend: bool = False,
                 uses_true_label: bool):
        super().__init__(name, norm, uses_true_label=uses_true_label, family="noise" if target is None else "one-step")
        self.target = None if target is None else LabelMode.parse(target, "target")
        self.scaling, self.descend = scaling, descend

    def run(self, model, x, y, *, eps, rng):
        if self.target is None:
            return random_sign(x, eps, rng) if self.scaling == "sign" else truncated_normal_noise(x, eps, rng)
        direction = _scale(_input_gradient(model, x, self.target, y, rng), self.scaling)
        return (x - eps * direction if self.descend else x + eps * direction).clamp(0, 1)


def random_sign(x: torch.Tensor, eps, rng: ExampleRandomness) -> torch.Tensor:
    noise = rng.randn(*x.shape[1:]).sign().to(device=x.device, dtype=x.dtype)
    return (x + eps * noise).clamp(0, 1)


def truncated_normal_noise(x: torch.Tensor, eps, rng: ExampleRandomness) -> torch.Tensor:
    """N(0, (eps/2)^2) truncated to [-eps, eps] (two standard deviations), by inverting the normal CDF."""
    low = 0.5 * (1 + math.erf(-2 / math.sqrt(2)))
    u = low + (1 - 2 * low) * rng.rand(*x.shape[1:], dtype=torch.float64)
    z = torch.special.ndtri(u).clamp(-2, 2).to(device=x.device, dtype=x.dtype)
    return (x + z * (eps / 2)).clamp(0, 1)


def kurakin_iterations(eps) -> int:
    """min(eps + 4, 1.25 eps) in 0-255 units, rounded up; the largest eps of a batch decides."""
    eps_255 = float(eps.max() if isinstance(eps, torch.Tensor) else eps) * 255
    return math.ceil(min(eps_255 + 4, 1.25 * eps_255) - 1e-9)


def _ascending_cross_entropy(model, x_at, labels, rng):
    return cross_entropy_gradient(model, x_at, labels)


def _descending_cross_entropy(model, x_at, labels, rng):  # towards `labels`: follow minus the gradient
    grad, logits = cross_entropy_gradient(model, x_at, labels)
    return -grad, logits


class BasicIterativeAttack(Attack):
    """Kurakin's iter. basic (ascend the true label's loss) and iter. l.l. (descend towards the least
    likely class of the clean prediction), step 1/255, projected onto the eps-ball and [0, 1]."""

    per_example_eps = True
    stops_early = True

    def __init__(self, name: str, *, least_likely: bool, step_size: float = 1 / 255):
        super().__init__(name, Norm.LINF, uses_true_label=not least_likely)
        self.least_likely, self.step_size = least_likely, step_size

    def run(self, model, x, y, *, eps, rng, stop_when_fooled=False):
        target, gradient = None, _ascending_cross_entropy
        if self.least_likely:  # towards the clean prediction's least-likely class, fixed for the whole walk
            with torch.no_grad():
                target, gradient = model(x).argmin(1), _descending_cross_entropy
        return ascend(model, x, y, x, steps=kurakin_iterations(eps), step=self.step_size, eps=eps, norm=Norm.LINF,
                      gradient=gradient, rng=rng, stop_when_fooled=stop_when_fooled, target=target,
                      deterministic=True)

    def evaluations_to_end(self, examples: int, eps: float) -> tuple[int, int]:
        count = examples * kurakin_iterations(eps)
        return count, count


ONE_STEP = {
    # id: (norm, target, scaling, descend, reads the true label, description)
    "fgsm": (Norm.LINF, LabelMode.TRUE, "sign", False, True, "FGSM: sign of the true-label loss gradient (Goodfellow et al. 2015)."),
    "fgsm-pred": (Norm.LINF, LabelMode.PREDICTED, "sign", False, False, "FGSM on the predicted label (label-free twin of FGSM; Kurakin et al. 2017)."),
    "fast-entropy": (Norm.LINF, LabelMode.ENTROPY, "sign", False, False, "Fast entropy: sign of the prediction-entropy gradient (Kurakin et al. 2017)."),
    "fast-grad-linf": (Norm.LINF, LabelMode.TRUE, "linf", False, True, "Fast grad Linf: eps * g / ||g||_inf of the true-label loss (Kurakin et al. 2017)."),
    "fast-grad-l2": (Norm.L2, LabelMode.TRUE, "l2", False, True, "Fast grad L2: eps * g / ||g||_2 of the true-label loss (Kurakin et al. 2017)."),
    "step-ll": (Norm.LINF, LabelMode.LEAST_LIKELY, "sign", True, False, "Step l.l.: one signed step towards the least-likely class (Kurakin et al. 2017)."),
    "step-rnd": (Norm.LINF, LabelMode.RANDOM, "sign", True, True, "Step rnd: one signed step towards a random other class (Kurakin et al. 2017)."),
    "random-sign": (Norm.LINF, None, "sign", False, False, "Sign of random normal noise, eps * sign(N(0, I)): a no-gradient baseline."),
    "truncnorm-noise": (Norm.LINF, None, "truncnorm", False, False, "Truncated-normal noise, std eps/2 on [-eps, eps]: a no-gradient baseline."),
}


def _register_one_step(name: str, norm: Norm, target, scaling: str, descend: bool, reads_label: bool, doc: str):
    def factory() -> Attack:
        return OneStepAttack(name, norm, target=target, scaling=scaling, descend=descend, uses_true_label=reads_label)

    factory.__doc__ = doc
    family = Family.NOISE if target is None else Family.ONE_STEP
    ATTACKS.register(name, factory, norm=norm, family=family, uses_true_label=reads_label)


for _name, _entry in ONE_STEP.items():
    _register_one_step(_name, *_entry)


@ATTACKS.register("iter-basic", norm="linf", family="iterative")
def iter_basic() -> Attack:
    """Iter. basic (BIM): step 1/255, min(eps+4, 1.25 eps) steps in 0-255 units (Kurakin et al. 2017)."""
    return BasicIterativeAttack("iter-basic", least_likely=False)


@ATTACKS.register("iter-ll", norm="linf", family="iterative", uses_true_label=False)
def iter_ll() -> Attack:
    """Iter. l.l.: BIM towards the least-likely class (Kurakin et al. 2017)."""
    return BasicIterativeAttack("iter-ll", least_likely=True)
