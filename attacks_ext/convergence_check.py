"""Indicators of attack failure, per example (Pintor et al., "Indicators of Attack Failure: Debugging and Improving
Optimization of Adversarial Examples", NeurIPS 2022), beside the unbounded-attack and zero-gradient checks:

- **silent success**: a point the attack evaluated inside the eps-ball was misclassified, but the point it returned
  is not (the attack found an adversarial example and threw it away). Watched on a library attack (torchattacks
  APGD-CE) through a wrapper that sees every input the attack sends to the model;
- **incomplete optimization**: on an example the attack failed to break, its best loss so far was still rising at
  the end, by more than `rise_share` of its total rise over the last `window` steps (our PGD, run to the end);
- **unstable predictions**: at the point PGD returned, tiny random perturbations change the loss by more than
  `unstable_change` of its value on average (noisy or shattered gradients make the attack wander).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks_ext.attack_checks import PGD, PerNormCheck, rank_eps
from attacks_ext.checks import PROBES, ProbeRequest, Status, _above, _count, _grade, _missing, _number, _thresholds
from attacks_ext.pgd import ProjectedGradientDescent, project
from harness.registry import ATTACKS, CHECKS
from harness.threat import Norm, perturbation_norms


class _FoolingRecorder(nn.Module):
    """Passes inputs through to the model and marks, per example of the batch, whether any input inside that
    example's eps-ball was misclassified. A library sends rows of its own choosing (subsets, restarts), so each row
    is matched to the one clean example it lies within eps of; a row close to two examples is not counted."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float):
        super().__init__()
        self.model, self.x, self.y, self.norm, self.eps = model, x, y, norm, eps
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows)
        with torch.no_grad():
            flat, clean = rows.detach().flatten(1), self.x.flatten(1)
            if self.norm is Norm.LINF:
                distance = torch.cdist(flat, clean, p=float("inf"))
            else:
                distance = torch.cdist(flat, clean, p=2.0)
            inside = distance <= self.eps * (1 + 1e-5) + 1e-6
            unique = inside.sum(1) == 1
            owner = inside.float().argmax(1)
            wrong = logits.detach().argmax(1) != self.y[owner]
            self.fooled[owner[unique & wrong]] = True
        return logits


def probe_attack_convergence(model, x, y, *, generator, norm: str, eps: float, steps: int, library_steps: int,
                             noise_draws: int, noise_share: float) -> dict[str, np.ndarray]:
    """Per example: the loss of PGD at every step (run to the end), whether PGD and the library attack broke it,
    whether the library attack evaluated a misclassified point inside the ball, and the mean relative change of
    the loss at PGD's point under `noise_draws` random perturbations of size `noise_share` x eps."""
    norm = Norm.parse(norm)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    attack = ProjectedGradientDescent(f"pgd-{norm.value}", norm, steps=steps)
    losses, original = [], attack.gradient

    def traced(model_, x_adv, labels, rng):
        grad, logits = original(model_, x_adv, labels, rng)
        losses.append(F.cross_entropy(logits, labels, reduction="none").double().cpu())
        return grad, logits

    attack.gradient = traced
    x_adv = attack(model, x, y, eps=eps, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
        pgd_logits = model(x_adv)
        pgd_correct = clean_correct & (pgd_logits.argmax(1) == y)
        base = F.cross_entropy(pgd_logits, y, reduction="none")
        noise = torch.Generator().manual_seed(seed + 1)
        changes = []
        for _ in range(noise_draws):
            direction = torch.rand(x.shape, generator=noise).to(x.device, x.dtype) * 2 - 1
            if norm is Norm.L2:
                direction = direction / perturbation_norms(torch.zeros_like(x), direction, norm).view(-1, 1, 1, 1).clamp_min(1e-12).to(x.dtype)
            moved = (x_adv + noise_share * eps * direction).clamp(0, 1)
            changes.append((F.cross_entropy(model(moved), y, reduction="none") - base).abs() / base.abs().clamp_min(1e-6))
    recorder = _FoolingRecorder(model, x, y, norm, eps)
    library = ATTACKS.get("ta-apgd-ce" if norm is Norm.LINF else "ta-apgd-ce-l2")(steps=library_steps)
    returned = library(recorder, x, y, eps=eps, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        library_correct = clean_correct & (model(project(returned, x, eps, norm)).argmax(1) == y)
    return {"loss": torch.stack(losses, 1).numpy(), "pgd_correct": pgd_correct.cpu().numpy(),
            "library_correct": library_correct.cpu().numpy(), "library_fooled_on_path": recorder.fooled.cpu().numpy(),
            "clean_correct": clean_correct.cpu().numpy(),
            "loss_change": torch.stack(changes, 1).mean(1).double().cpu().numpy()}


PROBES["attack-convergence"] = probe_attack_convergence


@CHECKS.register("attack-convergence")
class AttackConvergence(PerNormCheck):
    """Indicators of attack failure (Pintor et al., NeurIPS 2022), per example and norm: silent success (a library
    attack saw a misclassified point inside the ball and returned a correctly classified one), incomplete
    optimization (PGD's loss still rising at the end on an example it did not break) and unstable predictions (the
    loss at PGD's point jumps under tiny random perturbations). Silent success and instability are graded against
    `warn_share` / `fail_share` (% of the examples they apply to); incomplete optimization warns above
    `incomplete_warn_share` (PGD's survivors go on to the board's later columns, so it never fails a row)."""

    id, title = "attack-convergence", "Indicators of attack failure"
    attacks = PGD

    def __init__(self, *, steps: int = 40, library_steps: int = 50, examples: int = 100, window: int = 10,
                 rise_share: float = 0.05, noise_draws: int = 8, noise_share: float = 0.01,
                 unstable_change: float = 0.25, norms: list | tuple | None = None, warn_share: float = 5.0,
                 fail_share: float = 25.0, incomplete_warn_share: float = 50.0):
        self.steps, self.library_steps = _count(steps, "steps", 2), _count(library_steps, "library_steps")
        self.examples, self.window = _count(examples, "examples"), _count(window, "window")
        if self.window >= self.steps:
            raise ValueError(f"window ({window}) must be shorter than steps ({steps})")
        self.rise_share, self.unstable_change = _number(rise_share, "rise_share"), _number(unstable_change, "unstable_change")
        self.noise_draws, self.noise_share = _count(noise_draws, "noise_draws"), _number(noise_share, "noise_share")
        self.warn, self.fail = _thresholds(warn_share, fail_share, "% of examples")
        self.incomplete_warn = _number(incomplete_warn_share, "incomplete_warn_share (% of examples)")
        self._setup(norms, None)

    def _requests_at(self, context, norm):
        options = (("eps", rank_eps(context, norm)), ("library_steps", self.library_steps), ("noise_draws", self.noise_draws),
                   ("noise_share", self.noise_share), ("norm", norm.value), ("steps", self.steps))
        return (ProbeRequest(self.name(norm, "convergence"), "attack-convergence", options, self.examples),)

    def indicators(self, m: dict) -> dict[str, tuple[int, int]]:
        """(flagged, judged) examples per indicator."""
        loss, robust = np.asarray(m["loss"]), np.asarray(m["pgd_correct"], dtype=bool)
        best = np.maximum.accumulate(loss, axis=1)  # the best loss so far: a zigzag of fixed steps is not progress
        span = best[:, -1] - loss[:, 0]
        rising = (best[:, -1] - best[:, -1 - self.window]) > self.rise_share * np.maximum(span, 1e-12)
        attacked = np.asarray(m["clean_correct"], dtype=bool)
        silent = np.asarray(m["library_fooled_on_path"], dtype=bool) & np.asarray(m["library_correct"], dtype=bool)
        unstable = np.asarray(m["loss_change"]) > self.unstable_change
        return {"silent success": (int(silent.sum()), int(attacked.sum())),
                "incomplete optimization": (int((rising & robust).sum()), int(robust.sum())),
                "unstable predictions": (int((unstable & attacked).sum()), int(attacked.sum()))}

    def _evaluate_at(self, evidence, norm):
        probe = evidence.requested.get(self.name(norm, "convergence"))
        if probe is None:
            return _missing(self.id, "convergence probe")
        counts = self.indicators(probe.measurements)
        shares = {name: 100 * flagged / judged if judged else 0.0 for name, (flagged, judged) in counts.items()}
        # An unconverged PGD asks for more steps, and the board's later columns run on its survivors: a warning.
        status = max(_grade(shares["silent success"], self.warn, self.fail),
                     _grade(shares["unstable predictions"], self.warn, self.fail),
                     Status.WARN if _above(shares["incomplete optimization"], self.incomplete_warn) else Status.PASS)
        figure = "; ".join(f"{name} {flagged}/{judged}" for name, (flagged, judged) in counts.items())
        worst = max(shares, key=shares.get)
        reason = ("the attacks kept what they found, converged and met a stable loss" if status is Status.PASS else
                  f"{worst}: {shares[worst]:.1f}% of examples ({REMEDY[worst]})")
        return self._verdict(status, figure, reason, **{f"{name} (%)": share for name, share in shares.items()})

    def plot(self, evidences, path):
        def draw(evidence, norm):
            probe = evidence.requested.get(self.name(norm, "convergence"))
            if probe is None:
                return None
            loss = np.asarray(probe.measurements["loss"])
            robust = np.asarray(probe.measurements["pgd_correct"], dtype=bool)
            if not robust.any():
                return None
            span = np.maximum(loss.max(1, keepdims=True) - loss.min(1, keepdims=True), 1e-12)
            normalized = ((loss - loss.min(1, keepdims=True)) / span)[robust].mean(0)
            return list(zip(range(1, loss.shape[1] + 1), 100 * normalized))

        return self._panels(evidences, path, draw, xlabel=lambda norm: "PGD step",
                            ylabel="loss, % of its range (examples PGD left)",
                            title=lambda context, norm: f"PGD's loss on the survivors, {norm.symbol} {rank_eps(context, norm):g}")


REMEDY = {"silent success": "the attack discards adversarial points it found: keep the best point, not the last",
          "incomplete optimization": "the loss still climbs at the last step: more steps or a larger step size",
          "unstable predictions": "the loss jumps under tiny noise: gradients are noisy or shattered; use EOT or BPDA"}
