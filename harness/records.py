"""Results records: one finished cell as the store returns it (identity, per-example outcome vectors, cost,
provenance). The store, the reports and the checks read these; only the store writes them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CellRecord:
    """A stored cell: identity, outcome vectors and cost."""

    key: str
    benchmark: str
    defense: str
    defense_key: str
    attack: str
    attack_id: str
    options: dict
    norm: str
    eps: float
    clean_correct: np.ndarray
    adv_correct: np.ndarray
    seconds: float
    forward_evals: int
    gradient_evals: int
    seed: int
    versions: dict
    git_commit: str
    device: str
    finished_at: str
    measurements: dict[str, np.ndarray] = field(default_factory=dict)  # a probe's named arrays (sanity checks)

    @property
    def robust_correct(self) -> np.ndarray:
        """Correct on the clean input and on its adversarial version."""
        return self.clean_correct & self.adv_correct

    @property
    def robust_accuracy(self) -> float:
        """Robust accuracy in %: the share of examples correct both clean and under the attack."""
        return 100 * float(self.robust_correct.mean())
