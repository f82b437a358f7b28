"""Adapters that put torchattacks and ART attacks behind the one attack interface.

torchattacks attacks are built per call (no global mode setters, nothing shared between calls) and run
with torch's global RNG seeded from the batch (`ExampleRandomness.library_seed`) and restored afterwards. ART attacks make one numpy
round trip per batch; ART reads numpy's global RNG, which is seeded and restored the same way.

Minimal-perturbation attacks (Carlini-Wagner L2, DeepFool, HopSkipJump) search for the closest adversarial
point with no budget. The adapter projects their point onto the eps-ball (and [0, 1]), so an example counts
as broken at eps only if a point inside the ball fools the model, like every other attack of the matrix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from attacks_ext.base import Attack, isolated_global_rng
from attacks_ext.pgd import madry_step_fraction, project
from harness.registry import ATTACKS
from harness.threat import Norm


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


class TorchattacksAttack(Attack):
    """A torchattacks attack; `build(model, eps, seed)` (with `classes=` where `needs_classes`) returns a fresh
    torchattacks object per call. `minimal`: the attack has no budget; its point is projected onto the ball."""

    library = "torchattacks"

    def __init__(self, name: str, norm: Norm, build: Callable[..., object], *, family: str = "iterative",
                 needs_classes: bool = False, minimal: bool = False):
        super().__init__(name, norm, uses_true_label=True, family=family)
        self._build = build
        self.needs_classes = needs_classes
        self.minimal = minimal

    def run(self, model, x, y, *, eps, rng):
        seed = rng.library_seed()
        if eps == 0:  # torchattacks PGDL2 divides by the zero norm of its random start and returns NaN
            return x.clone()
        extra = {"classes": _num_classes(model, x)} if self.needs_classes else {}
        attack = self._build(model, eps, seed, **extra)
        with isolated_global_rng(seed, x.device):
            x_adv = attack(x, y)
        return project(x_adv, x, eps, self.norm) if self.minimal else x_adv


class _Float32Inputs(nn.Module):
    """Casts ART's inputs to float32: some ART attacks (HopSkipJump) build float64 samples, which a float32
    model rejects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float())


class ArtAttack(Attack):
    """An ART evasion attack on a PyTorchClassifier built around the model for this call."""

    library = "ART"

    def __init__(self, name: str, norm: Norm, build: Callable[[object, float, int], object], *,
                 family: str = "iterative", minimal: bool = False):
        super().__init__(name, norm, uses_true_label=True, family=family)
        self._build = build
        self.minimal = minimal

    def run(self, model, x, y, *, eps, rng):
        if eps == 0:  # ART rejects a zero step size; a zero budget admits only x itself
            return x.clone()
        x_adv = self._generate(model, x, y, eps=eps, seed=rng.library_seed())
        return project(x_adv, x, eps, self.norm) if self.minimal else x_adv

    def _generate(self, model, x, y, *, eps, seed, **generate_options) -> torch.Tensor:
        from art.estimators.classification import PyTorchClassifier

        classifier = PyTorchClassifier(
            model=_Float32Inputs(model), loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
            nb_classes=_num_classes(model, x), clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
        )
        attack = self._build(classifier, eps, len(x))
        with isolated_global_rng(seed, x.device):
            x_adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy(), **generate_options)
        return torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(x.device)


class ArtHopSkipJump(ArtAttack):
    """ART HopSkipJump with its starting points drawn from each example's own stream.

    ART draws the uniform-noise image it starts from with an unseeded numpy RandomState, so the same seed would
    not give the same result; we give it the first of up to `start_tries` uniform images from the example's
    stream that the model labels differently from x (ART's own rule). An example with no such image is
    returned unchanged."""

    CHUNK = 10  # noise images per example per forward pass

    def __init__(self, name: str, norm: Norm, build, *, start_tries: int):
        super().__init__(name, norm, build, family="gradient-free", minimal=True)
        self.start_tries = start_tries

    def starts(self, model, x: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """(starting points, whether each example has one)."""
        with torch.no_grad():
            predicted = model(x).argmax(1)
        start, found = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        streams, todo = rng, torch.arange(len(x), device=x.device)
        for _ in range(-(-self.start_tries // self.CHUNK)):
            noise = streams.rand(self.CHUNK, *x.shape[1:]).to(x.device)  # (todo, CHUNK, C, H, W)
            with torch.no_grad():
                labels = model(noise.flatten(0, 1)).argmax(1).view(len(todo), self.CHUNK)
            differs = labels != predicted[todo, None]
            hit = differs.any(1)
            start[todo[hit]] = noise[hit, differs[hit].float().argmax(1)]
            found[todo[hit]] = True
            keep = torch.nonzero(~hit).squeeze(1)
            if len(keep) == 0:
                break
            todo, streams = todo[keep], streams.subset(keep.cpu())
        return start, found

    def run(self, model, x, y, *, eps, rng):
        if eps == 0:
            return x.clone()
        start, found = self.starts(model, x, rng)
        x_adv = x.clone()
        rows = torch.nonzero(found).squeeze(1)
        if len(rows):
            x_adv[rows] = self._generate(model, x[rows], y[rows], eps=eps, seed=rng.library_seed(),
                                         x_adv_init=start[rows].cpu().numpy())
        return project(x_adv, x, eps, self.norm)


ART_NORMS = {Norm.LINF: np.inf, Norm.L2: 2}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --- torchattacks -----------------------------------------------------------------------------------

@ATTACKS.register("ta-fgsm", norm="linf", family="one-step", library="torchattacks")
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


@ATTACKS.register("ta-pgd-linf", norm="linf", family="iterative", library="torchattacks")
def torchattacks_pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """torchattacks PGD, Linf (Madry et al. 2018)."""
    return _torchattacks_pgd("ta-pgd-linf", Norm.LINF, steps, step_fraction, random_start)


@ATTACKS.register("ta-pgd-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """torchattacks PGDL2, L2 (Madry et al. 2018)."""
    return _torchattacks_pgd("ta-pgd-l2", Norm.L2, steps, step_fraction, random_start)


@ATTACKS.register("ta-cw-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_cw_l2(*, steps: int = 100, c: float = 1.0, kappa: float = 0.0, lr: float = 0.01) -> Attack:
    """torchattacks CW, L2 (Carlini & Wagner 2017): minimal perturbation, projected onto the eps-ball."""
    import torchattacks

    steps = _positive_int(steps, "steps")
    if not c > 0 or not lr > 0 or not kappa >= 0:
        raise ValueError(f"c and lr must be > 0 and kappa >= 0, got c={c!r}, lr={lr!r}, kappa={kappa!r}")
    return TorchattacksAttack("ta-cw-l2", Norm.L2,
                              lambda model, eps, seed: torchattacks.CW(model, c=c, kappa=kappa, steps=steps, lr=lr),
                              minimal=True)


@ATTACKS.register("ta-deepfool", norm="l2", family="iterative", library="torchattacks")
def torchattacks_deepfool(*, steps: int = 50, overshoot: float = 0.02) -> Attack:
    """torchattacks DeepFool, L2 (Moosavi-Dezfooli et al. 2016): minimal perturbation, projected onto the eps-ball."""
    import torchattacks

    steps = _positive_int(steps, "steps")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot!r}")
    return TorchattacksAttack("ta-deepfool", Norm.L2,
                              lambda model, eps, seed: torchattacks.DeepFool(model, steps=steps, overshoot=overshoot),
                              minimal=True)


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


@ATTACKS.register("art-fgm-linf", norm="linf", family="one-step", library="ART")
def art_fgm_linf() -> Attack:
    """ART FastGradientMethod, Linf (= FGSM, Goodfellow et al. 2015)."""
    return _art_fgm("art-fgm-linf", Norm.LINF)


@ATTACKS.register("art-fgm-l2", norm="l2", family="one-step", library="ART")
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


@ATTACKS.register("art-pgd-linf", norm="linf", family="iterative", library="ART")
def art_pgd_linf(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """ART ProjectedGradientDescentPyTorch, Linf (Madry et al. 2018)."""
    return _art_pgd("art-pgd-linf", Norm.LINF, steps, step_fraction, random_start)


@ATTACKS.register("art-pgd-l2", norm="l2", family="iterative", library="ART")
def art_pgd_l2(*, steps: int = 40, step_fraction: float | None = None, random_start: bool = True) -> Attack:
    """ART ProjectedGradientDescentPyTorch, L2 (Madry et al. 2018)."""
    return _art_pgd("art-pgd-l2", Norm.L2, steps, step_fraction, random_start)


@ATTACKS.register("art-cw-l2", norm="l2", family="iterative", library="ART")
def art_cw_l2(*, steps: int = 10, binary_search_steps: int = 10, confidence: float = 0.0,
              learning_rate: float = 0.01, initial_const: float = 0.01) -> Attack:
    """ART CarliniL2Method (Carlini & Wagner 2017): minimal perturbation, projected onto the eps-ball."""
    from art.attacks.evasion import CarliniL2Method

    steps, searches = _positive_int(steps, "steps"), _positive_int(binary_search_steps, "binary_search_steps")
    if not confidence >= 0 or not learning_rate > 0 or not initial_const > 0:
        raise ValueError("confidence must be >= 0, learning_rate and initial_const > 0")
    return ArtAttack(
        "art-cw-l2", Norm.L2,
        lambda classifier, eps, batch: CarliniL2Method(
            classifier, confidence=confidence, learning_rate=learning_rate, binary_search_steps=searches,
            max_iter=steps, initial_const=initial_const, batch_size=batch, verbose=False),
        minimal=True,
    )


def _art_hopskipjump(name: str, norm: Norm, steps: int, queries: int, init_queries: int, start_tries: int) -> Attack:
    from art.attacks.evasion import HopSkipJump

    steps, queries = _positive_int(steps, "steps"), _positive_int(queries, "queries")
    init_queries, start_tries = _positive_int(init_queries, "init_queries"), _positive_int(start_tries, "start_tries")
    return ArtHopSkipJump(
        name, norm,
        lambda classifier, eps, batch: HopSkipJump(
            classifier, batch_size=batch, targeted=False, norm=ART_NORMS[norm], max_iter=steps, max_eval=queries,
            init_eval=min(init_queries, queries), verbose=False),
        start_tries=start_tries,
    )


@ATTACKS.register("art-hopskipjump", norm="l2", family="gradient-free", library="ART")
def art_hopskipjump(*, steps: int = 50, queries: int = 10000, init_queries: int = 100, start_tries: int = 100) -> Attack:
    """ART HopSkipJump, L2 (Chen et al. 2020): decision-based, reads labels only; projected onto the eps-ball."""
    return _art_hopskipjump("art-hopskipjump", Norm.L2, steps, queries, init_queries, start_tries)


@ATTACKS.register("art-hopskipjump-linf", norm="linf", family="gradient-free", library="ART")
def art_hopskipjump_linf(*, steps: int = 50, queries: int = 10000, init_queries: int = 100,
                         start_tries: int = 100) -> Attack:
    """ART HopSkipJump, Linf (Chen et al. 2020): decision-based, reads labels only; projected onto the eps-ball."""
    return _art_hopskipjump("art-hopskipjump-linf", Norm.LINF, steps, queries, init_queries, start_tries)
