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


def keyed(check, context, named: dict, defense: str = "d") -> dict:
    """Hand-made evidence keyed as the store's is: each request name replaced by the check's request of that name
    (an unknown name is an error, so a test cannot plant evidence that no check would read)."""
    requests = {request.name: request for request in check.requests_for(context, defense)}
    unknown = sorted(set(named) - set(requests))
    if unknown:
        raise KeyError(f"{unknown} name no request of {check.id}; its requests: {sorted(requests)}")
    return {requests[name]: record for name, record in named.items()}
