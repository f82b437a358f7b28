"""The `iterative-beats-one-step` check (`IterativeBeatsOneStep`)."""
from __future__ import annotations

import math

from harness.check_types import (AttackRequest, Check, Column, Status, Verdict, _count, _graded_if_significant, _missing,
                                 _reason_tail, _thresholds)
from harness.registry import CHECKS
from harness.threat import Norm


@CHECKS.register("iterative-beats-one-step")
class IterativeBeatsOneStep(Check):
    """Iterative attacks must be at least as strong as one-step ones at the same eps (Carlini et al. 2019);
    a one-step attack that wins means the iterative attack's gradients lead it astray. In a cascade the
    matrix's columns are cumulative, so the check runs its own standalone copies of the one-step columns and of
    the first iterative column at each eps (the baseline every later one adds to) on the first `examples` images."""

    id, title = "iterative-beats-one-step", "Iterative beats one-step"
    FAMILIES = ("one-step", "iterative")

    def __init__(self, *, warn_margin: float = 1.0, fail_margin: float = 5.0, examples: int = 100):
        self.warn, self.fail = _thresholds(warn_margin, fail_margin, "points")
        self.examples = _count(examples, "examples")

    @classmethod
    def compared_columns(cls, context) -> dict[tuple[Norm, float], list[Column]]:
        """Per (norm, eps) with both families: its one-step columns and its first iterative column."""
        points: dict[tuple[Norm, float], list[Column]] = {}
        for column in context.columns:
            for eps in column.eps:
                chosen = points.setdefault((column.norm, eps), [])
                first_iterative = column.family == "iterative" and not any(c.family == "iterative" for c in chosen)
                if column.family == "one-step" or first_iterative:
                    chosen.append(column)
        return {point: columns for point, columns in points.items()
                if {c.family for c in columns} == set(cls.FAMILIES)}

    def requests(self, context):
        if not context.cascade:
            return ()
        return tuple(self._request(c, eps) for (_, eps), columns in self.compared_columns(context).items() for c in columns)

    def _request(self, column, eps: float) -> AttackRequest:
        """The column rerun on every example (a cascade's column attacked only what the columns before it left)."""
        return AttackRequest(f"{column.label} @ {eps:g}", column.attack_id, column.options, eps, self.examples)

    def evaluate(self, evidence):
        def record_of(column, eps):
            if evidence.context.cascade:
                return evidence.record(self._request(column, eps))
            return evidence.matrix.get((column.label, eps))

        compared = self.compared_columns(evidence.context)
        if not compared:
            return Verdict(self.id, Status.NOT_APPLICABLE, "", "no eps has both a one-step and an iterative column")
        worst, where, gained, lost = -math.inf, "", 0, 0
        for (norm, eps), columns in sorted(compared.items(), key=lambda item: (item[0][0].value, item[0][1])):
            by_family = {}
            for column in columns:
                record = record_of(column, eps)
                if record is None:
                    return _missing(self.id, f"{column.label} @ {eps:g}")
                by_family.setdefault(column.family, []).append((record.robust_accuracy, column.label, record.robust_correct))
            one, iterative = (min(by_family[family], key=lambda entry: entry[0]) for family in ("one-step", "iterative"))
            if iterative[0] - one[0] > worst:
                worst = iterative[0] - one[0]
                where = f"{iterative[1]} {iterative[0]:.1f}% vs {one[1]} {one[0]:.1f}% at {norm.symbol} {eps:g}"
                # paired on the same examples: broken by the one-step attack alone against by the iterative alone
                gained, lost = int((iterative[2] & ~one[2]).sum()), int((one[2] & ~iterative[2]).sum())
        status, test = _graded_if_significant(worst, self.warn, self.fail, gained, lost)
        reason = ("the first iterative attack beats the strongest one-step attack at every eps" if worst <= 0 else
                  f"a one-step attack beats the first iterative one by {worst:.1f} points"
                  + _reason_tail(status, worst, self.warn, test, "the iterative attacks' gradients are masked"))
        return self._verdict(status, f"closest: {where}", reason, **{"Iterative − one-step (points)": worst})
