"""Sanity checks that tell robustness from gradient masking (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"; Shafahi et al.; Kurakin et al.; Li et al.; the label-leaking post).

A check names the extra evidence it needs: attack cells beyond the matrix (run on the first `examples`
test images) and probes (measurements of the model stored as per-example arrays). Its verdict is a pure
function of stored evidence: pass / warn / fail, the figure that decided it and a short reason. The
matrix plans, runs and stores the requested cells like any other cell; identical requests from two
checks share one cell.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks_ext.base import check_eps
from attacks_ext.label_leak import probe_perturbation_labels, probe_robust_features
from attacks_ext.pgd import ProjectedGradientDescent
from attacks_ext.second_order import SecondOrderAttack
from harness.figures import pyplot, save_figure
from harness.registry import CHECKS
from harness.store import CellRecord
from harness.threat import Norm


class Status(enum.IntEnum):
    """Ordered so that the worst of several verdicts is their max. NOT_APPLICABLE: the check has nothing to judge
    on this benchmark (e.g. a one-eps grid for monotone-eps); it never counts towards an overall verdict."""

    NOT_APPLICABLE = -1
    PASS = 0
    WARN = 1
    FAIL = 2

    @property
    def label(self) -> str:
        return "n/a" if self is Status.NOT_APPLICABLE else self.name.lower()


@dataclass(frozen=True)
class Verdict:
    """One check on one defense. `status` is None when its evidence is not in the store yet (missing, which is
    not the same as not applicable)."""

    check: str
    status: Status | None
    figure: str
    reason: str
    details: dict = field(default_factory=dict)  # columns of the check's detail table


@dataclass(frozen=True)
class AttackRequest:
    """An attack cell a check needs: `attack_id` with `options` at `eps` on the first `examples` test images."""

    name: str
    attack_id: str
    options: tuple[tuple[str, object], ...]
    eps: float
    examples: int
    restart: int = 0  # independent repetitions of the same attack get their own cell (and seed)
    source: str | None = None  # a defense of the benchmark to craft on (a transfer attack); None: the target itself
    after: tuple[str, ...] = ()  # names of this check's earlier requests: attack only the examples they all left
    #                              robust (the stored vector is then cumulative); (): every example
    survivors_of: str | None = None  # "white-box": attack only what the matrix's white-box columns at (norm, eps)
    #                                  left robust; "matrix": what every column left (the worst case's survivors)
    sample: int | None = None  # attack at most this many of those survivors (the first ones); None: all


@dataclass(frozen=True)
class ProbeRequest:
    """A measurement of the model (`PROBES[probe_id]`) on the first `examples` test images."""

    name: str
    probe_id: str
    options: tuple[tuple[str, object], ...]
    examples: int


@dataclass(frozen=True)
class Column:
    """What a check needs to know about one attack column of the matrix."""

    label: str
    norm: Norm
    family: str
    eps: tuple[float, ...]
    attack_id: str = ""
    options: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Context:
    """The benchmark as the checks see it when they plan their requests."""

    grid: dict  # Norm -> eps tuple
    rank_by: tuple[Norm, float]
    eval_examples: int
    defenses: tuple[str, ...] = ()  # the benchmark's defense names (transfer sources)
    columns: tuple[Column, ...] = ()  # the matrix's attack columns
    cascade: bool = False  # whether the matrix's columns run as a cascade (cumulative, not standalone, vectors)


@dataclass(frozen=True)
class Evidence:
    """Everything stored about one defense that a check may read."""

    defense: str
    context: Context
    columns: dict[str, Column]
    matrix: dict[tuple[str, float], CellRecord | None]  # (column label, eps) -> cell; ("clean", 0.0) included
    requested: dict[str, CellRecord | None]  # the check's request name -> cell

    @property
    def clean(self) -> CellRecord | None:
        return self.matrix.get(("clean", 0.0))

    def white_box(self, norm: Norm, eps: float) -> list[tuple[str, CellRecord]]:
        """The matrix's gradient-based (one-step or iterative) cells at (norm, eps), or [] if any is missing."""
        cells = [(c.label, self.matrix.get((c.label, eps))) for c in self.columns.values()
                 if c.norm is norm and eps in c.eps and c.family in ("one-step", "iterative")]
        return [] if any(r is None for _, r in cells) else cells


def _missing(check: str, what: str) -> Verdict:
    return Verdict(check, None, "", f"not run yet: {what} missing from the store")


def _number(value, name: str, *, low: float = 0.0, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value < low if inclusive else value <= low):
        raise ValueError(f"{name} must be a number {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    return float(value)


def _count(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _thresholds(warn: float, fail: float, unit: str) -> tuple[float, float]:
    warn, fail = _number(warn, f"warn threshold ({unit})"), _number(fail, f"fail threshold ({unit})")
    if warn > fail:
        raise ValueError(f"the warn threshold ({warn:g} {unit}) must not exceed the fail threshold ({fail:g} {unit})")
    return warn, fail


def _above(value: float, threshold: float) -> bool:
    """value > threshold, ignoring float noise: percentages of whole examples such as 100 * 2 / 100 must not
    cross a threshold of 2 by rounding."""
    return round(value, 6) > threshold


def _grade(value: float, warn: float, fail: float) -> Status:
    return Status.FAIL if _above(value, fail) else Status.WARN if _above(value, warn) else Status.PASS


class Check:
    """Base of every check: `requests` (extra evidence), `evaluate` (pure), and optionally `plot`."""

    id = "check"
    title = "check"
    examples: int | None = None  # test images its requests use; None: all of the benchmark's

    def requests(self, context: Context) -> tuple[AttackRequest | ProbeRequest, ...]:
        return ()

    def requests_for(self, context: Context, defense: str) -> tuple[AttackRequest | ProbeRequest, ...]:
        """The requests for one defense's row; every row asks for the same unless a check says otherwise."""
        return self.requests(context)

    def evaluate(self, evidence: Evidence) -> Verdict:
        raise NotImplementedError

    def plot(self, evidences: dict[str, Evidence], path) -> bool:
        """Draw the check's figure for every defense into `path`; False when there is nothing to draw."""
        return False

    def _examples(self, context: Context) -> int:
        return context.eval_examples if self.examples is None else self.examples

    def _verdict(self, status: Status, figure: str, reason: str, **details) -> Verdict:
        return Verdict(self.id, status, figure, reason, details)


def _default_eps(context: Context, norm: Norm, eps: float | None) -> float:
    if eps is not None:
        return float(check_eps(eps, norm))
    rank_norm, rank_eps = context.rank_by
    if rank_norm is norm:
        return rank_eps
    if norm not in context.grid:
        raise ValueError(f"no {norm.value} eps grid to take a default eps from; give eps")
    return max(context.grid[norm])


def _save(fig, path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _label(axis, *, xlabel: str, ylabel: str, title: str, drawn: bool, log_y: bool = False) -> None:
    """Axis labels, grid, title and (when anything was drawn) the legend of one check-figure panel."""
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=10)
    if drawn:
        axis.legend(fontsize=7, ncol=2)


def _finish(fig, axis, path, *, xlabel: str, ylabel: str, title: str, drawn: bool, log_y: bool = False) -> bool:
    """Label, legend and save a one-panel check figure; returns whether anything was drawn."""
    _label(axis, xlabel=xlabel, ylabel=ylabel, title=title, drawn=drawn, log_y=log_y)
    _save(fig, path)
    return drawn


def _line_styles(count: int):
    """Distinct (colour, line style) pairs for more defenses than one colour cycle has."""
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return [(colors[i % len(colors)], ("-", "--", ":")[i // len(colors) % 3]) for i in range(count)]


# --- checks on the matrix's own cells --------------------------------------------------------------------

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
        return tuple(AttackRequest(f"{c.label} @ {eps:g}", c.attack_id, c.options, eps, self.examples)
                     for (_, eps), columns in self.compared_columns(context).items() for c in columns)

    def evaluate(self, evidence):
        def record_of(column, eps):
            if evidence.context.cascade:
                return evidence.requested.get(f"{column.label} @ {eps:g}")
            return evidence.matrix.get((column.label, eps))

        compared = self.compared_columns(evidence.context)
        if not compared:
            return Verdict(self.id, Status.NOT_APPLICABLE, "", "no eps has both a one-step and an iterative column")
        worst, where = -math.inf, ""
        for (norm, eps), columns in sorted(compared.items(), key=lambda item: (item[0][0].value, item[0][1])):
            by_family = {}
            for column in columns:
                record = record_of(column, eps)
                if record is None:
                    return _missing(self.id, f"{column.label} @ {eps:g}")
                by_family.setdefault(column.family, []).append((record.robust_accuracy, column.label))
            one, iterative = min(by_family["one-step"]), min(by_family["iterative"])
            if iterative[0] - one[0] > worst:
                worst = iterative[0] - one[0]
                where = f"{iterative[1]} {iterative[0]:.1f}% vs {one[1]} {one[0]:.1f}% at {norm.symbol} {eps:g}"
        status = _grade(worst, self.warn, self.fail)
        reason = ("the first iterative attack beats the strongest one-step attack at every eps" if worst <= 0 else
                  f"a one-step attack beats the first iterative one by {worst:.1f} points"
                  + (" (within tolerance)" if status is Status.PASS else ": the iterative attacks' gradients are masked"))
        return self._verdict(status, f"closest: {where}", reason, **{"Iterative − one-step (points)": worst})


# --- checks on probes ----------------------------------------------------------------------------------

@CHECKS.register("zero-gradients")
class ZeroGradients(Check):
    """Zero or vanishing input gradients at clean points (Athalye et al. 2018): a zero margin gradient means the
    function is flat to first order (shattered or quantized gradients); a zero cross-entropy gradient with a
    non-zero margin gradient means the softmax saturates and cross-entropy attacks see nothing."""

    id, title = "zero-gradients", "Zero / vanishing gradients"

    def __init__(self, *, examples: int | None = None, warn_share: float = 5.0, fail_share: float = 50.0):
        self.examples = None if examples is None else _count(examples, "examples")
        self.warn, self.fail = _thresholds(warn_share, fail_share, "% of examples")

    def requests(self, context):
        return (ProbeRequest("gradients", "input-gradients", (), self._examples(context)),)

    def evaluate(self, evidence):
        probe = evidence.requested.get("gradients")
        if probe is None:
            return _missing(self.id, "input-gradient probe")
        margin = probe.measurements["margin_grad_l1"]
        ce = probe.measurements["ce_grad_l1"]
        zero_margin = 100 * float((margin == 0).mean())
        saturated = 100 * float(((ce == 0) & (margin != 0)).mean())
        status = max(_grade(zero_margin, self.warn, self.fail), Status.WARN if _above(saturated, self.warn) else Status.PASS)
        figure = (f"{zero_margin:.1f}% zero margin gradients, {saturated:.1f}% saturated cross-entropy; "
                  f"median ‖∇CE‖₁ {np.median(ce):.2e}")
        if _above(zero_margin, self.warn):
            reason = (f"the input gradient of the logit margin is exactly zero on {zero_margin:.1f}% of clean points: "
                      "gradient attacks cannot move; use BPDA or gradient-free attacks")
        elif _above(saturated, self.warn):
            reason = f"cross-entropy saturates on {saturated:.1f}% of points: attack the margin (CW) loss instead"
        else:
            reason = "input gradients are non-zero at clean points"
        return self._verdict(status, figure, reason, **{"Zero margin grad (%)": zero_margin,
                                                        "Saturated CE (%)": saturated,
                                                        "Median ‖∇CE‖₁": f"{np.median(ce):.3g}",
                                                        "Median ‖∇margin‖₁": f"{np.median(margin):.3g}"})


@CHECKS.register("randomized-outputs")
class RandomizedOutputs(Check):
    """Randomized outputs: repeated forward passes on the same input must agree. A randomized model needs
    expectation over transformation (Athalye et al. 2018); plain attacks overstate its robustness."""

    id, title = "randomized-outputs", "Randomized outputs"

    def __init__(self, *, passes: int = 4, examples: int | None = None, logit_tolerance: float = 1e-4,
                 fail_share: float = 0.5):
        self.passes = _count(passes, "passes", 2)
        self.examples = None if examples is None else _count(examples, "examples")
        self.tolerance = _number(logit_tolerance, "logit_tolerance")
        self.fail_share = _number(fail_share, "fail_share (% of examples)")

    def requests(self, context):
        return (ProbeRequest("outputs", "output-stats", (("passes", self.passes),), self._examples(context)),)

    def evaluate(self, evidence):
        probe = evidence.requested.get("outputs")
        if probe is None:
            return _missing(self.id, "output probe")
        changed = 100 * float(probe.measurements["prediction_changed"].astype(bool).mean())
        spread = float(probe.measurements["logit_spread"].max())
        figure = f"predictions change on {changed:.1f}% of examples over {self.passes} passes; max logit spread {spread:.2e}"
        if _above(changed, self.fail_share):
            return self._verdict(Status.FAIL, figure, "the model is randomized: predictions differ between identical "
                                 "forward passes; evaluate it with expectation over transformation", **{"Changed (%)": changed})
        if spread > self.tolerance:
            return self._verdict(Status.WARN, figure, "logits differ between identical forward passes (randomness or "
                                 "non-deterministic kernels), though predictions agree", **{"Changed (%)": changed})
        return self._verdict(Status.PASS, figure, "identical forward passes give identical logits", **{"Changed (%)": changed})


@CHECKS.register("probability-outputs")
class ProbabilityOutputs(Check):
    """The model must return logits, not probabilities: cross-entropy on softmax outputs squashes gradients
    (Carlini & Wagner 2017) and masks them."""

    id, title = "probability-outputs", "Probability outputs"

    def __init__(self, *, passes: int = 4, examples: int | None = None, tolerance: float = 1e-3):
        self.passes = _count(passes, "passes", 2)  # shares the randomized-outputs probe when the options agree
        self.examples = None if examples is None else _count(examples, "examples")
        self.tolerance = _number(tolerance, "tolerance", inclusive=False)

    def requests(self, context):
        return (ProbeRequest("outputs", "output-stats", (("passes", self.passes),), self._examples(context)),)

    def evaluate(self, evidence):
        probe = evidence.requested.get("outputs")
        if probe is None:
            return _missing(self.id, "output probe")
        m = probe.measurements
        probabilities = bool((m["row_min"] >= -self.tolerance).all() and (np.abs(m["row_sum"] - 1) <= self.tolerance).all())
        log_probabilities = bool((np.abs(m["logsumexp"]) <= self.tolerance).all())
        figure = (f"rows sum to {m['row_sum'].min():.3g}..{m['row_sum'].max():.3g}, min entry {m['row_min'].min():.3g}, "
                  f"logsumexp {m['logsumexp'].min():.3g}..{m['logsumexp'].max():.3g}")
        if probabilities:
            return self._verdict(Status.FAIL, figure, "outputs are probabilities (non-negative rows summing to 1): "
                                 "cross-entropy attacks on them see squashed gradients; return logits")
        if log_probabilities:
            return self._verdict(Status.PASS, figure, "outputs are log-probabilities: cross-entropy and margins are unaffected")
        return self._verdict(Status.PASS, figure, "outputs are logits")


@CHECKS.register("fgsm-direction-loss")
class FgsmDirectionLoss(Check):
    """Cross-entropy along the FGSM direction sign(grad) as eps grows (the label-leaking post's figure): a loss
    that rises and then falls below its eps = 0 value is the gradient-masking / label-leaking signature."""

    id, title = "fgsm-direction-loss", "Loss along the FGSM direction"

    def __init__(self, *, points: int = 16, eps_max: float | None = None, examples: int | None = None,
                 warn_share: float = 5.0, fail_share: float = 25.0):
        self.points = _count(points, "points", 3)
        self.eps_max = None if eps_max is None else float(check_eps(eps_max, Norm.LINF))
        self.examples = None if examples is None else _count(examples, "examples")
        self.warn, self.fail = _thresholds(warn_share, fail_share, "% of examples")

    def requests(self, context):
        eps_max = self.eps_max or max(context.grid.get(Norm.LINF, ()) or (0.3,))
        return (ProbeRequest("fgsm-line", "fgsm-line", (("eps_max", eps_max), ("points", self.points)),
                             self._examples(context)),)

    @staticmethod
    def signature(loss: np.ndarray) -> np.ndarray:
        """Per example: the loss rises above its eps = 0 value and ends below it."""
        start = loss[:, :1]
        return (loss[:, 1:] > start).any(1) & (loss[:, -1] < loss[:, 0])

    def evaluate(self, evidence):
        probe = evidence.requested.get("fgsm-line")
        if probe is None:
            return _missing(self.id, "FGSM line probe")
        loss, eps = probe.measurements["loss"], probe.measurements["eps"]
        share = 100 * float(self.signature(loss).mean())
        mean = loss.mean(0)
        mean_signature = bool((mean[1:] > mean[0]).any() and mean[-1] < mean[0])
        flat = bool(mean[-1] <= mean[0]) and not mean_signature
        status = Status.FAIL if mean_signature else max(_grade(share, self.warn, self.fail),
                                                         Status.WARN if flat else Status.PASS)
        figure = f"{share:.1f}% of examples rise then fall below the eps=0 loss; mean loss {mean[0]:.3g} → {mean[-1]:.3g} at eps {eps[-1]:g}"
        if status is Status.PASS:
            reason = "the loss grows along the FGSM direction"
        elif flat and share <= self.warn:
            reason = "the mean loss does not rise along the FGSM direction: the gradient sign points nowhere (masked)"
        else:
            reason = ("along sign(grad) the loss rises and then falls below its clean value"
                      + (" on average" if mean_signature else f" for {share:.1f}% of examples")
                      + ": the one-step direction stops pointing uphill (label leaking / gradient masking)")
        return self._verdict(status, figure, reason, **{"Signature (%)": share, "Mean loss at 0": f"{mean[0]:.3g}",
                                                        f"Mean loss at {eps[-1]:g}": f"{mean[-1]:.3g}"})

    def plot(self, evidences, path):
        plt = pyplot()
        fig, axis = plt.subplots(figsize=(6.5, 4.0))
        drawn = False
        for (name, evidence), (color, style) in zip(evidences.items(), _line_styles(len(evidences))):
            probe = evidence.requested.get("fgsm-line")
            if probe is not None:
                axis.plot(probe.measurements["eps"], probe.measurements["loss"].mean(0), color=color, linestyle=style, label=name)
                drawn = True
        return _finish(fig, axis, path, xlabel="eps along sign(∇x CE) (L∞)", ylabel="mean cross-entropy", log_y=True,
                       title="loss along the FGSM direction (must keep rising)", drawn=drawn)


@CHECKS.register("linearized-robustness")
class LinearizedRobustness(Check):
    """Linearized robustness (Shafahi et al. Eq. 4): eps_L(x) = min_c (z_y - z_c) / ||grad z_y - grad z_c||_dual.
    The share of examples with eps < eps_L predicts robust accuracy; warn when the attacks leave far more
    examples standing than the linear model predicts (the attack under-uses the gradient, or the surface is
    far from linear at that eps)."""

    id, title = "linearized-robustness", "Linearized robustness"

    def __init__(self, *, examples: int | None = None, warn_excess: float = 20.0):
        self.examples = None if examples is None else _count(examples, "examples")
        self.warn_excess = _number(warn_excess, "warn_excess (points)")

    def requests(self, context):
        return (ProbeRequest("linearization", "linearization", (), self._examples(context)),)

    def comparison(self, evidence) -> list[tuple[Norm, float, float, float | None]]:
        """(norm, eps, predicted %, empirical worst-case % on the same examples or None) per grid point."""
        probe = evidence.requested.get("linearization")
        m, rows = probe.measurements, []
        n = len(m["eps_l_linf"])
        for norm, grid in evidence.context.grid.items():
            radius = m["eps_l_linf"] if norm is Norm.LINF else m["eps_l_l2"]
            for eps in grid:
                predicted = 100 * float((radius > eps).mean())
                cells = [evidence.matrix.get((c.label, eps)) for c in evidence.columns.values() if c.norm is norm and eps in c.eps]
                empirical = None if not cells or any(r is None for r in cells) else 100 * float(
                    np.logical_and.reduce([r.robust_correct[:n] for r in cells]).mean())
                rows.append((norm, eps, predicted, empirical))
        return rows

    def evaluate(self, evidence):
        if evidence.requested.get("linearization") is None:
            return _missing(self.id, "linearization probe")
        rows = [r for r in self.comparison(evidence) if r[3] is not None]
        if not rows:
            has_columns = any(c.norm in evidence.context.grid for c in evidence.columns.values())
            if has_columns:
                return _missing(self.id, "the matrix's cells")
            return Verdict(self.id, Status.NOT_APPLICABLE, "", "no matrix column to compare the prediction with")
        norm, eps, predicted, empirical = max(rows, key=lambda r: r[3] - r[2])
        excess = empirical - predicted
        status = Status.WARN if _above(excess, self.warn_excess) else Status.PASS
        figure = f"largest excess at {norm.symbol} {eps:g}: empirical {empirical:.1f}% vs linear {predicted:.1f}%"
        reason = (f"empirical robust accuracy stays within {self.warn_excess:g} points of the linear prediction"
                  if status is Status.PASS else
                  f"the attacks leave {excess:.1f} points more examples standing than the linear model predicts: "
                  "the loss surface bends at this eps or the attack does not exploit the gradient")
        details = {f"{n.symbol} {e:g} linear / empirical": f"{p:.1f} / {'—' if a is None else f'{a:.1f}'}"
                   for n, e, p, a in self.comparison(evidence)}
        return self._verdict(status, figure, reason, **details)

    def plot(self, evidences, path):
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        drawn = False
        for (name, evidence), (color, style) in zip(evidences.items(), _line_styles(len(evidences))):
            probe = evidence.requested.get("linearization")
            if probe is None:
                continue
            m = probe.measurements
            for axis, values in zip(axes, (m["logit_gap"], np.log10(np.maximum(m["grad_gap_l1"], 1e-12)), m["cosine"])):
                axis.hist(values, bins=40, histtype="step", color=color, linestyle=style, label=name)
            drawn = True
        for axis, label in zip(axes, ("logit gap z_y − z_c (runner-up c)", "log10 ‖∇z_y − ∇z_c‖₁", "cos(∇z_y, ∇z_c)")):
            axis.set_xlabel(label)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("examples")
        if drawn:
            axes[2].legend(fontsize=7, ncol=2)
        fig.suptitle("Shafahi et al. Figs. 1 and 4: logit gaps, gradient gaps and gradient cosines", fontsize=10)
        _save(fig, path)
        return drawn


@CHECKS.register("gradient-norm-trace")
class GradientNormTrace(Check):
    """Gradient norm along the attack iterations, PGD vs S-O (Li et al. Fig. 1), and both attacks' accuracy
    under each norm (their Table 1: a model adversarially trained under one norm, attacked under both): warn
    when the second-order attack beats PGD by more than `warn_margin` points under either norm, i.e. the
    first-order gradient vanishes around the points PGD reaches."""

    id, title = "gradient-norm-trace", "Gradient norm along PGD and S-O"

    def __init__(self, *, steps: int = 40, eps: float | None = None, l2_eps: float | None = None,
                 norms: list[str] | None = None, examples: int = 100, sigma: float = 0.1, draws: int = 4,
                 warn_margin: float = 2.0):
        self.steps, self.examples = _count(steps, "steps"), _count(examples, "examples")
        self.eps_option = {Norm.LINF: eps, Norm.L2: l2_eps}
        if norms is not None and (not isinstance(norms, (list, tuple)) or not norms):  # a TOML list arrives as a tuple
            raise ValueError(f"norms must be a non-empty list of 'linf' and 'l2', got {norms!r}")
        self.norms = None if norms is None else tuple(dict.fromkeys(Norm.parse(n) for n in norms))
        self.sigma, self.draws = _number(sigma, "sigma"), _count(draws, "draws")
        self.warn_margin = _number(warn_margin, "warn_margin (points)")

    def _norms(self, context) -> tuple[Norm, ...]:
        """The norms asked for; by default every norm of the benchmark's eps grid (or the one given an eps)."""
        if self.norms is not None:
            return self.norms
        return tuple(n for n in (Norm.LINF, Norm.L2) if n in context.grid or self.eps_option[n] is not None)

    def requests(self, context):
        out = []
        for norm in self._norms(context):
            eps = _default_eps(context, norm, self.eps_option[norm])
            options = (("draws", self.draws), ("eps", eps), ("norm", norm.value), ("sigma", self.sigma),
                       ("steps", self.steps))
            out.append(ProbeRequest(f"trace {norm.value}", "gradient-trace", options, self.examples))
        return tuple(out)

    @staticmethod
    def _traces(evidence):
        """(norm, eps, measurements) of every trace probe in the store, L-inf first."""
        out = []
        for name, probe in sorted(evidence.requested.items()):
            if name.startswith("trace ") and probe is not None:
                options = dict(probe.options)
                out.append((Norm.parse(options["norm"]), float(options["eps"]), probe.measurements))
        return sorted(out, key=lambda t: t[0] is not Norm.LINF)

    def evaluate(self, evidence):
        traces = self._traces(evidence)
        if len(traces) < len(self._norms(evidence.context)):
            return _missing(self.id, "gradient-trace probe")
        details, parts, gaps = {}, [], []
        for norm, eps, m in traces:
            pgd, so = 100 * float(m["pgd_correct"].mean()), 100 * float(m["so_correct"].mean())
            at = f"{norm.symbol} {eps:g}"
            details.update({f"PGD {at} (%)": pgd, f"S-O {at} (%)": so})
            parts.append(f"{at}: PGD-{self.steps} {pgd:.1f}%, S-O {so:.1f}% (mean ‖∇‖₁ {m['pgd_grad_l1'][0]:.3g} → "
                         f"{m['pgd_grad_l1'][-1]:.3g} along PGD)")
            gaps.append((pgd - so, at))
        gap, at = max(gaps)
        status = Status.WARN if _above(gap, self.warn_margin) else Status.PASS
        reason = ("the second-order attack finds nothing PGD misses" if gap <= 0 else
                  f"S-O beats PGD by {gap:.1f} points at {at}"
                  + (" (within tolerance)" if status is Status.PASS else
                     ": the first-order gradient vanishes around the points PGD reaches"))
        return self._verdict(status, "; ".join(parts), reason, **details)

    def plot(self, evidences, path):
        plt = pyplot()
        traced = {name: self._traces(evidence) for name, evidence in evidences.items()}
        panels = sorted({(norm, eps) for traces in traced.values() for norm, eps, _ in traces},
                        key=lambda p: p[0] is not Norm.LINF)
        if not panels:
            return False
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
        for axis, (norm, eps) in zip(axes.flat, panels):
            for (name, traces), (color, _) in zip(traced.items(), _line_styles(len(traced))):
                for trace_norm, trace_eps, m in traces:
                    if (trace_norm, trace_eps) == (norm, eps):
                        for attack, style, label in (("pgd", "-", name), ("so", "--", None)):
                            norms = m[f"{attack}_grad_l1"]  # ends where the attack has no example left
                            axis.plot(np.arange(1, len(norms) + 1), np.maximum(norms, 1e-12), color=color,
                                      linestyle=style, label=label)
            _label(axis, xlabel="attack iteration", ylabel="mean ‖∇x CE‖₁, examples still attacked", log_y=True,
                   title=f"{norm.symbol} {eps:g}: PGD (solid) and S-O (dashed)", drawn=True)
        _save(fig, path)
        return True


@CHECKS.register("loss-landscape")
class LossLandscape(Check):
    """Loss landscape around the first test images (Shafahi et al. Figs. 5, 9) along two random sign directions
    and along the gradient-sign direction x a random one: warn when, for most images, the gradient sign at the
    radius raises the loss no more than the best of four random sign directions at the same radius (the
    gradient carries no information)."""

    id, title = "loss-landscape", "Loss landscape"

    def __init__(self, *, images: int = 8, grid: int = 21, radius: float | None = None):
        self.examples, self.grid = _count(images, "images"), _count(grid, "grid", 3)
        self.radius = None if radius is None else float(check_eps(radius, Norm.LINF))

    def requests(self, context):
        radius = self.radius or _default_eps(context, Norm.LINF, None)
        return (ProbeRequest("landscape", "landscape", (("grid", self.grid), ("radius", radius)), self.examples),)

    def evaluate(self, evidence):
        probe = evidence.requested.get("landscape")
        if probe is None:
            return _missing(self.id, "landscape probe")
        random, adversarial = probe.measurements["random"], probe.measurements["adversarial"]
        c = self.grid // 2
        base = random[:, c, c]
        rise_gradient = adversarial[:, -1, c] - base
        # the same Linf budget on both sides: the gradient sign at the radius against the four random sign
        # directions at the radius (the plane's corners lie outside the ball)
        ends = np.stack([random[:, 0, c], random[:, -1, c], random[:, c, 0], random[:, c, -1]], 1)
        rise_random = ends.max(1) - base
        weaker = 100 * float((rise_gradient <= rise_random).mean())
        status = Status.WARN if weaker > 50 else Status.PASS
        figure = (f"median rise along the gradient sign {np.median(rise_gradient):.3g} vs best random "
                  f"{np.median(rise_random):.3g}; gradient weaker on {weaker:.0f}% of images")
        reason = ("the gradient direction raises the loss more than random directions" if status is Status.PASS else
                  "on most images random directions raise the loss more than the gradient direction: the gradient "
                  "is uninformative (masked)")
        return self._verdict(status, figure, reason, **{"Gradient weaker (%)": weaker})

    def plot(self, evidences, path):
        plt = pyplot()
        shown = [(name, e.requested.get("landscape")) for name, e in evidences.items() if e.requested.get("landscape") is not None]
        if not shown:
            return False
        fig, axes = plt.subplots(2, len(shown), figsize=(2.1 * len(shown), 4.4), squeeze=False)
        for column, (name, probe) in enumerate(shown):
            axis_values = probe.measurements["axis"]
            gradient_values = np.linspace(0, axis_values[-1], len(axis_values))  # the gradient axis runs 0..radius
            for row, key in enumerate(("random", "adversarial")):
                axis = axes[row][column]
                rows = axis_values if key == "random" else gradient_values
                axis.contourf(axis_values, rows, probe.measurements[key][0], levels=20, cmap="viridis")
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(name, fontsize=7)
            axes[0][0].set_ylabel("random × random", fontsize=7)
            axes[1][0].set_ylabel("gradient sign (↑) × random", fontsize=7)
        fig.suptitle(f"cross-entropy around the first test image, radius {axis_values[-1]:g} (L∞)", fontsize=9)
        _save(fig, path)
        return True


# --- probes: measurements of a model, stored per example -------------------------------------------------

def _input_gradient(model: nn.Module, x: torch.Tensor, objective) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(model(x)).sum(), x)
    return grad


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{c != y} z_c per example."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return true - other


def probe_input_gradients(model, x, y, *, generator) -> dict[str, np.ndarray]:
    """L1 norms of the input gradients of the cross-entropy and of the logit margin at clean points."""
    ce = _input_gradient(model, x, lambda z: F.cross_entropy(z, y, reduction="none"))
    margin = _input_gradient(model, x, lambda z: _margin(z, y))
    return {"ce_grad_l1": ce.flatten(1).abs().sum(1).double().cpu().numpy(),
            "margin_grad_l1": margin.flatten(1).abs().sum(1).double().cpu().numpy()}


def probe_output_stats(model, x, y, *, generator, passes: int) -> dict[str, np.ndarray]:
    """Repeated forward passes (randomness) and the shape of the outputs (logits or probabilities)."""
    with torch.no_grad():
        outputs = [model(x).double() for _ in range(passes)]
    first = outputs[0]
    spread = torch.stack([(o - first).abs().amax(1) for o in outputs[1:]]).amax(0)
    changed = torch.stack([(o.argmax(1) != first.argmax(1)) for o in outputs[1:]]).any(0)
    return {"logit_spread": spread.cpu().numpy(), "prediction_changed": changed.to(torch.uint8).cpu().numpy(),
            "row_min": first.amin(1).cpu().numpy(), "row_max": first.amax(1).cpu().numpy(),
            "row_sum": first.sum(1).cpu().numpy(), "logsumexp": first.logsumexp(1).cpu().numpy()}


def probe_fgsm_line(model, x, y, *, generator, eps_max: float, points: int) -> dict[str, np.ndarray]:
    """Cross-entropy at clip01(x + t sign(grad)) for t on an even grid from 0 to eps_max."""
    direction = _input_gradient(model, x, lambda z: F.cross_entropy(z, y, reduction="none")).sign()
    grid = torch.linspace(0, eps_max, points)
    with torch.no_grad():
        losses = [F.cross_entropy(model((x + float(t) * direction).clamp(0, 1)), y, reduction="none") for t in grid]
    return {"eps": grid.double().numpy(), "loss": torch.stack(losses, 1).double().cpu().numpy()}


def probe_linearization(model, x, y, *, generator) -> dict[str, np.ndarray]:
    """Shafahi et al. Eq. 4 per example, for the Linf (dual L1) and L2 (dual L2) threat models, plus the
    runner-up class's logit gap, gradient gap and gradient cosine (their Figs. 1 and 4)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    classes = logits.shape[1]
    grads = torch.stack([torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c < classes - 1)[0].flatten(1)
                         for c in range(classes)], 1)  # (N, C, D)
    logits = logits.detach()
    index = torch.arange(len(y))
    gaps = logits[index, y][:, None] - logits  # (N, C), zero at y
    diff = grads[index, y][:, None, :] - grads  # (N, C, D)
    is_true = F.one_hot(y, classes).bool()
    l1, l2 = diff.abs().sum(2), diff.norm(dim=2)
    eps_linf = (gaps / l1.clamp_min(1e-30)).masked_fill(is_true, math.inf).amin(1)
    eps_l2 = (gaps / l2.clamp_min(1e-30)).masked_fill(is_true, math.inf).amin(1)
    runner_up = logits.masked_fill(is_true, -math.inf).argmax(1)
    g_true, g_other = grads[index, y], grads[index, runner_up]
    cosine = F.cosine_similarity(g_true, g_other, dim=1, eps=1e-30)
    return {"eps_l_linf": eps_linf.double().cpu().numpy(), "eps_l_l2": eps_l2.double().cpu().numpy(),
            "logit_gap": gaps[index, runner_up].double().cpu().numpy(),
            "grad_gap_l1": l1[index, runner_up].double().cpu().numpy(), "cosine": cosine.double().cpu().numpy()}


class _TracedGradients:
    """Wraps an attack's `gradient` method to record the mean L1 norm of every gradient it takes."""

    def __init__(self, attack: ProjectedGradientDescent):
        self.norms: list[float] = []
        original = attack.gradient

        def traced(model, x_adv, y, rng):
            grad, logits = original(model, x_adv, y, rng)
            self.norms.append(float(grad.flatten(1).abs().sum(1).mean()))
            return grad, logits

        attack.gradient = traced


def probe_gradient_trace(model, x, y, *, generator, steps: int, eps: float, sigma: float, draws: int,
                         norm: str = "linf") -> dict[str, np.ndarray]:
    """PGD and S-O under `norm`: who survives, and per iteration the mean gradient norm over the examples still
    under attack (each leaves at its first misclassified iterate, so a trace ends where no example is left)."""
    out = {}
    norm = Norm.parse(norm)
    for name, attack in (("pgd", ProjectedGradientDescent(f"pgd-{norm.value}", norm, steps=steps)),
                         ("so", SecondOrderAttack(f"so-{norm.value}", norm, steps=steps, sigma=sigma, draws=draws))):
        trace = _TracedGradients(attack)
        start = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        x_adv = attack(model, x, y, eps=eps, generator=start, stop_when_fooled=True)
        with torch.no_grad():
            out[f"{name}_correct"] = ((model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)).to(torch.uint8).cpu().numpy()
        out[f"{name}_grad_l1"] = np.asarray(trace.norms, dtype=np.float64)  # S-O: the norm of the averaged gradient
    return out


def probe_landscape(model, x, y, *, generator, grid: int, radius: float) -> dict[str, np.ndarray]:
    """Cross-entropy on a grid x + a u + b v, a, b in [-radius, radius], per image: u, v random sign directions
    ('random'), and u = sign(grad) with v random, a >= 0 only ('adversarial', rows run from 0 to radius)."""
    u = torch.randn(x.shape, generator=generator).sign().to(x.device, x.dtype)
    v = torch.randn(x.shape, generator=generator).sign().to(x.device, x.dtype)
    g = _input_gradient(model, x, lambda z: F.cross_entropy(z, y, reduction="none")).sign()
    axis = torch.linspace(-radius, radius, grid)
    half = torch.linspace(0, radius, grid)

    def surface(first, second, first_axis):
        rows = []
        with torch.no_grad():
            for a in first_axis:
                points = torch.stack([(x + float(a) * first + float(b) * second).clamp(0, 1) for b in axis], 1)
                loss = F.cross_entropy(model(points.flatten(0, 1)), y.repeat_interleave(grid), reduction="none")
                rows.append(loss.view(len(x), grid))
        return torch.stack(rows, 1).double().cpu().numpy()  # (N, first, second)

    return {"axis": axis.double().numpy(), "random": surface(u, v, axis), "adversarial": surface(g, v, half)}


# Probes whose arrays hold one row per example, except the named ones, which every batch gives alike: the harness
# runs them batch by batch, so evaluation memory stays flat as the test set grows (linearization alone holds
# classes x input size floats per example). The others measure across examples (a trace's mean per iteration,
# a classifier fitted on all of them) or draw noise shaped like the whole batch, and get their examples at once.
BATCHED_PROBES = {"input-gradients": (), "output-stats": (), "fgsm-line": ("eps",), "linearization": ()}

PROBES = {
    "input-gradients": probe_input_gradients,
    "output-stats": probe_output_stats,
    "fgsm-line": probe_fgsm_line,
    "linearization": probe_linearization,
    "gradient-trace": probe_gradient_trace,
    "landscape": probe_landscape,
    "perturbation-labels": probe_perturbation_labels,  # the label-leak board's perturbation probe
    "robust-features": probe_robust_features,  # the label-leak board's D_rand / D_det and Goh's bound
}
