"""Checks that attack what every white-box column of the matrix left standing at a (norm, eps) with an attack
that does not follow the target's own gradients, per norm: a gradient-free attack (Square) and a transfer attack
(PGD crafted on another defense). Examples that only they break mean the white-box gradients are masked."""
from __future__ import annotations

import numpy as np

from attacks_ext.attack_checks import PGD, SQUARE, PerNormCheck, _per_norm, rank_eps
from attacks_ext.base import check_eps
from attacks_ext.checks import AttackRequest, Status, _count, _grade, _missing, _thresholds
from harness.registry import ATTACKS, CHECKS
from harness.threat import Norm


class _BeatsWhiteBox(PerNormCheck):
    """Shared by the gradient-free and transfer checks: an attack that runs on the examples every white-box
    column of the matrix left standing at the same (norm, eps) must not break many of them."""

    kind = ""  # how the weaker attack is described in figures and reasons

    def _compare_setup(self, eps, norms, attack, warn_share, fail_share):
        self._setup(norms, attack)
        self.eps_option = _per_norm(eps, "eps", lambda v, norm: float(check_eps(v, norm)), self.norms) or {}
        self.warn, self.fail = _thresholds(warn_share, fail_share, "% of examples")

    def eps_at(self, context, norm: Norm) -> float:
        return self.eps_option.get(norm, rank_eps(context, norm))

    def norms_for(self, context):
        """Only norms where the matrix has white-box columns at the check's eps: elsewhere there is no comparison."""
        return tuple(norm for norm in super().norms_for(context)
                     if any(c.norm is norm and self.eps_at(context, norm) in c.eps and c.family in ("one-step", "iterative")
                            for c in context.columns))

    def _request(self, context, norm, options, **extra) -> tuple[AttackRequest, ...]:
        return (AttackRequest(self.name(norm, self.kind), self.attacks[norm], options, self.eps_at(context, norm),
                              self.examples, survivors_of="white-box", **extra),)

    def _evaluate_at(self, evidence, norm):
        eps = self.eps_at(evidence.context, norm)
        record, white = evidence.requested.get(self.name(norm, self.kind)), evidence.white_box(norm, eps)
        if record is None or not white:
            return _missing(self.id, f"{self.kind} cell or white-box columns")
        n = len(record.robust_correct)
        survived_white = np.logical_and.reduce([r.robust_correct[:n] for _, r in white])
        only_weaker = 100 * float((survived_white & ~record.robust_correct).mean())
        status = _grade(only_weaker, self.warn, self.fail)
        label = self._label(norm)
        figure = (f"white-box {100 * survived_white.mean():.1f}%, then {label} {record.robust_accuracy:.1f}% at "
                  f"eps {eps:g}; {only_weaker:.1f}% of examples broken only by {label}")
        reason = (f"the {self.kind} attack finds nothing the white-box attacks missed" if only_weaker == 0 else
                  f"{only_weaker:.1f}% of examples fall only to the {self.kind} attack"
                  + (" (within tolerance)" if status is Status.PASS else
                     ": white-box gradients are masked or the white-box attacks are too weak"))
        return self._verdict(status, figure, reason, **{"White-box": 100 * float(survived_white.mean()),
                                                        f"Only {self.kind}": only_weaker})


@CHECKS.register("gradient-free")
class GradientFreeVsWhiteBox(_BeatsWhiteBox):
    """A gradient-free attack (Square) on the examples every white-box column left standing (Carlini et al. 2019):
    examples that only the gradient-free attack breaks mean the white-box gradients are masked."""

    id, title, kind = "gradient-free", "Gradient-free vs white-box", "gradient-free"
    attacks = SQUARE

    def __init__(self, *, attack: str | None = None, queries: int = 1000, eps: dict | None = None,
                 examples: int = 100, norms: list | tuple | None = None, warn_share: float = 2.0,
                 fail_share: float = 10.0):
        self.queries, self.examples = _count(queries, "queries"), _count(examples, "examples")
        if attack is not None and ATTACKS.get(attack)().family != "gradient-free":
            raise ValueError(f"attack {attack!r} is {ATTACKS.get(attack)().family}, not gradient-free, which this check needs")
        self._compare_setup(eps, norms, attack, warn_share, fail_share)

    def _label(self, norm):
        return self.attacks[norm]

    def _requests_at(self, context, norm):
        return self._request(context, norm, (("queries", self.queries),))


@CHECKS.register("transfer")
class TransferVsWhiteBox(_BeatsWhiteBox):
    """A transfer attack (Shafahi et al.'s black-box setting: PGD crafted on a separate source model) on the
    examples every white-box column left standing: examples that only the transferred examples break mean the
    target's own gradients are masked."""

    id, title, kind = "transfer", "Transfer vs white-box", "transfer"
    attacks = PGD

    def __init__(self, *, source: str = "natural", attack: str | None = None, steps: int = 7, eps: dict | None = None,
                 examples: int = 100, norms: list | tuple | None = None, warn_share: float = 2.0,
                 fail_share: float = 10.0):
        if not isinstance(source, str) or not source:
            raise ValueError(f"source must name a defense of the benchmark, got {source!r}")
        self.source, self.steps, self.examples = source, _count(steps, "steps"), _count(examples, "examples")
        if attack is not None and ATTACKS.get(attack)(steps=self.steps).family not in ("one-step", "iterative"):
            raise ValueError(f"attack {attack!r} is {ATTACKS.get(attack)().family}; a transfer attack needs the source's gradients")
        self._compare_setup(eps, norms, attack, warn_share, fail_share)

    def _label(self, norm):
        return f"{self.attacks[norm]}-{self.steps} from {self.source}"

    def _requests_at(self, context, norm):
        if context.defenses and self.source not in context.defenses:
            raise ValueError(f"source {self.source!r} is not a defense of this benchmark; defenses: {', '.join(context.defenses)}")
        return self._request(context, norm, (("steps", self.steps),), source=self.source)
