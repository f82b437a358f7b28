"""The `randomized-outputs` check (`RandomizedOutputs`) and its probe (`probe_output_stats`)."""
from __future__ import annotations

import numpy as np
import torch

from harness.check_types import Check, ProbeRequest, Status, _above, _count, _missing, _number
from harness.registry import CHECKS, PROBES


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
        probe = self.records(evidence)[0]
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


@PROBES.register("output-stats", shared=())
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
