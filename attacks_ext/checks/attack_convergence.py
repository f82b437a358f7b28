"""Indicators of attack failure, per example (Pintor et al., "Indicators of Attack Failure: Debugging and Improving
Optimization of Adversarial Examples", NeurIPS 2022), beside the unbounded-attack and zero-gradient checks:

- **silent success**: a point the attack evaluated inside the eps-ball was misclassified, but the point it returned
  is not (the attack found an adversarial example and threw it away). Watched on a library attack (torchattacks
  APGD-CE) through a wrapper that sees every input the attack sends to the model;
- **incomplete optimization**: on an example the attack failed to break, its best loss so far was still rising at
  the end, by more than `rise_share` of its total rise over the last `window` evaluations;
- **unstable predictions**: at the point the attack returned, tiny random perturbations change the loss by more
  than `unstable_change` of its value on average (noisy or shattered gradients make the attack wander).

All three are read off one run of torchattacks' APGD-CE (the attack AutoAttack starts with) through a wrapper that
sees every input it sends to the model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks_ext.checks.per_norm import PGD, PerNormCheck
from harness.check_types import rank_eps
from harness.check_types import ProbeRequest, Status, _count, _grade, _missing, _number, _thresholds
from attacks_ext.pgd import ascent_direction, project
from harness.registry import ATTACKS, CHECKS, PROBES
from harness.threat import Norm


class _PathRecorder(nn.Module):
    """Passes inputs through to the model and follows each example of the batch along the attack's path: whether
    any input inside its eps-ball was misclassified, and its cross-entropy at every input the attack evaluated.
    A library sends rows of its own choosing (subsets, restarts), so each row is matched to the one clean example
    it lies within eps of; a row close to two examples is not counted."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float):
        super().__init__()
        self.model, self.x, self.y, self.norm, self.eps = model, x, y, norm, eps
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.losses: list[list[float]] = [[] for _ in range(len(x))]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows)
        with torch.no_grad():
            p = float("inf") if self.norm is Norm.LINF else 2.0
            inside = torch.cdist(rows.detach().flatten(1), self.x.flatten(1), p=p) <= self.eps * (1 + 1e-5) + 1e-6
            unique = inside.sum(1) == 1
            owner = inside.float().argmax(1)
            wrong = logits.detach().argmax(1) != self.y[owner]
            self.fooled[owner[unique & wrong]] = True
            loss = F.cross_entropy(logits.detach(), self.y[owner], reduction="none")
            for row in torch.nonzero(unique).flatten().tolist():
                self.losses[int(owner[row])].append(float(loss[row]))
        return logits

    def best_loss(self) -> np.ndarray:
        """(examples, evaluations) best loss so far; an example evaluated fewer times keeps its last best."""
        length = max((len(trace) for trace in self.losses), default=0)
        out = np.zeros((len(self.losses), length))
        for i, trace in enumerate(self.losses):
            if trace:
                best = np.maximum.accumulate(trace)
                out[i, : len(best)], out[i, len(best):] = best, best[-1]
        return out


@PROBES.register("attack-convergence", shared=None)
def probe_attack_convergence(model, x, y, *, generator, norm: str, eps: float, library_steps: int, noise_draws: int,
                             noise_share: float) -> dict[str, np.ndarray]:
    """Run torchattacks' APGD-CE through a path recorder: per example, its best loss after every evaluation,
    whether it was broken, whether a misclassified point inside the ball was evaluated, and the mean relative
    change of the loss at the returned point under `noise_draws` random perturbations of size `noise_share` x eps."""
    norm = Norm.parse(norm)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    recorder = _PathRecorder(model, x, y, norm, eps)
    library = ATTACKS.get("ta-apgd-ce" if norm is Norm.LINF else "ta-apgd-ce-l2")(steps=library_steps)
    x_adv = project(library(recorder, x, y, eps=eps, generator=torch.Generator().manual_seed(seed)), x, eps, norm)
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
        logits = model(x_adv)
        base = F.cross_entropy(logits, y, reduction="none")
        noise = torch.Generator().manual_seed(seed + 1)
        changes = []
        for _ in range(noise_draws):
            direction = torch.rand(x.shape, generator=noise).to(x.device, x.dtype) * 2 - 1
            if norm is Norm.L2:  # a unit L2 step, as PGD's
                direction = ascent_direction(direction, norm)
            moved = (x_adv + noise_share * eps * direction).clamp(0, 1)
            changes.append((F.cross_entropy(model(moved), y, reduction="none") - base).abs() / base.abs().clamp_min(1e-6))
    return {"best_loss": recorder.best_loss(), "clean_correct": clean_correct.cpu().numpy(),
            "library_correct": (clean_correct & (logits.argmax(1) == y)).cpu().numpy(),
            "library_fooled_on_path": recorder.fooled.cpu().numpy(),
            "loss_change": torch.stack(changes, 1).mean(1).double().cpu().numpy()}




@CHECKS.register("attack-convergence")
class AttackConvergence(PerNormCheck):
    """Indicators of attack failure (Pintor et al., NeurIPS 2022), per example and norm, on torchattacks' APGD-CE
    (`steps` steps) followed through a wrapper around the model: silent success (it evaluated a misclassified point
    inside the ball and returned a correctly classified one), incomplete optimization (its best loss still rising
    over the last `window` evaluations on an example it did not break) and unstable predictions (the loss at its
    point jumps under tiny random perturbations). Each share is graded against `warn_share` / `fail_share` (% of
    the examples it applies to) when it rests on at least `min_examples` examples."""

    id, title = "attack-convergence", "Indicators of attack failure"
    attacks = PGD

    def __init__(self, *, steps: int = 100, examples: int = 100, window: int = 10, rise_share: float = 0.05,
                 noise_draws: int = 8, noise_share: float = 0.01, unstable_change: float = 0.25,
                 norms: list | tuple | None = None, warn_share: float = 5.0, fail_share: float = 25.0,
                 min_examples: int = 10):
        self.steps, self.examples = _count(steps, "steps", 2), _count(examples, "examples")
        self.window, self.min_examples = _count(window, "window"), _count(min_examples, "min_examples")
        if self.window >= self.steps:
            raise ValueError(f"window ({window}) must be shorter than steps ({steps})")
        self.rise_share, self.unstable_change = _number(rise_share, "rise_share"), _number(unstable_change, "unstable_change")
        self.noise_draws, self.noise_share = _count(noise_draws, "noise_draws"), _number(noise_share, "noise_share")
        self.warn, self.fail = _thresholds(warn_share, fail_share, "% of examples")
        self._setup(norms, None)

    def _requests_at(self, context, norm):
        options = (("eps", rank_eps(context, norm)), ("library_steps", self.steps), ("noise_draws", self.noise_draws),
                   ("noise_share", self.noise_share), ("norm", norm.value))
        return (ProbeRequest(self.name(norm, "convergence"), "attack-convergence", options, self.examples),)

    def indicators(self, m: dict) -> dict[str, tuple[int, int]]:
        """(flagged, judged) examples per indicator."""
        best, robust = np.asarray(m["best_loss"]), np.asarray(m["library_correct"], dtype=bool)
        window = min(self.window, best.shape[1] - 1)
        span = best[:, -1] - best[:, 0]
        rising = (best[:, -1] - best[:, -1 - window]) > self.rise_share * np.maximum(span, 1e-12)
        attacked = np.asarray(m["clean_correct"], dtype=bool)
        silent = np.asarray(m["library_fooled_on_path"], dtype=bool) & np.asarray(m["library_correct"], dtype=bool)
        unstable = np.asarray(m["loss_change"]) > self.unstable_change
        return {"silent success": (int(silent.sum()), int(attacked.sum())),
                "incomplete optimization": (int((rising & robust).sum()), int(robust.sum())),
                "unstable predictions": (int((unstable & attacked).sum()), int(attacked.sum()))}

    def _evaluate_at(self, evidence, norm):
        (probe,) = self._records_at(evidence, norm)
        if probe is None:
            return _missing(self.id, "convergence probe")
        counts = self.indicators(probe.measurements)
        # an indicator judged on fewer than `min_examples` examples (e.g. the few an attack left standing) says nothing
        shares = {name: 100 * flagged / judged if judged >= self.min_examples else 0.0
                  for name, (flagged, judged) in counts.items()}
        status = max(_grade(share, self.warn, self.fail) for share in shares.values())
        figure = "; ".join(f"{name} {flagged}/{judged}" for name, (flagged, judged) in counts.items())
        worst = max(shares, key=shares.get)
        reason = ("the attacks kept what they found, converged and met a stable loss" if status is Status.PASS else
                  f"{worst}: {shares[worst]:.1f}% of examples ({REMEDY[worst]})")
        return self._verdict(status, figure, reason, **{f"{name} (%)": share for name, share in shares.items()})

    def plot(self, evidences, path):
        def draw(evidence, norm):
            (probe,) = self._records_at(evidence, norm)
            if probe is None:
                return None
            best = np.asarray(probe.measurements["best_loss"])
            robust = np.asarray(probe.measurements["library_correct"], dtype=bool)
            if not robust.any() or best.shape[1] < 2:
                return None
            span = np.maximum(best[:, -1:] - best[:, :1], 1e-12)
            normalized = ((best - best[:, :1]) / span)[robust].mean(0)
            return list(zip(range(1, best.shape[1] + 1), 100 * normalized))

        return self._panels(evidences, path, draw, xlabel=lambda norm: "APGD-CE evaluation",
                            ylabel="best loss so far, % of its rise",
                            title=lambda context, norm: f"APGD-CE on what it left, {norm.symbol} {rank_eps(context, norm):g}")


REMEDY = {"silent success": "the attack discards adversarial points it found: keep the best point, not the last",
          "incomplete optimization": "the loss still climbs at the last step: more steps or a larger step size",
          "unstable predictions": "the loss jumps under tiny noise: gradients are noisy or shattered; use EOT or BPDA"}
