"""Label-leak scoring (Kurakin, Goodfellow & Bengio 2017, Section 4.2), from stored per-example outcomes.

An example is *leaked* when the model classifies the true-label one-step adversarial example correctly
but misclassifies its twin built without the true label (FGSM vs FGSM-pred). The *reverse* count is the
opposite. With FGSM-pred as the twin, both examples coincide wherever the clean prediction is right, so
leaked + reverse can never exceed the clean errors: the bound is reported next to the counts. The
label-leaking signature is adversarial accuracy above clean accuracy.

The *perturbation probe* (the label-leaking post) asks whether the one-step perturbation itself carries the
label: a linear classifier (ridge regression on one-hot labels, 5-fold cross-validated) sees only the sign of the input gradient, mapped to clip(sign(g) + 1, 0, 1), and is
scored on held-out examples, next to the same classifier on the raw pixels and to chance. The gradient is
built from the true, predicted, least-likely and a random wrong label, and each probe is trained and scored
against the true label and against the label that built the gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attacks_ext.pgd import cross_entropy_gradient

GRADIENT_LABELS = ("true", "predicted", "least-likely", "random")


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


def _with_bias(features: torch.Tensor) -> torch.Tensor:
    """The float64 design matrix: the features and a constant column for the bias."""
    return torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, *, ridge: float = 100.0) -> torch.Tensor:
    """A ridge-regression classifier on one-hot labels (L2 penalty on the weights, not the bias), solved in
    closed form in float64: a fixed amount of work and the same answer on every run, where an iterative
    logistic fit's time and result depend on its convergence. Returns the (features + 1, classes) weights.
    (ridge 100 is where held-out accuracy plateaus on 400 MNIST examples, for pixels and perturbations alike.)"""
    design = _with_bias(features)
    penalty = torch.eye(design.shape[1], dtype=torch.float64) * ridge
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(design.T @ design + penalty, design.T @ F.one_hot(labels, classes).double())


def held_out_predictions(features: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor, classes: int) -> np.ndarray:
    """Each example's prediction by the linear probe fitted on the other folds."""
    predictions = torch.empty(len(labels), dtype=torch.long)
    for fold in folds.unique():
        test = folds == fold
        weights = fit_linear_probe(features[~test], labels[~test], classes)
        predictions[test] = (_with_bias(features[test]) @ weights).argmax(1)
    return predictions.numpy()


def probe_perturbation_labels(model, x, y, *, generator, folds: int = 5) -> dict[str, np.ndarray]:
    """Held-out predictions of linear probes on sign-gradient perturbations and on raw pixels (see the module
    docstring). Stores the labels that built each gradient and every probe's per-example prediction."""
    with torch.no_grad():
        logits = model(x)
    classes = logits.shape[1]
    offset = torch.randint(1, classes, (len(y),), generator=generator).to(y.device)
    built_from = {"true": y, "predicted": logits.argmax(1), "least-likely": logits.argmin(1), "random": (y + offset) % classes}
    order = torch.randperm(len(y), generator=generator)
    fold_of = torch.empty(len(y), dtype=torch.long)
    fold_of[order] = torch.arange(len(y)) % folds
    y_cpu = y.cpu()
    out = {"true_label": y_cpu.numpy(), "pixels_to_true": held_out_predictions(x.flatten(1).cpu(), y_cpu, fold_of, classes)}
    for name, labels in built_from.items():
        grad, _ = cross_entropy_gradient(model, x, labels)
        perturbation = (grad.sign() + 1).clamp(0, 1).flatten(1).cpu()
        labels = labels.cpu()
        out[f"{name}_label"] = labels.numpy()
        out[f"{name}_to_true"] = held_out_predictions(perturbation, y_cpu, fold_of, classes)
        out[f"{name}_to_own"] = (out[f"{name}_to_true"] if name == "true" else
                                 held_out_predictions(perturbation, labels, fold_of, classes))
    return out


def perturbation_probe_rows(measurements: dict) -> list[dict]:
    """Per gradient label: held-out accuracy (%) against the true label and against the building label, next to
    the raw-pixel probe and chance (the most frequent true label's share)."""
    true = np.asarray(measurements["true_label"])
    pixels = 100 * float((measurements["pixels_to_true"] == true).mean())
    chance = 100 * float(np.bincount(true).max() / len(true))
    return [{"Gradient": name,
             "Probe → true label": 100 * float((measurements[f"{name}_to_true"] == true).mean()),
             "Probe → its own label": 100 * float((measurements[f"{name}_to_own"] == measurements[f"{name}_label"]).mean()),
             "Raw pixels → true label": pixels, "Chance": chance}
            for name in GRADIENT_LABELS]
