"""Adapters that put torchattacks and ART attacks behind the one attack interface.

torchattacks attacks are built per call (no global mode setters, nothing shared between calls) and run
with torch's global RNG seeded from the batch (`ExampleRandomness.library_seed`) and restored afterwards. ART attacks make one numpy
round trip per batch; ART reads numpy's global RNG, which is seeded and restored the same way.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from attacks_ext.base import Attack, isolated_global_rng
from attacks_ext.pgd import madry_step_fraction
from harness.registry import ATTACKS
from harness.threat import Norm


class TorchattacksAttack(Attack):
    """A torchattacks attack; `build(model, eps, seed)` returns a fresh torchattacks object per call."""

    def __init__(self, name: str, norm: Norm, build: Callable[[nn.Module, float, int], object], *,
                 family: str = "iterative"):
        super().__init__(name, norm, uses_true_label=True, family=family)
        self._build = build

    def run(self, model, x, y, *, eps, rng):
        seed = rng.library_seed()
        if eps == 0:  # torchattacks PGDL2 divides by the zero norm of its random start and returns NaN
            return x.clone()
        attack = self._build(model, eps, seed)
        with isolated_global_rng(seed, x.device):
            return attack(x, y)


class ArtAttack(Attack):
    """An ART evasion attack on a PyTorchClassifier built around the model for this call."""

    def __init__(self, name: str, norm: Norm, build: Callable[[object, float, int], object], *,
                 family: str = "iterative"):
        super().__init__(name, norm, uses_true_label=True, family=family)
        self._build = build

    def run(self, model, x, y, *, eps, rng):
        from art.estimators.classification import PyTorchClassifier

        seed = rng.library_seed()
        if eps == 0:  # ART rejects a zero step size; a zero budget admits only x itself
            return x.clone()
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        classifier = PyTorchClassifier(
            model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=num_classes,
            clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
        )
        attack = self._build(classifier, eps, len(x))
        with isolated_global_rng(seed, x.device):
            x_adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy())
        return torch.from_numpy(np.asarray(x_adv, dtype=np.float32))


ART_NORMS = {Norm.LINF: np.inf, Norm.L2: 2}


# --- torchattacks -----------------------------------------------------------------------------------

@ATTACKS.register("ta-fgsm")
def torchattacks_fgsm() -> Attack:
    """torchattacks FGSM (Goodfellow et al. 2015), Linf."""
    import torchattacks

    return TorchattacksAttack("ta-fgsm", Norm.LINF, lambda model, eps, seed: torchattacks.FGSM(model, eps=eps),
                              family="one-step")


def _torchattacks_pgd(name: str, norm: Norm, steps: int, step_fraction: float | None, random_start: bool) -> Attack:
    import torchattacks

    fraction = madry_step_fraction(steps, step_fraction)
    cls = torchattacks.PGD if norm is Norm.LINF else torchattacks.PGDL2
    return TorchattacksAttack(
        name, norm,
        lambda model, eps, seed: cls(model, eps=eps, alpha=fraction * eps, steps=int(steps), random_start=bool(random_start)),
    )


@ATTACKS.register("ta-pgd-linf")
def torchattacks_pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """torchattacks PGD, Linf (Madry et al. 2018)."""
    return _torchattacks_pgd("ta-pgd-linf", Norm.LINF, steps, step_fraction, random_start)


@ATTACKS.register("ta-pgd-l2")
def torchattacks_pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """torchattacks PGDL2, L2 (Madry et al. 2018)."""
    return _torchattacks_pgd("ta-pgd-l2", Norm.L2, steps, step_fraction, random_start)


def _torchattacks_apgd(name: str, norm: Norm, steps: int, restarts: int) -> Attack:
    import torchattacks

    if int(steps) != steps or steps < 1 or int(restarts) != restarts or restarts < 1:
        raise ValueError(f"steps and restarts must be positive integers, got {steps!r}, {restarts!r}")
    return TorchattacksAttack(
        name, norm,
        lambda model, eps, seed: torchattacks.APGD(
            model, norm="Linf" if norm is Norm.LINF else "L2", eps=eps, steps=int(steps), n_restarts=int(restarts),
            seed=seed, loss="ce",
        ),
    )


@ATTACKS.register("ta-apgd-ce")
def torchattacks_apgd_ce(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on cross-entropy, Linf (Croce & Hein 2020); 100 steps is AutoAttack's budget."""
    return _torchattacks_apgd("ta-apgd-ce", Norm.LINF, steps, restarts)


def _torchattacks_square(name: str, norm: Norm, queries: int, p_init: float) -> Attack:
    import torchattacks

    if int(queries) != queries or queries < 1:
        raise ValueError(f"queries must be a positive integer, got {queries!r}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    return TorchattacksAttack(
        name, norm,
        lambda model, eps, seed: torchattacks.Square(
            model, norm="Linf" if norm is Norm.LINF else "L2", eps=eps, n_queries=int(queries), n_restarts=1,
            p_init=p_init, loss="margin", seed=seed,
        ),
        family="gradient-free",
    )


@ATTACKS.register("ta-square")
def torchattacks_square(*, queries: int = 1000, p_init: float = 0.8) -> Attack:
    """torchattacks Square, Linf (Andriushchenko et al. 2020): random search on the margin, no gradients."""
    return _torchattacks_square("ta-square", Norm.LINF, queries, p_init)


@ATTACKS.register("ta-square-l2")
def torchattacks_square_l2(*, queries: int = 1000, p_init: float = 0.8) -> Attack:
    """torchattacks Square, L2 (Andriushchenko et al. 2020): random search on the margin, no gradients."""
    return _torchattacks_square("ta-square-l2", Norm.L2, queries, p_init)


@ATTACKS.register("ta-apgd-ce-l2")
def torchattacks_apgd_ce_l2(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on cross-entropy, L2 (Croce & Hein 2020)."""
    return _torchattacks_apgd("ta-apgd-ce-l2", Norm.L2, steps, restarts)


# --- ART --------------------------------------------------------------------------------------------

def _art_fgm(name: str, norm: Norm) -> Attack:
    from art.attacks.evasion import FastGradientMethod

    return ArtAttack(
        name, norm,
        lambda classifier, eps, batch: FastGradientMethod(
            classifier, norm=ART_NORMS[norm], eps=eps, eps_step=eps, batch_size=batch
        ),
        family="one-step",
    )


@ATTACKS.register("art-fgm-linf")
def art_fgm_linf() -> Attack:
    """ART FastGradientMethod, Linf (= FGSM, Goodfellow et al. 2015)."""
    return _art_fgm("art-fgm-linf", Norm.LINF)


@ATTACKS.register("art-fgm-l2")
def art_fgm_l2() -> Attack:
    """ART FastGradientMethod, L2 (fast grad L2: eps * g / ||g||_2)."""
    return _art_fgm("art-fgm-l2", Norm.L2)


def _art_pgd(name: str, norm: Norm, steps: int, step_fraction: float | None, random_start: bool) -> Attack:
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    fraction = madry_step_fraction(steps, step_fraction)
    return ArtAttack(
        name, norm,
        lambda classifier, eps, batch: ProjectedGradientDescentPyTorch(
            classifier, norm=ART_NORMS[norm], eps=eps, eps_step=fraction * eps, max_iter=int(steps),
            num_random_init=1 if random_start else 0, batch_size=batch, verbose=False,
        ),
    )


@ATTACKS.register("art-pgd-linf")
def art_pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """ART ProjectedGradientDescentPyTorch, Linf (Madry et al. 2018)."""
    return _art_pgd("art-pgd-linf", Norm.LINF, steps, step_fraction, random_start)


@ATTACKS.register("art-pgd-l2")
def art_pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """ART ProjectedGradientDescentPyTorch, L2 (Madry et al. 2018)."""
    return _art_pgd("art-pgd-l2", Norm.L2, steps, step_fraction, random_start)
