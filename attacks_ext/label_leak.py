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

*Robust-feature leakage* (Ilyas et al.'s D_rand and D_det, Goh's lower bound): training images attacked
towards a new label and relabelled with it; a network trained on them is tested on clean data, and so is a
linear classifier that sees only the features of a robust linear model, whose clean accuracy lower-bounds
how much of the transfer robust features leaking into the attacks explain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attacks_ext.base import ExampleRandomness, LabelMode, seed_from
from attacks_ext.pgd import ascend, cross_entropy_gradient
from harness.registry import PROBES
from harness.threat import Norm

GRADIENT_LABELS = (LabelMode.TRUE, LabelMode.PREDICTED, LabelMode.LEAST_LIKELY, LabelMode.RANDOM)


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


@PROBES.register("perturbation-labels", shared=None)  # the label-leak board's perturbation probe
def probe_perturbation_labels(model, x, y, *, generator, folds: int = 5) -> dict[str, np.ndarray]:
    """Held-out predictions of linear probes on sign-gradient perturbations and on raw pixels (see the module
    docstring). Stores the labels that built each gradient and every probe's per-example prediction."""
    with torch.no_grad():
        logits = model(x)
    classes = logits.shape[1]
    offset = ExampleRandomness(seed_from(generator), range(len(y))).randint(1, classes).to(y.device)  # per example
    built_from = {LabelMode.TRUE: y, LabelMode.PREDICTED: logits.argmax(1), LabelMode.LEAST_LIKELY: logits.argmin(1),
                  LabelMode.RANDOM: (y + offset) % classes}
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
        out[f"{name}_to_own"] = (out[f"{name}_to_true"] if name == LabelMode.TRUE else
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


# --- robust-feature leakage (Ilyas et al.'s D_rand / D_det, Goh's lower bound) -------------------------------

def relabelled_targets(y: torch.Tensor, classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Ilyas et al.'s new labels: D_rand a uniformly random other class (example i's from its own stream), D_det
    the next class, (y + 1) mod C."""
    offset = ExampleRandomness(seed_from(generator), range(len(y))).randint(1, classes).to(y.device)
    return {"rand": (y + offset) % classes, "det": (y + 1) % classes}


def targeted_pgd(model, x: torch.Tensor, target: torch.Tensor, *, eps: float, steps: int, norm: Norm = Norm.L2,
                 batch_size: int = 250) -> torch.Tensor:
    """PGD from x that descends the cross-entropy of `target` for all `steps` (no random start, no early stop),
    step 2.5 eps / steps, in batches."""
    def towards_target(model, x_at, labels, rng):
        grad, logits = cross_entropy_gradient(model, x_at, labels)
        return -grad, logits

    parts = []
    for begin in range(0, len(x), batch_size):
        xb, tb = x[begin : begin + batch_size], target[begin : begin + batch_size]
        parts.append(ascend(model, xb, tb, xb, steps=steps, step=2.5 * eps / steps, eps=eps, norm=norm,
                            gradient=towards_target, rng=ExampleRandomness(0, range(len(xb)))))
    return torch.cat(parts) if parts else x.clone()


def fit_robust_linear(x: torch.Tensor, y: torch.Tensor, classes: int, *, radius: float, steps: int = 300,
                      lr: float = 0.05) -> torch.Tensor:
    """A linear classifier z = W x (features f_i(x) = w_i^T x, as Goh's) trained on its exact worst-case L2 loss
    at `radius`: logit j of a wrong class rises by radius * ||w_j - w_y||. Full-batch Adam from zero weights, a
    fixed number of steps: the same answer on every run. Returns W, (classes, d)."""
    flat = x.flatten(1).double()
    weights = torch.zeros(classes, flat.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(flat @ weights.T + radius * linear_gaps(weights, y), y)
        loss.backward()
        optimizer.step()
    return weights.detach()


def linear_gaps(weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, C): ||w_j - w_{y_i}||_2, the most an L2 perturbation of norm 1 can raise logit j over logit y_i."""
    gram = weights @ weights.T  # ||w_j - w_k||^2 = G_jj + G_kk - 2 G_jk, without an (N, C, d) tensor
    squared = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
    return squared.clamp_min(1e-24).sqrt()[y] * (1 - F.one_hot(y, weights.shape[0]).to(weights.dtype))


def linear_features(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) float64 on the CPU: the features w_i^T x of the linear model `weights`, i.e. its logits."""
    return x.flatten(1).double().cpu() @ weights.T


def certified_static(weights: torch.Tensor, x: torch.Tensor, radius: float) -> np.ndarray:
    """Per example: the linear classifier's prediction cannot change anywhere in the L2 ball of `radius`
    (Goh's specification 2), certified analytically: every margin exceeds radius * ||w_pred - w_j||."""
    logits = linear_features(weights, x)
    predicted = logits.argmax(1)
    margins = logits.gather(1, predicted[:, None]) - logits
    gaps = linear_gaps(weights, predicted)
    others = ~F.one_hot(predicted, weights.shape[0]).bool()
    return ((margins > radius * gaps) | ~others).all(1).numpy()


ROBUST_FEATURE_SETS = {"rand": "D_rand (random other class)", "det": "D_det (y + 1 mod C)"}


def robust_linear_hits(measurements: dict) -> dict[str, int]:
    """Per data set: the clean test examples that the linear classifier on robust features labels correctly."""
    true = np.asarray(measurements["true_label"])
    return {name: int((np.asarray(measurements[f"{name}_robust_linear_predictions"]) == true).sum())
            for name in ROBUST_FEATURE_SETS}


def robust_feature_rows(measurements: dict) -> list[dict]:
    """Per data set: how often the attack reached its target, and the clean test accuracy (%) of the network
    trained on it and of the linear classifier on robust features (Goh's lower bound on leakage)."""
    true = np.asarray(measurements["true_label"])
    chance = 100 * float(np.bincount(true).max() / len(true))
    hits = robust_linear_hits(measurements)
    return [{"Data set": label, "Target reached (%)": 100 * float(measurements[f"{name}_reached"][0]),
             "Network → clean test (%)": 100 * float((measurements[f"{name}_network_predictions"] == true).mean()),
             "Robust linear features → clean test (%)": 100 * (hits[name] / len(true)),
             "Chance": chance}
            for name, label in ROBUST_FEATURE_SETS.items()]
