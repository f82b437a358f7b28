"""Declarative training recipes. A recipe is data; `defenses.train.train` is the one loop that runs them.

Registered recipe ids map to functions returning the recipe's defaults with the user's overrides
applied; an unknown option is an error that lists the allowed ones, raised before any training.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from harness.registry import ATTACKS, DEFENSES, MODELS

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """How to train one defense. eps is in input units ([0, 1] data)."""

    name: str
    model: str = "small-cnn"
    width: float = 1.0
    epochs: int = 10
    batch_size: int = 50
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    adversary: str | None = None  # an ATTACKS id crafting the training inputs; None trains on clean inputs
    adversary_options: tuple[tuple[str, object], ...] = field(default=())
    eps: float = 0.0
    eps_ramp_epochs: int = 0  # eps grows linearly from eps/ramp to eps over this many epochs

    def __post_init__(self):
        if self.model not in MODELS:
            MODELS.get(self.model)  # raises with the list of known models
        if not (isinstance(self.width, (int, float)) and self.width > 0):
            raise ValueError(f"recipe {self.name!r}: width must be > 0, got {self.width!r}")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"recipe {self.name!r}: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.eps_ramp_epochs, int) or self.eps_ramp_epochs < 0:
            raise ValueError(f"recipe {self.name!r}: eps_ramp_epochs must be an integer >= 0, got {self.eps_ramp_epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe {self.name!r}: optimizer {self.optimizer!r} unknown; allowed: {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"recipe {self.name!r}: lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"recipe {self.name!r}: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"recipe {self.name!r}: eps must be a finite number >= 0, got {self.eps!r}")
        if self.adversary is not None:
            attack = ATTACKS.get(self.adversary)(**dict(self.adversary_options))
            if attack.norm.value == "linf" and self.eps > 1:
                raise ValueError(f"recipe {self.name!r}: Linf eps={self.eps:g} exceeds 1 (eps is in [0, 1] input units)")
        elif self.adversary_options:
            raise ValueError(f"recipe {self.name!r}: adversary_options given without an adversary")

    def eps_at(self, epoch: int) -> float:
        """Training eps for a 0-based epoch under the linear ramp."""
        if self.eps_ramp_epochs == 0:
            return self.eps
        return self.eps * min(1.0, (epoch + 1) / self.eps_ramp_epochs)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adversary_options"] = dict(self.adversary_options)
        return out


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name")


def build_recipe(recipe_id: str, **overrides) -> Recipe:
    """The registered recipe `recipe_id` with `overrides` (TOML keys) applied."""
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"recipe {recipe_id!r}: unknown option {', '.join(map(repr, unknown))}; allowed: {', '.join(RECIPE_FIELDS)}")
    if isinstance(overrides.get("adversary_options"), dict):
        overrides["adversary_options"] = tuple(sorted(overrides["adversary_options"].items()))
    return DEFENSES.get(recipe_id)(**overrides)


@DEFENSES.register("natural")
def natural(**overrides) -> Recipe:
    """Plain training on clean inputs with cross-entropy."""
    return Recipe(**{"name": "natural", **overrides})


@DEFENSES.register("pgd-at")
def pgd_adversarial_training(**overrides) -> Recipe:
    """Madry et al. 2018: train on PGD-Linf examples (random start, 7 steps, eps 0.3 on MNIST) only."""
    defaults = dict(name="pgd-at", adversary="pgd-linf", adversary_options=(("steps", 7),), eps=0.3, eps_ramp_epochs=0)
    return Recipe(**{**defaults, **overrides})
