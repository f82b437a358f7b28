"""AutoAttack standard itself behind the one attack interface (Croce & Hein 2020), three ways: the original
implementation (`aa-standard`, `aa-standard-l2`: the authors' code, packaged as `pyautoattack`; an optional
dependency), torchattacks' parts composed at the original budgets (`autoattack-standard`, `-l2`), and
torchattacks' shipped `AutoAttack(version='standard')`, whose APGD-T and FAB-T run 10 steps instead of 100
(`ta-autoattack`, `-l2`). The parts one by one are in `autoattack.py`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from attacks_ext.adapters import TorchattacksAttack, _num_classes, _positive_int
from attacks_ext.autoattack import LIBRARY_NORMS, _targets
from attacks_ext.base import Attack, isolated_global_rng
from harness.registry import ATTACKS
from harness.threat import Norm


def _autoattack_standard(name: str, norm: Norm, steps: int, queries: int) -> Attack:
    import torchattacks

    steps, queries = _positive_int(steps, "steps"), _positive_int(queries, "queries")
    library_norm = LIBRARY_NORMS[norm]

    def build(model, eps, seed, *, classes):
        # AutoAttack's standard set (Croce & Hein 2020) at its published budgets; MultiAttack runs each attack
        # only on the points every earlier one left correctly classified.
        return torchattacks.MultiAttack([
            torchattacks.APGD(model, norm=library_norm, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed),
            torchattacks.APGDT(model, norm=library_norm, eps=eps, steps=steps, n_restarts=1, n_classes=classes, seed=seed),
            torchattacks.FAB(model, norm=library_norm, eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                             n_classes=classes, seed=seed),
            torchattacks.Square(model, norm=library_norm, eps=eps, n_queries=queries, n_restarts=1, seed=seed),
        ])

    return TorchattacksAttack(name, norm, build, needs_classes=True)


@ATTACKS.register("autoattack-standard", norm="linf", family="iterative", library="torchattacks")
def autoattack_standard(*, steps: int = 100, queries: int = 5000) -> Attack:
    """AutoAttack standard from torchattacks' parts, Linf, original budgets: APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100, Square 5,000."""
    return _autoattack_standard("autoattack-standard", Norm.LINF, steps, queries)


@ATTACKS.register("autoattack-standard-l2", norm="l2", family="iterative", library="torchattacks")
def autoattack_standard_l2(*, steps: int = 100, queries: int = 5000) -> Attack:
    """AutoAttack standard from torchattacks' parts, L2, original budgets: APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100, Square 5,000."""
    return _autoattack_standard("autoattack-standard-l2", Norm.L2, steps, queries)


def _torchattacks_autoattack(name: str, norm: Norm, queries: int) -> Attack:
    import torchattacks

    queries = _positive_int(queries, "queries")

    def build(model, eps, seed, *, classes):
        attack = torchattacks.AutoAttack(model, norm=LIBRARY_NORMS[norm], eps=eps, version="standard",
                                         n_classes=classes, seed=seed)
        square = attack._autoattack.attacks[-1]  # the shipped set ends with Square at a fixed 5,000 queries
        if type(square).__name__ != "Square":
            raise RuntimeError("torchattacks' AutoAttack no longer ends with Square; update this adapter")
        square.n_queries = queries
        return attack

    return TorchattacksAttack(name, norm, build, needs_classes=True)


@ATTACKS.register("ta-autoattack", norm="linf", family="iterative", library="torchattacks")
def torchattacks_autoattack(*, queries: int = 5000) -> Attack:
    """torchattacks AutoAttack(version='standard') as shipped, Linf: APGD, APGD-T, FAB-T at 10 steps (not 100), Square 5,000."""
    return _torchattacks_autoattack("ta-autoattack", Norm.LINF, queries)


@ATTACKS.register("ta-autoattack-l2", norm="l2", family="iterative", library="torchattacks")
def torchattacks_autoattack_l2(*, queries: int = 5000) -> Attack:
    """torchattacks AutoAttack(version='standard') as shipped, L2: APGD, APGD-T, FAB-T at 10 steps (not 100), Square 5,000."""
    return _torchattacks_autoattack("ta-autoattack-l2", Norm.L2, queries)


def original_autoattack_installed() -> bool:
    return importlib.util.find_spec("pyautoattack") is not None


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The original code logs its own warnings (zero gradients, Square's share) at WARNING; the harness's checks
    report those findings, so a call prints nothing."""
    logger = logging.getLogger(logger_name)
    level, logger.level = logger.level, logging.ERROR
    try:
        yield
    finally:
        logger.level = level


class OriginalAutoAttack(Attack):
    """AutoAttack standard as its authors wrote it (`pyautoattack`): APGD-CE, APGD-T (9 x 100), FAB-T (9 x 100),
    Square (5,000 queries), each on the points still robust, seeded from the batch. `steps`, `targets` and
    `queries` change the budgets (for tests); the defaults are the original ones."""

    library = "autoattack"

    def __init__(self, name: str, norm: Norm, *, steps: int, targets: int, queries: int):
        if not original_autoattack_installed():
            raise ValueError(f"{name} needs AutoAttack's original code: pip install pyautoattack==0.2.0 "
                             "(or use autoattack-standard, the same set built from torchattacks)")
        super().__init__(name, norm, uses_true_label=True)
        self.steps, self.targets = _positive_int(steps, "steps"), _positive_int(targets, "targets")
        self.queries = _positive_int(queries, "queries")

    def run(self, model, x, y, *, eps, rng):
        from pyautoattack import AutoAttack

        if eps == 0 or len(x) == 0:
            return x.clone()
        seed = rng.library_seed()
        attack = AutoAttack(model, norm=LIBRARY_NORMS[self.norm], eps=float(eps), version="standard", seed=seed,
                            device=x.device)
        attack.verbose = False
        targets = _targets(self.targets, _num_classes(model, x))
        attack.apgd.n_iter = attack.apgd_targeted.n_iter = attack.fab.n_iter = self.steps
        attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = targets
        attack.square.n_queries = self.queries
        with isolated_global_rng(seed, x.device), _quiet(attack.logger.name), torch.no_grad():
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv


@ATTACKS.register("aa-standard", norm="linf", family="iterative", library="autoattack")
def original_autoattack_standard(*, steps: int = 100, targets: int = 9, queries: int = 5000) -> Attack:
    """AutoAttack standard, Linf, the authors' original code (pyautoattack 0.2.0): APGD-CE, APGD-T, FAB-T, Square."""
    return OriginalAutoAttack("aa-standard", Norm.LINF, steps=steps, targets=targets, queries=queries)


@ATTACKS.register("aa-standard-l2", norm="l2", family="iterative", library="autoattack")
def original_autoattack_standard_l2(*, steps: int = 100, targets: int = 9, queries: int = 5000) -> Attack:
    """AutoAttack standard, L2, the authors' original code (pyautoattack 0.2.0): APGD-CE, APGD-T, FAB-T, Square."""
    return OriginalAutoAttack("aa-standard-l2", Norm.L2, steps=steps, targets=targets, queries=queries)
