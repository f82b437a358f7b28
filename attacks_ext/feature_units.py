"""Penultimate-layer units that never fire (Shafahi et al., Appendix E, Fig. 10): the findings board's probe.

Shafahi et al. sum the absolute activation of each unit of the feature layer (the input of the logit layer) over
the test images: natural training leaves every unit active, while adversarial training, label smoothing and logit
squeezing (each with Gaussian noise) leave about 400 of the Madry CNN's 1,024 units silent."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harness.registry import PROBES

DEAD_SHARE = 0.01  # a unit is dead when its summed activation is at most this share of the mean unit's


def feature_layer(model: nn.Module) -> nn.Linear:
    """The logit layer: the last nn.Linear in module order (its input is the feature layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"penultimate units: {type(model).__name__} has no nn.Linear output layer to read the "
                         "feature layer from (the probe reads the input of the last nn.Linear)")
    return linears[-1]


@PROBES.register("penultimate-units", shared=None)
def probe_penultimate_units(model, x, y, *, generator, batch_size: int = 250) -> dict[str, np.ndarray]:
    """Per unit of the feature layer: the sum over the examples of its absolute activation and how many examples
    it is non-zero on; plus the feature layer's width."""
    layer = feature_layer(model)
    totals, active = None, None

    def record(_module, inputs, _output):
        nonlocal totals, active
        features = inputs[0].detach().flatten(1).double()
        batch_totals, batch_active = features.abs().sum(0), (features != 0).sum(0)
        totals = batch_totals if totals is None else totals + batch_totals
        active = batch_active if active is None else active + batch_active

    handle = layer.register_forward_hook(record)
    try:
        with torch.no_grad():
            for begin in range(0, len(x), batch_size):
                model(x[begin : begin + batch_size])
    finally:
        handle.remove()
    return {"unit_activation_sum": totals.cpu().numpy(), "unit_active_examples": active.cpu().numpy(),
            "examples": np.asarray([len(x)])}


def dead_units(measurements: dict) -> tuple[int, int]:
    """(dead units, units): dead = summed |activation| at most DEAD_SHARE of the mean unit's sum (Shafahi et al.'s
    'sum of absolute activations ~ 0'; a ReLU unit that never fires sums to exactly 0)."""
    sums = np.asarray(measurements["unit_activation_sum"], dtype=float)
    return int((sums <= DEAD_SHARE * sums.mean()).sum()), int(sums.size)
