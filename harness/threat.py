"""Threat models and their enforcement: the harness, not the attack, checks every adversarial batch."""
from __future__ import annotations

import enum
import math

import torch


class Norm(str, enum.Enum):
    """Closed vocabulary of perturbation norms; values are the spellings used in TOML and the store."""

    LINF = "linf"
    L2 = "l2"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        if isinstance(value, Norm):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            allowed = ", ".join(n.value for n in cls)
            raise ValueError(f"unknown norm {value!r}; allowed: {allowed}") from None

    @property
    def symbol(self) -> str:
        return {"linf": "L∞", "l2": "L2"}[self.value]


class ThreatModelViolation(RuntimeError):
    """An attack returned an input outside the threat model; the cell that produced it fails."""


# float32 rounding of x + eps and of the L2 projection can overshoot by a few ulps; anything larger is a bug.
ABSOLUTE_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-5


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-example norm of x_adv - x, shape (N,)."""
    delta = (x_adv - x).flatten(1).double()
    if norm is Norm.LINF:
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(len(delta))
    return delta.norm(p=2, dim=1)


def verify(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm, eps: float) -> None:
    """Raise ThreatModelViolation unless x_adv has x's shape, is finite, in [0, 1] and within eps of x."""
    norm = Norm.parse(norm)
    if x_adv.shape != x.shape:
        raise ThreatModelViolation(f"adversarial batch has shape {tuple(x_adv.shape)}, inputs have {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        bad = (~torch.isfinite(x_adv)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ThreatModelViolation(f"adversarial batch contains NaN or inf (examples {bad[:10]})")
    low, high = float(x_adv.min()), float(x_adv.max())
    if low < -ABSOLUTE_TOLERANCE or high > 1 + ABSOLUTE_TOLERANCE:
        raise ThreatModelViolation(f"adversarial values leave [0, 1]: min {low:.6g}, max {high:.6g}")
    norms = perturbation_norms(x, x_adv, norm)
    limit = eps * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE
    over = (norms > limit).nonzero().flatten()
    if len(over):
        worst = float(norms.max())
        raise ThreatModelViolation(
            f"{len(over)} examples exceed the {norm.value} budget eps={eps:g}: largest perturbation {worst:.6g} "
            f"(examples {over[:10].tolist()})"
        )


def check_eps(eps, norm: Norm) -> float | torch.Tensor:
    """eps in input units of [0, 1] data: finite, non-negative, and <= 1 for Linf.

    A float, or (for our own attacks, as adversarial training needs) a 1-D tensor with one eps per example.
    """
    if isinstance(eps, torch.Tensor) and eps.ndim > 0:
        if eps.ndim != 1:
            raise ValueError(f"per-example eps must be a 1-D tensor, got shape {tuple(eps.shape)}")
        if not torch.isfinite(eps).all() or bool((eps < 0).any()):
            raise ValueError("eps must be finite numbers >= 0")
        if norm is Norm.LINF and bool((eps > 1).any()):
            raise ValueError(f"Linf eps={float(eps.max()):g} exceeds 1, the whole [0, 1] input range; eps is in input units")
        return eps
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if norm is Norm.LINF and value > 1:
        raise ValueError(
            f"Linf eps={value:g} exceeds 1, the whole [0, 1] input range; eps is in input units "
            f"(did you mean {value:g}/255 = {value / 255:.4f}?)"
        )
    return value
