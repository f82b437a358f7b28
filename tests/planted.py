"""Models with known evaluation failures, planted for the sanity-check tests (importable as external factories)."""
import torch
from torch import nn

from harness.models import InputQuantization, small_cnn


class RandomizedInput(nn.Module):
    """Adds fresh Gaussian noise to the input on every forward pass, in eval mode too: a randomized defense."""

    def __init__(self, model: nn.Module, sigma: float = 0.3):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class SoftmaxOutput(nn.Module):
    """Returns probabilities instead of logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


def natural():
    return small_cnn()


def quantized():
    return InputQuantization(small_cnn(), 2)


def randomized():
    return RandomizedInput(small_cnn())


def softmax():
    return SoftmaxOutput(small_cnn())


def not_a_module():
    """A broken factory: returns a dict instead of a model."""
    return {}
