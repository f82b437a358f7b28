"""The `fgsm-direction-loss` check (`FgsmDirectionLoss`) and its probe (`probe_fgsm_line`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from attacks_ext.checks.plotting import _finish, _line_styles
from attacks_ext.checks.probing import _input_gradient
from harness.check_types import Check, ProbeRequest, Status, _count, _grade, _missing, _thresholds
from harness.figures import pyplot
from harness.registry import CHECKS, PROBES
from harness.threat import Norm, check_eps


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
        probe = self.records(evidence)[0]
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
            probe = self.records(evidence)[0]
            if probe is not None:
                axis.plot(probe.measurements["eps"], probe.measurements["loss"].mean(0), color=color, linestyle=style, label=name)
                drawn = True
        return _finish(fig, axis, path, xlabel="eps along sign(∇x CE) (L∞)", ylabel="mean cross-entropy", log_y=True,
                       title="loss along the FGSM direction (must keep rising)", drawn=drawn)


@PROBES.register("fgsm-line", shared=("eps",))
def probe_fgsm_line(model, x, y, *, generator, eps_max: float, points: int) -> dict[str, np.ndarray]:
    """Cross-entropy at clip01(x + t sign(grad)) for t on an even grid from 0 to eps_max."""
    direction = _input_gradient(model, x, lambda z: F.cross_entropy(z, y, reduction="none")).sign()
    grid = torch.linspace(0, eps_max, points)
    with torch.no_grad():
        losses = [F.cross_entropy(model((x + float(t) * direction).clamp(0, 1)), y, reduction="none") for t in grid]
    return {"eps": grid.double().numpy(), "loss": torch.stack(losses, 1).double().cpu().numpy()}
