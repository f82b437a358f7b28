"""The `unbounded-eps` check (`UnboundedEps`)."""
from __future__ import annotations

from attacks_ext.checks.per_norm import PGD, _per_norm
from attacks_ext.checks.per_norm import RISE_REASON, _BudgetCurve, _rises
from harness.check_types import AttackRequest, Status, _above, _count, _grade, _missing, _thresholds
from harness.registry import CHECKS
from harness.threat import Norm, check_eps


@CHECKS.register("unbounded-eps")
class UnboundedEps(_BudgetCurve):
    """Unbounded eps (Carlini et al. 2019; Shafahi et al. Table 9): as eps grows towards the whole input range
    with more steps, accuracy must fall to about 0, and never rise; if it does not, gradients are masked or the
    attack is broken. L∞ 1 admits any image; at L2 the defaults reach 28, the diameter of a 28 x 28 image."""

    id, title = "unbounded-eps", "Unbounded eps"
    attacks = PGD
    DEFAULT_EPS = {Norm.LINF: (0.5, 1.0), Norm.L2: (7.0, 28.0)}

    def __init__(self, *, eps: dict | list | tuple | None = None, steps: int = 100, examples: int = 100,
                 attack: str | None = None, norms: list | tuple | None = None, warn_above: float = 1.0,
                 fail_above: float = 5.0):
        self.steps, self.examples = _count(steps, "steps"), _count(examples, "examples")
        self._setup(norms, attack)
        self.eps = dict(self.DEFAULT_EPS)  # a plain list is the L-inf list (or that of the one norm asked for)
        self.eps.update(_per_norm(eps, "eps", self._eps_values, self.norms) or {})
        self.warn, self.fail = _thresholds(warn_above, fail_above, "% accuracy")

    @staticmethod
    def _eps_values(values, norm: Norm) -> tuple[float, ...]:
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"eps at {norm.value} must be a non-empty list, got {values!r}")
        return tuple(sorted(float(check_eps(e, norm)) for e in values))

    def _requests_at(self, context, norm):
        return tuple(AttackRequest(self.name(norm, f"eps={e:g}"), self.attacks[norm], (("steps", self.steps),), e,
                                   self.examples) for e in self.eps[norm])

    def _vectors(self, evidence, norm):
        records = self._records_at(evidence, norm)
        return None if any(r is None for r in records) else [(e, r.robust_correct) for e, r in zip(self.eps[norm], records)]

    def _evaluate_at(self, evidence, norm):
        curve = self._curve(evidence, norm)
        if curve is None:
            return _missing(self.id, "unbounded-eps cells")
        (eps, top), (rise, where) = curve[-1], _rises(self._vectors(evidence, norm))
        status = max(_grade(top, self.warn, self.fail), _grade(rise, self.warn, self.fail))
        figure = f"{top:.1f}% at eps {eps:g} ({self.attacks[norm]}, {self.steps} steps)"
        if _above(rise, self.warn):
            reason = f"accuracy rises by {rise:.1f} points ({where}): " + RISE_REASON
        elif status is Status.PASS:
            reason = "accuracy falls to ~0 once the budget allows any image: the attack works"
        else:
            reason = (f"{top:.1f}% of images survive an eps that admits any image: the attack cannot follow the "
                      "gradient (gradient masking) or is broken; robust accuracies of this row are not trustworthy")
        return self._verdict(status, figure, reason, **{f"{e:g}": a for e, a in curve})

    def plot(self, evidences, path):
        def draw(evidence, norm):
            curve = self._curve(evidence, norm)
            if curve is None or evidence.clean is None:
                return None
            return [(0.0, 100 * float(evidence.clean.clean_correct[: self.examples].mean()))] + curve

        return self._panels(evidences, path, draw, xlabel=lambda norm: f"eps ({norm.symbol})",
                            ylabel=f"accuracy under PGD-{self.steps} (%)",
                            title=lambda context, norm: f"unbounded eps at {norm.symbol}: accuracy must reach ~0")
