"""The `zero-gradients` check (`ZeroGradients`) and its probe (`probe_input_gradients`)."""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from attacks_ext.checks.probing import _input_gradient, _margin
from harness.check_types import Check, ProbeRequest, Status, _above, _count, _grade, _missing, _thresholds
from harness.registry import CHECKS, PROBES


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
        probe = self.records(evidence)[0]
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


@PROBES.register("input-gradients", shared=())
def probe_input_gradients(model, x, y, *, generator) -> dict[str, np.ndarray]:
    """L1 norms of the input gradients of the cross-entropy and of the logit margin at clean points."""
    ce = _input_gradient(model, x, lambda z: F.cross_entropy(z, y, reduction="none"))
    margin = _input_gradient(model, x, lambda z: _margin(z, y))
    return {"ce_grad_l1": ce.flatten(1).abs().sum(1).double().cpu().numpy(),
            "margin_grad_l1": margin.flatten(1).abs().sum(1).double().cpu().numpy()}
