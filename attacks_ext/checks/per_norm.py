"""Sanity checks that run extra attacks, at every norm the board reports: unbounded eps (Carlini et al. 2019;
Shafahi et al. Table 9), restart and step sweeps (Tables 10, 11), a gradient-free and a transfer attack against
the white-box columns (`gradient_free.py`, `transfer.py`), the reference audit (`reference_attack.py`) and the
indicators of attack failure (`attack_convergence.py`) build on the same base, one module per check.

Each runs at every norm of the board's grid (or the `norms` it is given) at that norm's rank-by eps: the
board's `rank_by` eps for its norm, the largest eps of the grid for the others. Its verdict is the worst over
the norms, and its figure names every norm; a norm whose evidence is not in the store makes the verdict
missing ("not run"), never a pass.
"""
from __future__ import annotations

import math

import numpy as np

from attacks_ext.checks.plotting import _line_styles, _save
from harness.check_types import (AttackRequest, Check, Status, Verdict, _above, _grade, _graded_if_significant, _missing,
                                 _number, _reason_tail, _thresholds, rank_eps)
from harness.figures import pyplot
from harness.registry import ATTACKS
from harness.statistics import discordant_test
from harness.threat import Norm, check_eps


PGD = {Norm.LINF: "pgd-linf", Norm.L2: "pgd-l2"}
SQUARE = {Norm.LINF: "ta-square", Norm.L2: "ta-square-l2"}


def _norm_list(norms) -> tuple[Norm, ...] | None:
    if norms is None:
        return None
    if not isinstance(norms, (list, tuple)) or not norms:
        raise ValueError(f"norms must be a non-empty list such as ['linf', 'l2'], got {norms!r}")
    return tuple(dict.fromkeys(Norm.parse(n) for n in norms))


def _per_norm(value, name: str, convert, norms: tuple[Norm, ...] | None) -> dict[Norm, object] | None:
    """An option given per norm as a table ({linf = ..., l2 = ...}), or as one value for a check that runs at one
    norm (L-inf unless `norms` names another); None: the check's defaults."""
    if value is None:
        return None
    if not isinstance(value, dict):
        if norms is not None and len(norms) > 1:
            raise ValueError(f"{name} must be a table by norm, e.g. {{ linf = ..., l2 = ... }}, when the check runs "
                             f"at several norms; got {value!r}")
        value = {(norms or (Norm.LINF,))[0].value: value}
    return {Norm.parse(norm): convert(v, Norm.parse(norm)) for norm, v in value.items()}


class PerNormCheck(Check):
    """Base of the checks that attack at every norm: `_requests_at(context, norm)` and `_evaluate_at(evidence,
    norm)` do one norm; the base names requests by norm and combines the verdicts."""

    attacks: dict[Norm, str] = {}  # the attack each norm uses unless the `attack` option names one

    def _setup(self, norms, attack: str | None) -> None:
        self.norms = _norm_list(norms)
        if attack is not None:  # one attack given: the check runs at that attack's norm only
            norm = ATTACKS.info(attack)["norm"]
            if self.norms is not None and self.norms != (norm,):
                raise ValueError(f"attack {attack!r} is a {norm.value} attack; norms may only be [{norm.value!r}]")
            self.attacks, self.norms = {norm: attack}, (norm,)

    def norms_for(self, context) -> tuple[Norm, ...]:
        wanted = self.norms if self.norms is not None else tuple(self.attacks)
        if self.norms is not None:
            for norm in wanted:
                if norm not in self.attacks:
                    raise ValueError(f"no {norm.value} attack for this check; give attack = '<a {norm.value} attack>'")
        return tuple(norm for norm in wanted if norm in context.grid)

    @staticmethod
    def name(norm: Norm, text: str) -> str:
        return f"{norm.value}: {text}"

    def requests(self, context):
        return tuple(request for norm in self.norms_for(context) for request in self._requests_at(context, norm))

    def evaluate(self, evidence) -> Verdict:
        norms = self.norms_for(evidence.context)
        if not norms:
            return Verdict(self.id, Status.NOT_APPLICABLE, "", "the board has no eps grid at the norms this check runs at")
        verdicts = [(norm, self._evaluate_at(evidence, norm)) for norm in norms]
        missing = [(norm, v) for norm, v in verdicts if v.status is None]
        if missing:
            return Verdict(self.id, None, "", "; ".join(f"{norm.symbol}: {v.reason}" for norm, v in missing))
        worst_norm, worst = max(verdicts, key=lambda item: item[1].status)
        figure = "; ".join(f"{norm.symbol}: {v.figure}" for norm, v in verdicts)
        details = {f"{norm.symbol} {key}": value for norm, v in verdicts for key, value in v.details.items()}
        return Verdict(self.id, worst.status, figure, f"{worst_norm.symbol}: {worst.reason}", details)

    def _requests_at(self, context, norm: Norm) -> tuple[AttackRequest, ...]:
        raise NotImplementedError

    def _records_at(self, evidence, norm: Norm) -> list:
        """The stored cells of the requests at one norm, in request order (None: missing)."""
        return [evidence.record(request) for request in self._requests_at(evidence.context, norm)]

    def _evaluate_at(self, evidence, norm: Norm) -> Verdict:
        raise NotImplementedError

    def _panels(self, evidences, path, draw, *, xlabel, ylabel, title, log2_x: bool = False) -> bool:
        """One panel per norm, one curve per defense: `draw(evidence, norm)` gives the (x, y) points or None."""
        plt = pyplot()
        contexts = [e.context for e in evidences.values()]
        norms = self.norms_for(contexts[0]) if contexts else ()
        if not norms:
            return False
        fig, axes = plt.subplots(1, len(norms), figsize=(6.5 * len(norms), 4.0), squeeze=False)
        drawn = False
        for axis, norm in zip(axes[0], norms):
            for (name, evidence), (color, style) in zip(evidences.items(), _line_styles(len(evidences))):
                points = draw(evidence, norm)
                if points:
                    axis.plot(*zip(*points), marker="o", color=color, linestyle=style, label=name)
                    drawn = True
            if log2_x:
                axis.set_xscale("log", base=2)
            axis.set_ylim(-2, 102)
            axis.set_xlabel(xlabel(norm))
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            axis.set_title(title(contexts[0], norm), fontsize=10)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7, ncol=2)
        _save(fig, path)
        return drawn


def _rises(points: list[tuple[float, np.ndarray]], alpha: float = 0.05) -> tuple[float, str]:
    """The largest rise of accuracy from one point of a budget curve (budget, per-example robust vector) to a later
    one that is significant (exact one-sided McNemar test on the paired vectors, p < alpha), and where; (0, "")
    when no rise is. Runs at different budgets are separate random draws, so a few examples moving either way are
    noise, not a red flag."""
    best, where = 0.0, ""
    for i, (x0, v0) in enumerate(points):
        for x1, v1 in points[i + 1:]:
            gained, lost = int((v1 & ~v0).sum()), int((v0 & ~v1).sum())
            rise = 100 * (gained - lost) / len(v0)
            if rise <= best or not gained:
                continue
            p_value = discordant_test(gained, lost, alternative="greater").p_value
            if p_value < alpha:
                best = rise
                where = (f"{100 * v0.mean():.1f}% at {x0:g} → {100 * v1.mean():.1f}% at {x1:g}; {gained} examples "
                         f"survive only the larger budget, {lost} only the smaller, McNemar p = {p_value:.2g}")
    return best, where


RISE_REASON = ("accuracy rises with the attack's budget: a stronger attack must not do worse, so the model is "
               "randomized or its gradients unstable; its robust accuracies are not trustworthy")


class _BudgetCurve(PerNormCheck):
    """A check that reads one curve per norm: accuracy against an attack's budget (eps, restarts, steps)."""

    def _vectors(self, evidence, norm) -> list[tuple[float, np.ndarray]] | None:
        """(budget, per-example robust vector) along the curve; None while a cell is missing."""
        raise NotImplementedError

    def _curve(self, evidence, norm) -> list[tuple[float, float]] | None:
        vectors = self._vectors(evidence, norm)
        return None if vectors is None else [(x, 100 * float(v.mean())) for x, v in vectors]


class _Sweep(_BudgetCurve):
    """Shared by the restart and step sweeps: one curve per defense and norm; warn while the last doubling still
    helps, and flag accuracy that rises with the budget."""

    x_label = ""
    attacks = PGD

    def _sweep_setup(self, eps, norms, attack, warn_drop, warn_rise, fail_rise):
        self._setup(norms, attack)
        self.eps_option = _per_norm(eps, "eps", lambda v, norm: float(check_eps(v, norm)), self.norms) or {}
        self.warn_drop = _number(warn_drop, "warn_drop (points)")
        self.warn_rise, self.fail_rise = _thresholds(warn_rise, fail_rise, "points of rise")

    def eps_at(self, context, norm: Norm) -> float:
        return self.eps_option.get(norm, rank_eps(context, norm))

    def _evaluate_at(self, evidence, norm):
        vectors = self._vectors(evidence, norm)
        if vectors is None:
            return _missing(self.id, "sweep cells")
        curve = [(x, 100 * float(v.mean())) for x, v in vectors]
        (first_x, first), (half_x, half), (last_x, last) = curve[0], curve[-2] if len(curve) > 1 else curve[0], curve[-1]
        drop = half - last
        rise, where = _rises(vectors)
        figure = f"{first:.1f}% at {first_x} → {half:.1f}% at {half_x} → {last:.1f}% at {last_x} {self.x_label}"
        details = {f"{x} {self.x_label}": a for x, a in curve}
        if _above(rise, self.warn_rise):
            return self._verdict(_grade(rise, self.warn_rise, self.fail_rise), figure,
                                 f"accuracy rises by {rise:.1f} points with more {self.x_label} ({where}): "
                                 + RISE_REASON, **details)
        at_half, at_last = vectors[-2][1] if len(vectors) > 1 else vectors[0][1], vectors[-1][1]
        status, test = _graded_if_significant(drop, self.warn_drop, math.inf, int((at_half & ~at_last).sum()),
                                              int((at_last & ~at_half).sum()))
        if status is Status.WARN:
            return self._verdict(Status.WARN, figure,
                                 f"going from {half_x} to {last_x} {self.x_label} still lowers accuracy by {drop:.1f} "
                                 f"points (> {self.warn_drop:g}; {test}): the attack has not converged; the board's "
                                 "numbers overstate robustness", **details)
        return self._verdict(Status.PASS, figure, f"going from {half_x} to {last_x} {self.x_label} lowers accuracy by "
                             f"{drop:.1f} points ({f'≤ {self.warn_drop:g}' if not _above(drop, self.warn_drop) else test})"
                             " and it never rises: converged", **details)

    def plot(self, evidences, path):
        return self._panels(evidences, path, self._curve, xlabel=lambda norm: self.x_label, log2_x=True,
                            ylabel="robust accuracy (%)",
                            title=lambda context, norm: f"{self.title}: PGD at {norm.symbol} eps {self.eps_at(context, norm):g}")


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
        (record,), white = self._records_at(evidence, norm), evidence.white_box(norm, eps)
        if record is None or not white:
            return _missing(self.id, f"{self.kind} cell or white-box columns")
        n = len(record.robust_correct)
        survived_white = np.logical_and.reduce([r.robust_correct[:n] for _, r in white])
        broken_only = int((survived_white & ~record.robust_correct).sum())
        only_weaker = 100 * broken_only / n
        # It attacks only what the white-box columns left standing, so no example falls to them alone that it
        # could have broken as well: the other discordant count is zero.
        status, test = _graded_if_significant(only_weaker, self.warn, self.fail, broken_only, 0)
        label = self._label(norm)
        figure = (f"white-box {100 * survived_white.mean():.1f}%, then {label} {record.robust_accuracy:.1f}% at "
                  f"eps {eps:g}; {only_weaker:.1f}% of examples broken only by {label}")
        reason = (f"the {self.kind} attack finds nothing the white-box attacks missed" if only_weaker == 0 else
                  f"{only_weaker:.1f}% of examples fall only to the {self.kind} attack" + _reason_tail(
                      status, only_weaker, self.warn, test, "white-box gradients are masked or the white-box attacks are too weak"))
        return self._verdict(status, figure, reason, **{"White-box": 100 * float(survived_white.mean()),
                                                        f"Only {self.kind}": only_weaker})
