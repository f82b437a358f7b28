"""Label-leak scoring (Kurakin, Goodfellow & Bengio 2017, Section 4.2), from stored per-example outcomes.

An example is *leaked* when the model classifies the true-label one-step adversarial example correctly
but misclassifies its twin built without the true label (FGSM vs FGSM-pred). The *reverse* count is the
opposite. With FGSM-pred as the twin, both examples coincide wherever the clean prediction is right, so
leaked + reverse can never exceed the clean errors: the bound is reported next to the counts. The
label-leaking signature is adversarial accuracy above clean accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelLeakScore:
    examples: int
    clean_accuracy: float
    true_label_accuracy: float
    label_free_accuracy: float
    leaked: int
    reverse: int
    clean_errors: int  # the bound on leaked + reverse when the twin uses the predicted label

    @property
    def leaked_rate(self) -> float:
        return self.leaked / self.examples if self.examples else 0.0

    @property
    def signature(self) -> bool:
        """True-label adversarial accuracy above clean accuracy (Kurakin's label-leaking signature)."""
        return self.true_label_accuracy > self.clean_accuracy


def score_label_leak(clean_correct, true_label_correct, label_free_correct) -> LabelLeakScore:
    """Score one (defense, eps) pair from three per-example vectors of "classified correctly"."""
    clean, true_label, free = (np.asarray(v, dtype=bool) for v in (clean_correct, true_label_correct, label_free_correct))
    if not clean.shape == true_label.shape == free.shape or clean.ndim != 1:
        raise ValueError(f"outcome vectors must be 1-D and equally long, got {clean.shape}, {true_label.shape}, {free.shape}")
    return LabelLeakScore(
        examples=len(clean), clean_accuracy=float(clean.mean()) if len(clean) else 0.0,
        true_label_accuracy=float(true_label.mean()) if len(clean) else 0.0,
        label_free_accuracy=float(free.mean()) if len(clean) else 0.0,
        leaked=int((true_label & ~free).sum()), reverse=int((~true_label & free).sum()),
        clean_errors=int((~clean).sum()),
    )
