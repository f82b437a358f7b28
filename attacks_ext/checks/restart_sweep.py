"""The `restart-sweep` check (`RestartSweep`)."""
from __future__ import annotations

import numpy as np

from attacks_ext.checks.per_norm import _Sweep
from harness.check_types import AttackRequest, _count
from harness.registry import CHECKS


@CHECKS.register("restart-sweep")
class RestartSweep(_Sweep):
    """Random-restart sweep (Shafahi et al. Table 10): an example counts as robust only if it survives every
    restart so far; warn when the last doubling of restarts still lowers accuracy by more than `warn_drop` points."""

    id, title, x_label = "restart-sweep", "Random-restart sweep", "restarts"

    def __init__(self, *, restarts: int = 4, steps: int = 40, eps: dict | None = None, examples: int = 100,
                 attack: str | None = None, norms: list | tuple | None = None, warn_drop: float = 1.0,
                 warn_rise: float = 1.0, fail_rise: float = 5.0):
        self.restarts, self.steps = _count(restarts, "restarts", 2), _count(steps, "steps")
        self.examples = _count(examples, "examples")
        self._sweep_setup(eps, norms, attack, warn_drop, warn_rise, fail_rise)

    def _requests_at(self, context, norm):
        # Only the examples every earlier restart left robust matter to the curve, so each restart attacks those.
        eps, requests = self.eps_at(context, norm), []
        for r in range(self.restarts):
            requests.append(AttackRequest(self.name(norm, f"restart {r + 1}"), self.attacks[norm], (("steps", self.steps),),
                                          eps, self.examples, restart=r, after=tuple(requests[-1:])))
        return tuple(requests)

    def _vectors(self, evidence, norm):
        records = self._records_at(evidence, norm)
        if any(r is None for r in records):
            return None
        survived = np.logical_and.accumulate([r.robust_correct for r in records])
        points = sorted({1, *(2 ** i for i in range(1, self.restarts.bit_length())), self.restarts})
        return [(n, survived[n - 1]) for n in points if n <= self.restarts]
