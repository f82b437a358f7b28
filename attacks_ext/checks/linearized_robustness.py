"""The `linearized-robustness` check (`LinearizedRobustness`) and its probe (`probe_linearization`)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from attacks_ext.checks.plotting import _line_styles, _save
from harness.check_types import Check, ProbeRequest, Status, Verdict, _above, _count, _missing, _number
from harness.figures import pyplot
from harness.registry import CHECKS, PROBES
from harness.threat import Norm


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
        probe = self.records(evidence)[0]
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
        if self.records(evidence)[0] is None:
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
            probe = self.records(evidence)[0]
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


@PROBES.register("linearization", shared=())
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
