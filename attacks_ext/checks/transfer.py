"""The `transfer` check (`TransferVsWhiteBox`)."""
from __future__ import annotations

from attacks_ext.checks.per_norm import PGD
from attacks_ext.checks.per_norm import _BeatsWhiteBox
from harness.check_types import _count
from harness.registry import ATTACKS, CHECKS


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
        if attack is not None and ATTACKS.info(attack)["family"].value not in ("one-step", "iterative"):
            raise ValueError(f"attack {attack!r} is {ATTACKS.info(attack)['family'].value}; a transfer attack needs the "
                             "source's gradients")
        self._compare_setup(eps, norms, attack, warn_share, fail_share)

    def _label(self, norm):
        return f"{self.attacks[norm]}-{self.steps} from {self.source}"

    def _requests_at(self, context, norm):
        if context.defenses and self.source not in context.defenses:
            raise ValueError(f"source {self.source!r} is not a defense of this benchmark; defenses: {', '.join(context.defenses)}")
        return self._request(context, norm, (("steps", self.steps),), source=self.source)
