"""Counting model evaluations: the portable currency of attack cost."""
from __future__ import annotations

import torch
from torch import nn


class EvaluationCounter(nn.Module):
    """Wraps a model and counts examples sent forward and examples whose gradient flowed back through it.

    Library attacks see an ordinary module, so their calls are counted without their cooperation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_evals = 0
        self.gradient_evals = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        batch = int(x.shape[0])
        self.forward_evals += batch
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(batch))
        return out

    def _count_backward(self, batch: int) -> None:
        self.gradient_evals += batch
