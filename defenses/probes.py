"""Probes that train a model of their own, so they sit above the training loop: the label-leak board's robust
features (Ilyas et al.'s D_rand and D_det, each learned by a fresh network, and Goh's linear bound)."""
from __future__ import annotations

import inspect

import numpy as np
import torch

from attacks_ext.label_leak import (certified_static, fit_linear_probe, fit_robust_linear, linear_features,
                                    relabelled_targets, targeted_pgd, _with_bias)
from defenses.recipes import build_recipe
from defenses.train import train
from harness.data import Dataset
from harness.registry import PROBES


@PROBES.register("robust-features", shared=None)  # the label-leak board's D_rand / D_det and Goh's bound
def probe_robust_features(model, x, y, *, generator, training, train_examples: int = 2000, eps: float = 2.0,
                          steps: int = 20, epochs: int = 5, network: str = "small-cnn", radius: float = 0.25
                          ) -> dict[str, np.ndarray]:
    """Ilyas et al.'s D_rand and D_det built on `model` from the first `train_examples` training images
    (targeted L2 PGD at `eps`, relabelled with the target), a fresh `network` trained on each (the natural
    recipe, `epochs`) and a linear classifier on the 10 features of a robust linear model (Goh, radius
    `radius`) fitted on each; every one predicts the clean test examples (x, y)."""
    if train_examples > len(training[0]):
        raise ValueError(f"robust features: train_examples {train_examples} exceeds the {len(training[0])} training images")
    x_train, y_train = (t[:train_examples].to(x.device) for t in training)
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    targets = relabelled_targets(y_train, classes, generator)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    weights = fit_robust_linear(x_train.cpu(), y_train.cpu(), classes, radius=radius)
    test_features = linear_features(weights, x)
    out = {"true_label": y.cpu().numpy(), "linear_predictions": test_features.argmax(1).numpy(),
           "linear_certified": certified_static(weights, x, radius)}
    for name, target in targets.items():
        x_adv = targeted_pgd(model, x_train, target, eps=eps, steps=steps)
        with torch.no_grad():
            out[f"{name}_reached"] = np.asarray([float((model(x_adv).argmax(1) == target).float().mean())])
        relabelled = Dataset(f"d-{name}", x_adv.cpu(), target.cpu(), x.cpu(), y.cpu(), classes)
        network_model, _ = train(build_recipe("natural", epochs=epochs, model=network), relabelled, seed=seed,
                                 device=x.device, progress=False)
        with torch.no_grad():
            out[f"{name}_network_predictions"] = network_model(x).argmax(1).cpu().numpy()
        probe = fit_linear_probe(linear_features(weights, x_adv), target.cpu(), classes)
        out[f"{name}_robust_linear_predictions"] = (_with_bias(test_features) @ probe).argmax(1).numpy()
    return out


def robust_feature_settings(options: dict) -> dict:
    """The robust-features probe's options with its defaults filled in (the TOML may give any of them)."""
    parameters = inspect.signature(probe_robust_features).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    return {**defaults, **options}
