"""The `gradient-free` check (`GradientFreeVsWhiteBox`)."""
from __future__ import annotations

from attacks_ext.checks.per_norm import SQUARE
from attacks_ext.checks.per_norm import _BeatsWhiteBox
from harness.check_types import _count
from harness.registry import ATTACKS, CHECKS


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
        if attack is not None and ATTACKS.info(attack)["family"].value != "gradient-free":
            raise ValueError(f"attack {attack!r} is {ATTACKS.info(attack)['family'].value}, not gradient-free, which this "
                             "check needs")
        self._compare_setup(eps, norms, attack, warn_share, fail_share)

    def _label(self, norm):
        return self.attacks[norm]

    def _requests_at(self, context, norm):
        return self._request(context, norm, (("queries", self.queries),))
