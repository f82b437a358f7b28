"""The `probability-outputs` check (`ProbabilityOutputs`)."""
from __future__ import annotations

import numpy as np

from harness.check_types import Check, ProbeRequest, Status, _count, _missing, _number
from harness.registry import CHECKS


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
        probe = self.records(evidence)[0]
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
