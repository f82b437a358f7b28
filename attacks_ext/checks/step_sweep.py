"""The `step-sweep` check (`StepSweep`)."""
from __future__ import annotations

from attacks_ext.checks.per_norm import _Sweep
from harness.check_types import AttackRequest, _count
from harness.registry import CHECKS


@CHECKS.register("step-sweep")
class StepSweep(_Sweep):
    """Step-count sweep (Shafahi et al. Table 11): PGD with more and more steps (step size 2.5 eps / steps);
    warn when the last doubling still lowers accuracy by more than `warn_drop` points."""

    id, title, x_label = "step-sweep", "Step-count sweep", "steps"

    def __init__(self, *, steps: list | tuple = (10, 20, 40, 80), eps: dict | None = None, examples: int = 100,
                 attack: str | None = None, norms: list | tuple | None = None, warn_drop: float = 1.0,
                 warn_rise: float = 1.0, fail_rise: float = 5.0):
        if not isinstance(steps, (list, tuple)) or len(steps) < 2:
            raise ValueError(f"steps must list at least two step counts, got {steps!r}")
        self.steps = tuple(sorted(_count(s, "steps") for s in steps))
        self.examples = _count(examples, "examples")
        self._sweep_setup(eps, norms, attack, warn_drop, warn_rise, fail_rise)

    def _requests_at(self, context, norm):
        eps = self.eps_at(context, norm)
        return tuple(AttackRequest(self.name(norm, f"steps {s}"), self.attacks[norm], (("steps", s),), eps,
                                   self.examples) for s in self.steps)

    def _vectors(self, evidence, norm):
        records = self._records_at(evidence, norm)
        if any(r is None for r in records):
            return None
        return [(s, r.robust_correct) for s, r in zip(self.steps, records)]
