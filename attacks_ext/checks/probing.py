"""Input gradients and margins that several probes take."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _input_gradient(model: nn.Module, x: torch.Tensor, objective) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(model(x)).sum(), x)
    return grad


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{c != y} z_c per example."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
    return true - other
