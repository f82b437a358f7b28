"""The `gradient-norm-trace` check (`GradientNormTrace`) and its probe (`probe_gradient_trace`)."""
from __future__ import annotations

import math

import numpy as np
import torch

from attacks_ext.checks.plotting import _label, _line_styles, _save
from attacks_ext.pgd import ProjectedGradientDescent
from attacks_ext.second_order import SecondOrderAttack
from harness.check_types import (Check, ProbeRequest, _count, _default_eps, _graded_if_significant, _missing, _number,
                                 _reason_tail)
from harness.figures import pyplot
from harness.registry import CHECKS, PROBES
from harness.threat import Norm


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

    def traces(self, evidence):
        """(norm, eps, measurements) of every trace probe in the store, L-inf first."""
        out = []
        for request, probe in zip(self.requests(evidence.context), self.records(evidence)):
            if probe is not None:
                options = dict(request.options)
                out.append((Norm.parse(options["norm"]), float(options["eps"]), probe.measurements))
        return sorted(out, key=lambda t: t[0] is not Norm.LINF)

    def evaluate(self, evidence):
        traces = self.traces(evidence)
        if len(traces) < len(self._norms(evidence.context)):
            return _missing(self.id, "gradient-trace probe")
        details, parts, gaps = {}, [], []
        for norm, eps, m in traces:
            pgd_correct, so_correct = np.asarray(m["pgd_correct"], bool), np.asarray(m["so_correct"], bool)
            pgd, so = 100 * float(pgd_correct.mean()), 100 * float(so_correct.mean())
            at = f"{norm.symbol} {eps:g}"
            details.update({f"PGD {at} (%)": pgd, f"S-O {at} (%)": so})
            parts.append(f"{at}: PGD-{self.steps} {pgd:.1f}%, S-O {so:.1f}% (mean ‖∇‖₁ {m['pgd_grad_l1'][0]:.3g} → "
                         f"{m['pgd_grad_l1'][-1]:.3g} along PGD)")
            gaps.append((pgd - so, at, int((pgd_correct & ~so_correct).sum()), int((so_correct & ~pgd_correct).sum())))
        gap, at, gained, lost = max(gaps)
        status, test = _graded_if_significant(gap, self.warn_margin, math.inf, gained, lost)
        reason = ("the second-order attack finds nothing PGD misses" if gap <= 0 else
                  f"S-O beats PGD by {gap:.1f} points at {at}" + _reason_tail(
                      status, gap, self.warn_margin, test, "the first-order gradient vanishes around the points PGD reaches"))
        return self._verdict(status, "; ".join(parts), reason, **details)

    def plot(self, evidences, path):
        plt = pyplot()
        traced = {name: self.traces(evidence) for name, evidence in evidences.items()}
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


@PROBES.register("gradient-trace", shared=None)
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
