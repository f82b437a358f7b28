"""Declarative training recipes. A recipe is data; `defenses.train.train` is the one loop that runs them.

Registered recipe ids map to functions returning the recipe's defaults with the user's overrides
applied. Every option is checked when the recipe is built, before any training: an unknown option,
a negative eps, lambda outside [0, 1] and the like fail with a message naming the option.

The options compose (the one loop applies them in this order for each minibatch of m examples):
  1. adversarial examples (Kurakin et al. 2017, Algorithm 1): after `delay_steps`, the first
     k = round(adversarial_fraction * m) examples are replaced by `adversary` examples at a per-example
     eps (fixed, or ~ N(0, eps_sigma) truncated to [0, eps]); batches alternate with `mixed_adversary`
     (mixed Linf/L2 training), and crafting models rotate over the model itself and `ensemble_sources`
     (Tramer et al. 2018); `loss = "trades"` uses TRADES' own KL inner maximization instead, and
     `loss = "atda"` FGSM examples of every clean one with the domain-adaptation terms (Song et al. 2019);
  2. Gaussian noise augmentation: x + N(0, gaussian_noise^2), clipped to [0, 1];
  3. the loss: (sum_clean L + lambda * sum_adv L) / ((m - k) + lambda * k) with L the cross-entropy
     against label-smoothed targets y_hot - alpha * (y_hot - 1/C), plus the logit-squeezing term.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from harness.models import ACTIVATIONS
from harness.registry import ATTACKS, DEFENSES, MODELS, Choice, check_keywords
from harness.threat import Norm

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("ce", "trades", "atda")


class SqueezeForm(Choice):
    """How the logit-squeezing term meets the cross-entropy; see `defenses.train.squeeze_term` and the README."""

    BATCH_FROBENIUS = "batch-frobenius"
    BATCH_FROBENIUS_SUM_CE = "batch-frobenius-sum-ce"
    PER_EXAMPLE_MEAN = "per-example-mean"


class OverfitGuard(Choice):
    """What the guard against catastrophic overfitting does when held-out PGD accuracy collapses."""

    OFF = "off"  # not watched
    FLAG = "flag"  # recorded in the training log and on the board
    STOP = "stop"  # recorded, and training ends with the best epoch's weights


@dataclass(frozen=True)
class Recipe:
    """How to train one defense. eps values are in input units ([0, 1] data)."""

    name: str
    # model
    model: str = "small-cnn"
    width: float = 1.0
    activation: str = "relu"
    activation_beta: float = 0.01  # ReluDecay_beta
    input_levels: int = 0  # >= 2: round inputs to this many levels with a zero gradient (a masking baseline)
    # optimisation
    epochs: int = 10
    batch_size: int = 50
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # adversarial examples
    adversary: str | None = None  # an ATTACKS id; None trains without adversarial examples
    adversary_options: tuple[tuple[str, object], ...] = field(default=())
    eps: float = 0.0  # the eps, or the truncation point eps_max when eps_sigma is set
    eps_sigma: float | None = None  # per-example eps ~ N(0, eps_sigma) truncated to [0, eps]
    eps_ramp_epochs: int = 0  # eps grows linearly from eps/ramp to eps over this many epochs
    adversarial_fraction: float = 1.0  # k / m
    adversarial_weight: float = 1.0  # lambda
    delay_steps: int = 0  # clean-only minibatches before adversarial examples start
    mixed_adversary: str | None = None  # every other minibatch uses this adversary (with adversary_options) instead
    mixed_eps: float = 0.0
    ensemble_sources: tuple[str, ...] = ()  # benchmark defenses whose fixed models craft in turn
    # loss
    loss: str = "ce"
    trades_beta: float = 6.0
    trades_steps: int = 10
    atda_weight: float = 1 / 3  # lambda on ATDA's CORAL + mean-matching + margin terms
    label_smoothing: float = 0.0  # alpha
    logit_squeeze: float = 0.0  # beta
    logit_squeeze_form: SqueezeForm = SqueezeForm.BATCH_FROBENIUS
    gaussian_noise: float = 0.0  # sigma, in [0, 1] input units
    # guard against catastrophic overfitting of one-step training
    overfit_guard: OverfitGuard = OverfitGuard.OFF
    guard_examples: int = 256  # held out of training to measure PGD accuracy each epoch

    def _fail(self, message: str):
        raise ValueError(f"recipe {self.name!r}: {message}")

    def __post_init__(self):
        # Long by design: one flat list of the recipe's preconditions, each with its own message.
        if self.model not in MODELS:
            MODELS.get(self.model)  # raises with the list of known models
        numbers = {"width": (0, False), "lr": (0, False), "weight_decay": (0, True), "eps": (0, True),
                   "mixed_eps": (0, True), "trades_beta": (0, True), "atda_weight": (0, True), "logit_squeeze": (0, True),
                   "gaussian_noise": (0, True), "activation_beta": (0, False)}
        for key, (low, inclusive) in numbers.items():
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                value >= low if inclusive else value > low)
            if not ok:
                self._fail(f"{key} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")
        for key in ("epochs", "batch_size", "trades_steps", "guard_examples"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self._fail(f"{key} must be a positive integer, got {value!r}")
        if self.input_levels != 0 and (not isinstance(self.input_levels, int) or isinstance(self.input_levels, bool)
                                       or self.input_levels < 2):
            self._fail(f"input_levels must be 0 (off) or an integer >= 2, got {self.input_levels!r}")
        for key in ("eps_ramp_epochs", "delay_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self._fail(f"{key} must be an integer >= 0, got {value!r}")
        for key, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS), ("loss", self.loss, LOSSES),
                                    ("activation", self.activation, ACTIVATIONS)):
            if value not in allowed:
                self._fail(f"{key} {value!r} unknown; allowed: {', '.join(allowed)}")
        for key, vocabulary in (("logit_squeeze_form", SqueezeForm), ("overfit_guard", OverfitGuard)):
            try:  # the TOML's spelling becomes the member (frozen: set through object)
                object.__setattr__(self, key, vocabulary.parse(getattr(self, key), key))
            except ValueError as error:
                self._fail(str(error))
        for key in ("adversarial_fraction", "adversarial_weight", "label_smoothing"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                self._fail(f"{key} must be in [0, 1], got {value!r}")
        if self.eps_sigma is not None and not (isinstance(self.eps_sigma, (int, float)) and self.eps_sigma > 0):
            self._fail(f"eps_sigma must be > 0 (or absent for a fixed eps), got {self.eps_sigma!r}")
        # Only our own attacks take per-example eps, which is also why library adapters are not training code.
        if self.adversary is not None:
            self._check_budget("eps", self.eps, self._training_attack("adversary").norm)
        elif self.adversary_options:
            self._fail("adversary_options given without an adversary")
        if self.mixed_adversary is not None:
            if self.adversary is None:
                self._fail("mixed_adversary alternates with adversary, which is missing")
            self._check_budget("mixed_eps", self.mixed_eps, self._training_attack("mixed_adversary").norm)
        crafted = {"trades": "Linf examples", "atda": "FGSM examples of every clean one"}.get(self.loss)
        if crafted and (self.adversary is not None or self.eps <= 0 or self.eps > 1):
            self._fail(f"loss {self.loss!r} crafts its own {crafted}: give eps in (0, 1] and no adversary")
        if self.ensemble_sources and self.adversary is None:
            self._fail("ensemble_sources craft adversarial examples, but no adversary is set")
        if self.overfit_guard != "off" and self.adversary is None and self.loss == "ce":
            self._fail("overfit_guard watches adversarial training; this recipe has no adversary")

    def _training_attack(self, key: str):
        """The attack `key` (adversary or mixed_adversary) names, built with adversary_options: both take the same
        options (both are PGD for mixed training: steps, step size), so both halves get one budget."""
        attack_id = getattr(self, key)
        factory = ATTACKS.get(attack_id)
        try:
            check_keywords(factory, dict(self.adversary_options), f"{key} {attack_id!r}")
        except ValueError as error:
            self._fail(f"adversary_options: {error}")
        attack = factory(**dict(self.adversary_options))
        if not attack.per_example_eps:
            self._fail(f"{key} {attack_id!r} takes one eps per batch; training needs one of our own attacks "
                       "(per-example eps)")
        return attack

    def _check_budget(self, key: str, value: float, norm: Norm):
        if value <= 0:
            self._fail(f"{key} must be > 0 with an adversary, got {value!r}")
        if norm is Norm.LINF and value > 1:
            self._fail(f"Linf {key}={value:g} exceeds 1 (eps is in [0, 1] input units)")

    def eps_at(self, epoch: int, eps: float | None = None) -> float:
        """Training eps for a 0-based epoch under the linear ramp."""
        eps = self.eps if eps is None else eps
        if self.eps_ramp_epochs == 0:
            return eps
        return eps * min(1.0, (epoch + 1) / self.eps_ramp_epochs)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["adversary_options"] = dict(self.adversary_options)
        out["ensemble_sources"] = list(self.ensemble_sources)
        return out

    def summary(self) -> str:
        """One line for the leaderboard: what this row was trained with."""
        parts = [f"{self.model} x{self.width:g}" + ("" if self.activation == "relu" else f" {self.activation}")
                 + (f", inputs rounded to {self.input_levels} levels (zero gradient)" if self.input_levels else ""),
                 f"{self.epochs} ep"]
        if self.loss == "trades":
            parts.append(f"TRADES beta {self.trades_beta:g}, {self.trades_steps} steps, eps {self.eps:g}")
        if self.loss == "atda":
            parts.append(f"ATDA: FGSM eps {self.eps:g} on every example, domain-adaptation weight {self.atda_weight:.3g}")
        if self.adversary:
            eps = f"eps ~ N(0, {self.eps_sigma:g}) on [0, {self.eps:g}]" if self.eps_sigma else f"eps {self.eps:g}"
            share = "" if self.adversarial_fraction == 1 else f", k/m {self.adversarial_fraction:g}, lambda {self.adversarial_weight:g}"
            parts.append(f"{self.adversary} {eps}{share}")
            if self.mixed_adversary:
                parts.append(f"alternating {self.mixed_adversary} eps {self.mixed_eps:g}")
            if self.ensemble_sources:
                parts.append("sources " + "+".join(self.ensemble_sources))
        if self.label_smoothing:
            parts.append(f"LS alpha {self.label_smoothing:g}")
        if self.logit_squeeze:
            parts.append(f"LSq beta {self.logit_squeeze:g} ({self.logit_squeeze_form})")
        if self.gaussian_noise:
            parts.append(f"GN sigma {self.gaussian_noise:g}")
        if self.overfit_guard != "off":
            parts.append(f"overfit guard: {self.overfit_guard}")
        return ", ".join(parts)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "name")


def build_recipe(recipe_id: str, **overrides) -> Recipe:
    """The registered recipe `recipe_id` with `overrides` (TOML keys) applied."""
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"recipe {recipe_id!r}: unknown option {', '.join(map(repr, unknown))}; allowed: {', '.join(RECIPE_FIELDS)}")
    if isinstance(overrides.get("adversary_options"), dict):
        overrides["adversary_options"] = tuple(sorted(overrides["adversary_options"].items()))
    if isinstance(overrides.get("ensemble_sources"), list):
        overrides["ensemble_sources"] = tuple(overrides["ensemble_sources"])
    return DEFENSES.get(recipe_id)(**overrides)


def _preset(recipe_id: str, doc: str, **defaults):
    def factory(**overrides) -> Recipe:
        return Recipe(**{"name": recipe_id, **defaults, **overrides})

    factory.__doc__ = doc
    DEFENSES.register(recipe_id, factory)


_preset("natural", "Plain training on clean inputs with cross-entropy.")
_preset("pgd-at", "Madry et al. 2018: every example replaced by PGD-Linf (random start, 7 steps, eps 0.3 on MNIST).",
        adversary="pgd-linf", adversary_options=(("steps", 7),), eps=0.3)
_preset("pgd-at-l2", "Madry et al. 2018 with PGD-L2 (random start, 7 steps, eps 2.0 on MNIST).",
        adversary="pgd-l2", adversary_options=(("steps", 7),), eps=2.0)
_preset("mixed-norm-at", "Mixed Linf/L2 PGD training: minibatches alternate PGD-Linf eps 0.3 and PGD-L2 eps 2.0 (Li et al.).",
        adversary="pgd-linf", adversary_options=(("steps", 7),), eps=0.3, mixed_adversary="pgd-l2", mixed_eps=2.0)
_preset("trades", "TRADES (Zhang et al. 2019): CE + beta * KL(f(x) || f(x')), x' maximizing the KL in the Linf ball.",
        loss="trades", eps=0.3, trades_beta=6.0, trades_steps=10)
# Kurakin et al. 2017, Algorithm 1: m = 32, k = 16, lambda = 0.3, eps ~ N(0, 8/255) truncated to [0, 16/255] on
# ImageNet; on MNIST the same shape at eps_max 0.3 with sigma 0.15.
KURAKIN = dict(batch_size=32, adversarial_fraction=0.5, adversarial_weight=0.3, eps=0.3, eps_sigma=0.15)
_preset("fgsm-at", "Kurakin et al. 2017 Algorithm 1 with FGSM (true label): the label-leaking recipe.",
        adversary="fgsm", **KURAKIN)
_preset("step-ll-at", "Kurakin et al. 2017 Algorithm 1 with step l.l. (towards the least-likely class).",
        adversary="step-ll", **KURAKIN)
_preset("step-rnd-at", "Kurakin et al. 2017 Algorithm 1 with step rnd (towards a random other class).",
        adversary="step-rnd", **KURAKIN)
_preset("fgsm-pred-at", "Kurakin et al. 2017 Algorithm 1 with FGSM on the predicted label.",
        adversary="fgsm-pred", **KURAKIN)
_preset("iter-ll-at", "Kurakin et al. 2017 Algorithm 1 with iter. l.l.", adversary="iter-ll", **KURAKIN)
_preset("half-normal-fgsm-at", "Label-leaking blog post: half of each batch FGSM, lambda 1, eps ~ |N(0, sigma)| (cut at 1).",
        adversary="fgsm", adversarial_fraction=0.5, adversarial_weight=1.0, eps=1.0, eps_sigma=0.15)
_preset("ensemble-at", "Ensemble adversarial training (Tramer et al. 2018): half of each batch FGSM, crafted in turn on "
        "the model itself and on fixed pre-trained `ensemble_sources`.",
        adversary="fgsm", adversarial_fraction=0.5, eps=0.3)
_preset("atda", "Adversarial training with domain adaptation (Song et al., ICLR 2019, Sec. 3): cross-entropy on every "
        "clean example and its FGSM example, plus 1/3 x (CORAL + mean matching of the clean and adversarial logits + "
        "the margin term on class centers in logit space). eps 0.3 on MNIST.", loss="atda", eps=0.3)
_preset("gaussian-noise", "Gaussian noise augmentation alone, sigma 0.5 (Shafahi et al.).", gaussian_noise=0.5)
_preset("label-smoothing", "Label smoothing alone, alpha 0.5 (Shafahi et al.).", label_smoothing=0.5)
# The paper adds beta * ||Z||_F to Madry et al.'s MNIST loss, which sums the cross-entropy over the minibatch;
# with a batch-mean cross-entropy the same beta is m times stronger and squeezes every logit to zero.
_preset("logit-squeezing", "Logit squeezing alone, beta 0.5 on the summed cross-entropy (Shafahi et al.).",
        logit_squeeze=0.5, logit_squeeze_form="batch-frobenius-sum-ce")
_preset("ls-gn", "Label smoothing alpha 0.5 + Gaussian noise sigma 0.5 (Shafahi et al.).",
        label_smoothing=0.5, gaussian_noise=0.5)
_preset("lsq-gn", "Logit squeezing beta 0.5 (summed cross-entropy, as the paper ran it) + Gaussian noise sigma 0.5 "
        "(Shafahi et al.).", logit_squeeze=0.5, logit_squeeze_form="batch-frobenius-sum-ce", gaussian_noise=0.5)
