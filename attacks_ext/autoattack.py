"""AutoAttack's parts behind the one attack interface (Croce & Hein 2020), from torchattacks: APGD on
cross-entropy and on the DLR loss, targeted APGD on the DLR loss (APGD-T), targeted FAB (FAB-T) and Square, each
for Linf and L2. Targeted attacks go through the `targets` highest-scoring wrong classes of the clean input in
turn, each on the examples still robust. AutoAttack itself, composed, is in `autoattack_standard.py`.
"""
from __future__ import annotations

import functools

import torch

from attacks_ext.adapters import TorchattacksAttack, _positive_int
from attacks_ext.base import Attack
from harness.registry import ATTACKS
from harness.threat import Norm

LIBRARY_NORMS = {Norm.LINF: "Linf", Norm.L2: "L2"}


def _apgd(name: str, norm: Norm, steps: int, restarts: int, loss: str = "ce") -> Attack:
    import torchattacks

    steps, restarts = _positive_int(steps, "steps"), _positive_int(restarts, "restarts")
    return TorchattacksAttack(
        name, norm,
        lambda model, eps, seed: torchattacks.APGD(model, norm=LIBRARY_NORMS[norm], eps=eps, steps=steps,
                                                   n_restarts=restarts, seed=seed, loss=loss),
    )


@ATTACKS.register("ta-apgd-ce", norm="linf", family="iterative", library="torchattacks")
def torchattacks_apgd_ce(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on cross-entropy, Linf (Croce & Hein 2020); 100 steps is AutoAttack's budget."""
    return _apgd("ta-apgd-ce", Norm.LINF, steps, restarts)


@ATTACKS.register("ta-apgd-ce-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_apgd_ce_l2(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on cross-entropy, L2 (Croce & Hein 2020)."""
    return _apgd("ta-apgd-ce-l2", Norm.L2, steps, restarts)


@ATTACKS.register("ta-apgd-dlr", norm="linf", family="iterative", library="torchattacks")
def torchattacks_apgd_dlr(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on the DLR loss, Linf (Croce & Hein 2020): scale-invariant, finds what cross-entropy misses."""
    return _apgd("ta-apgd-dlr", Norm.LINF, steps, restarts, loss="dlr")


@ATTACKS.register("ta-apgd-dlr-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_apgd_dlr_l2(*, steps: int = 100, restarts: int = 1) -> Attack:
    """torchattacks APGD on the DLR loss, L2 (Croce & Hein 2020)."""
    return _apgd("ta-apgd-dlr-l2", Norm.L2, steps, restarts, loss="dlr")


def _targets(targets, classes: int, first_target: int = 1) -> int:
    """At most classes - 1 target classes exist; torchattacks would index past the logits otherwise."""
    if first_target > classes - 1:
        raise ValueError(f"first_target {first_target} leaves no class to target: the model has {classes} classes, "
                         f"so first_target is at most {classes - 1}")
    return min(targets, classes - first_target)


def _targeted(name: str, norm: Norm, steps: int, targets: int, make, first_target: int = 1) -> Attack:
    """A torchattacks attack that goes through `targets` wrong classes in turn, from the `first_target`-th highest
    (1: the highest); `make(model, eps, steps, seed, classes)` builds it for one call."""
    steps, targets = _positive_int(steps, "steps"), _positive_int(targets, "targets")
    first_target = _positive_int(first_target, "first_target")

    def build(model, eps, seed, *, classes):
        attack = make(model, eps, steps, seed, classes)
        attack.n_target_classes = _targets(targets, classes, first_target)  # the constructors fix it at classes - 1
        return attack

    return TorchattacksAttack(name, norm, build, needs_classes=True)


@functools.cache
def _apgd_targeted_class():
    """torchattacks' APGD-T starting at any target rank, with an optional probe. The library always starts at the
    highest wrong class, so a column that goes on to the targets an earlier column did not try (on a label-smoothed
    model the clean ranking of the wrong classes says little) needs the offset.

    The probe (`probe_steps` > 0) spends the full budget only where it can pay, as Adaptive Auto Attack's discarding
    does (Liu et al., CVPR 2022): every target first runs `probe_steps` steps on every example; the full run of a
    target then goes only to the examples still robust whose probe brought that target within `probe_margin` of the
    label, in the targeted DLR loss (-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): 0 is the boundary, and a robust
    example's loss towards its runner-up lies in [-1, 0))."""
    import torchattacks

    class APGDTFrom(torchattacks.APGDT):
        first_target = 1
        probe_steps = 0
        probe_margin = 0.0

        def attack_single_run(self, x, y):
            # The library's loop sets target_class = 2, 3, ...: the target's rank among all classes (1 = the label).
            offset = self.first_target - 1
            self.target_class += offset
            try:
                return super().attack_single_run(x, y)
            finally:
                self.target_class -= offset

        def perturb(self, x_in, y_in, best_loss=False, cheap=True):
            if not self.probe_steps:
                return super().perturb(x_in, y_in, best_loss, cheap)
            x, y = x_in.clone(), y_in.clone()
            adv = x.clone()
            robust = self.get_logits(x).max(1)[1] == y
            torch.random.manual_seed(self.seed)
            targets = range(2, self.n_target_classes + 2)
            probe_loss = torch.full((len(targets), len(x)), -float("inf"), device=x.device)
            for row, target in enumerate(targets):  # the probe: every target, a few steps, every robust example
                todo, loss = self._run(target, self.probe_steps, robust, x, y, robust, adv)
                probe_loss[row, todo] = loss.detach().reshape(-1).to(probe_loss.dtype)
            for row, target in enumerate(targets):  # the full runs, where the probe came within the margin
                for _ in range(self.n_restarts):
                    self._run(target, self.steps, robust & (probe_loss[row] >= -self.probe_margin), x, y, robust, adv)
            return robust, adv

        def _run(self, target, steps, attacked, x, y, robust, adv):
            """One single run towards `target` for `steps` steps on the `attacked` examples; what it fools leaves
            `robust` and takes its point in `adv`. Returns the attacked indices and their best loss."""
            todo = attacked.nonzero().flatten()
            if len(todo) == 0:
                return todo, torch.empty(0, device=x.device)
            self.target_class, full_steps, self.steps = target, self.steps, steps
            try:
                _, correct, loss, x_adv = self.attack_single_run(x[todo], y[todo])
            finally:
                self.steps = full_steps
            fooled = correct == 0
            robust[todo[fooled]] = False
            adv[todo[fooled]] = x_adv[fooled].clone()
            return todo, loss

    return APGDTFrom


def _probe_budget(probe, name: str, full: int, full_name: str) -> None:
    """A probe's budget: 0 (no probe) or a positive integer below the full run's."""
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 0:
        raise ValueError(f"{name} must be 0 (no probe) or a positive integer, got {probe!r}")
    if probe >= full:
        raise ValueError(f"{name} ({probe}) must be below {full_name} ({full}): the probe is the short run")


def _apgd_targeted(name: str, norm: Norm, steps: int, targets: int, first_target: int, probe_steps: int = 0,
                   probe_margin: float = 0.3, restarts: int = 1) -> Attack:
    steps, restarts = _positive_int(steps, "steps"), _positive_int(restarts, "restarts")
    _probe_budget(probe_steps, "probe_steps", steps, "steps")
    if isinstance(probe_margin, bool) or not isinstance(probe_margin, (int, float)) or not 0 <= probe_margin <= 1:
        raise ValueError(f"probe_margin must be in [0, 1] (the targeted DLR loss's distance below the boundary), "
                         f"got {probe_margin!r}")

    def make(model, eps, steps, seed, classes):
        attack = _apgd_targeted_class()(model, norm=LIBRARY_NORMS[norm], eps=eps, steps=steps, n_restarts=restarts,
                                        n_classes=classes, seed=seed)
        attack.first_target = first_target
        attack.probe_steps, attack.probe_margin = int(probe_steps), float(probe_margin)
        return attack

    return _targeted(name, norm, steps, targets, make, first_target)


@ATTACKS.register("ta-apgd-t", norm="linf", family="iterative", library="torchattacks")
def torchattacks_apgd_targeted(*, steps: int = 100, targets: int = 9, first_target: int = 1, probe_steps: int = 0,
                               probe_margin: float = 0.3, restarts: int = 1) -> Attack:
    """torchattacks APGD-T, Linf: targeted DLR towards `targets` wrong classes in turn, from the `first_target`-th
    highest (AutoAttack: 9 x 100 from the highest); `probe_steps` > 0 gives each target's full run only to the
    examples its short probe brought within `probe_margin` of the boundary."""
    return _apgd_targeted("ta-apgd-t", Norm.LINF, steps, targets, first_target, probe_steps, probe_margin,
                          restarts)


@ATTACKS.register("ta-apgd-t-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_apgd_targeted_l2(*, steps: int = 100, targets: int = 9, first_target: int = 1, probe_steps: int = 0,
                                  probe_margin: float = 0.3, restarts: int = 1) -> Attack:
    """torchattacks APGD-T, L2: targeted DLR towards `targets` wrong classes in turn, from the `first_target`-th
    highest (AutoAttack: 9 x 100 from the highest); `probe_steps` > 0 gives each target's full run only to the
    examples its short probe brought within `probe_margin` of the boundary."""
    return _apgd_targeted("ta-apgd-t-l2", Norm.L2, steps, targets, first_target, probe_steps, probe_margin,
                          restarts)


def _fab_targeted(name: str, norm: Norm, steps: int, targets: int) -> Attack:
    import torchattacks

    return _targeted(name, norm, steps, targets, lambda model, eps, steps, seed, classes: torchattacks.FAB(
        model, norm=LIBRARY_NORMS[norm], eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=classes,
        seed=seed))


@ATTACKS.register("ta-fab-t", norm="linf", family="iterative", library="torchattacks")
def torchattacks_fab_targeted(*, steps: int = 100, targets: int = 9) -> Attack:
    """torchattacks FAB-T, Linf (Croce & Hein 2020): minimal-norm steps on the linearized boundary to each target."""
    return _fab_targeted("ta-fab-t", Norm.LINF, steps, targets)


@ATTACKS.register("ta-fab-t-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_fab_targeted_l2(*, steps: int = 100, targets: int = 9) -> Attack:
    """torchattacks FAB-T, L2 (Croce & Hein 2020): minimal-norm steps on the linearized boundary to each target."""
    return _fab_targeted("ta-fab-t-l2", Norm.L2, steps, targets)


@functools.cache
def _square_gated_class():
    """torchattacks' Square with an optional probe. Square spends its whole query budget on every example it does not
    break, which on the last survivors of a sound defense buys nothing: there the gradient columns already found what
    a random search finds. The probe (`probe_queries` > 0) runs Square's schedule at that short budget on the batch
    first; only when it breaks at least one example (a sign that the gradients fail on this model: masking, or too
    weak an attack) does the full budget run, on the examples the probe left."""
    import torchattacks

    class SquareGated(torchattacks.Square):
        probe_queries = 0

        def perturb(self, x, y=None):
            if not self.probe_queries:
                return super().perturb(x, y)
            full, self.n_queries = self.n_queries, self.probe_queries
            try:
                adv = super().perturb(x, y)
            finally:
                self.n_queries = full
            robust = self.get_logits(x).max(1)[1] == y
            left = robust & (self.get_logits(adv).max(1)[1] == y)
            if bool((robust & ~left).any()):
                rest = left.nonzero().flatten()
                if len(rest):
                    adv[rest] = super().perturb(x[rest], y[rest])
            return adv

    return SquareGated


def _square(name: str, norm: Norm, queries: int, p_init: float, probe_queries: int = 0) -> Attack:
    queries = _positive_int(queries, "queries")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    _probe_budget(probe_queries, "probe_queries", queries, "queries")

    def build(model, eps, seed):
        attack = _square_gated_class()(model, norm=LIBRARY_NORMS[norm], eps=eps, n_queries=queries, n_restarts=1,
                                       p_init=p_init, loss="margin", seed=seed)
        attack.probe_queries = probe_queries
        return attack

    return TorchattacksAttack(name, norm, build, family="gradient-free")


@ATTACKS.register("ta-square", norm="linf", family="gradient-free", library="torchattacks")
def torchattacks_square(*, queries: int = 1000, p_init: float = 0.8, probe_queries: int = 0) -> Attack:
    """torchattacks Square, Linf (Andriushchenko et al. 2020): random search on the margin, no gradients;
    `probe_queries` > 0 spends the full budget on a batch only when that short probe broke an example of it."""
    return _square("ta-square", Norm.LINF, queries, p_init, probe_queries)


@ATTACKS.register("ta-square-l2", norm="l2", family="gradient-free", library="torchattacks")
def torchattacks_square_l2(*, queries: int = 1000, p_init: float = 0.8, probe_queries: int = 0) -> Attack:
    """torchattacks Square, L2 (Andriushchenko et al. 2020): random search on the margin, no gradients;
    `probe_queries` > 0 spends the full budget on a batch only when that short probe broke an example of it."""
    return _square("ta-square-l2", Norm.L2, queries, p_init, probe_queries)
