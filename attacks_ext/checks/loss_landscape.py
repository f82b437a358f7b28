"""The `loss-landscape` check (`LossLandscape`) and its probe (`probe_landscape`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from attacks_ext.checks.plotting import _save
from attacks_ext.checks.probing import _input_gradient
from harness.check_types import Check, ProbeRequest, Status, _count, _default_eps, _missing
from harness.figures import pyplot
from harness.registry import CHECKS, PROBES
from harness.threat import Norm, check_eps


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
        probe = self.records(evidence)[0]
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
        shown = [(name, probe) for name, e in evidences.items() if (probe := self.records(e)[0]) is not None]
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


@PROBES.register("landscape", shared=None)
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
