"""The `monotone-eps` check (`MonotoneInEps`)."""
from __future__ import annotations

import math

from harness.check_types import Check, Status, Verdict, _grade, _missing, _thresholds
from harness.registry import CHECKS


@CHECKS.register("monotone-eps")
class MonotoneInEps(Check):
    """Accuracy must not rise with eps (Carlini et al. 2019): a larger ball contains the smaller one, so a rise
    means the attack fails to find what it found before (e.g. label leaking one-step attacks)."""

    id, title = "monotone-eps", "Monotone in eps"

    def __init__(self, *, warn_rise: float = 1.0, fail_rise: float = 5.0):
        self.warn, self.fail = _thresholds(warn_rise, fail_rise, "points")

    def evaluate(self, evidence):
        rise, where, compared = -math.inf, "", 0
        columns = [column for column in evidence.columns.values() if len(column.eps) >= 2]
        if not columns:
            return Verdict(self.id, Status.NOT_APPLICABLE, "", "no attack column runs at two or more eps")
        for column in columns:
            records = [evidence.matrix.get((column.label, e)) for e in column.eps]
            if any(r is None for r in records):
                return _missing(self.id, f"{column.label} cells")
            compared += 1
            accs = [r.robust_accuracy for r in records]
            for e0, a0, e1, a1 in zip(column.eps, accs, column.eps[1:], accs[1:]):
                if a1 - a0 > rise:
                    rise, where = a1 - a0, f"{column.label} {e0:g} → {e1:g}: {a0:.1f}% → {a1:.1f}%"
        worst = max(0.0, rise)
        status = _grade(worst, self.warn, self.fail)
        figure = f"largest rise {worst:.1f} points" + (f" ({where})" if worst > 0 else "")
        reason = ("accuracy never rises with eps" if worst == 0 else
                  f"accuracy rises by {worst:.1f} points with a larger eps"
                  + (" (within tolerance)" if status is Status.PASS else
                     ": the attack stops working at larger eps (label leaking or masked gradients)"))
        return self._verdict(status, figure, reason, **{"Largest rise (points)": worst})
