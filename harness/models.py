"""Model zoo. Every model takes inputs in [0, 1]; any normalization lives inside `forward`.

Each factory takes `num_classes`, `in_channels` and a `width` multiplier (the seeds sweep model capacity).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harness.registry import MODELS, check_keywords


def _scaled(channels: int, width: float) -> int:
    if not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    return max(1, int(round(channels * width)))


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so attacks always work in [0, 1] input units."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ReluDecay(nn.Module):
    """ReluDecay_beta(x) = relu(x) / (1 + beta * relu(x)^2) (Kurakin et al. 2017, Appendix D)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x)
        return r / (1 + self.beta * r * r)


ACTIVATIONS = ("relu", "relu6", "relu-decay", "elu")


def make_activation(name: str, beta: float = 0.01) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "elu":  # Kurakin et al.'s model C: the same network with ELU (alpha 1) instead of ReLU
        return nn.ELU()
    if name == "relu-decay":
        if not beta > 0:
            raise ValueError(f"relu-decay needs activation_beta > 0, got {beta!r}")
        return ReluDecay(beta)
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


class MnistCNN(nn.Module):
    """Two 5x5 conv + max-pool stages and two fully connected layers, for 28 x 28 inputs."""

    def __init__(self, conv1: int, conv2: int, hidden: int, *, num_classes: int, in_channels: int,
                 activation: str = "relu", activation_beta: float = 0.01):
        super().__init__()
        act = lambda: make_activation(activation, activation_beta)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1, 5, padding=2), act(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, 5, padding=2), act(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(conv2 * 7 * 7, hidden), act(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("madry-cnn", input_shape=(1, 28, 28))
def madry_cnn(*, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, activation: str = "relu",
              activation_beta: float = 0.01) -> nn.Module:
    """Madry et al. MNIST CNN: conv 32 5x5, pool, conv 64 5x5, pool, fc 1024, fc 10 (times `width`)."""
    return MnistCNN(_scaled(32, width), _scaled(64, width), _scaled(1024, width), num_classes=num_classes,
                    in_channels=in_channels, activation=activation, activation_beta=activation_beta)


@MODELS.register("small-cnn", input_shape=(1, 28, 28))
def small_cnn(*, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, activation: str = "relu",
              activation_beta: float = 0.01) -> nn.Module:
    """A quarter-size Madry CNN (conv 16, conv 32, fc 128) for fast CPU runs and tests."""
    return MnistCNN(_scaled(16, width), _scaled(32, width), _scaled(128, width), num_classes=num_classes,
                    in_channels=in_channels, activation=activation, activation_beta=activation_beta)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, activation: str, activation_beta: float):
        super().__init__()
        self.act1 = make_activation(activation, activation_beta)
        self.act2 = make_activation(activation, activation_beta)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32 x 32 inputs (He et al. CIFAR layout: 3 stages of `blocks` basic blocks)."""

    def __init__(self, blocks: int, base: int, *, num_classes: int, in_channels: int, mean, std,
                 activation: str = "relu", activation_beta: float = 0.01):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base, 3, padding=1, bias=False), nn.BatchNorm2d(base),
                                  make_activation(activation, activation_beta))
        layers, planes = [], base
        for stage, stage_planes in enumerate((base, 2 * base, 4 * base)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(planes, stage_planes, stride, activation, activation_beta))
                planes = stage_planes
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(planes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(self.normalize(x))))


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@MODELS.register("cifar-resnet20", input_shape=(3, 32, 32))
def cifar_resnet20(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, activation: str = "relu",
                   activation_beta: float = 0.01) -> nn.Module:
    """ResNet-20 for CIFAR-10 (16/32/64 channels times `width`), normalizing with CIFAR-10 statistics."""
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if in_channels == 3 else ((0.5,) * in_channels, (0.25,) * in_channels)
    return CifarResNet(3, _scaled(16, width), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                       activation=activation, activation_beta=activation_beta)


class InputQuantization(nn.Module):
    """Rounds every input to `levels` evenly spaced values in [0, 1] before `model` (bit-depth reduction,
    Xu et al. 2018), with the true derivative of rounding: zero. Its robustness under gradient attacks is
    gradient masking by construction; the sanity checks exist to say so."""

    def __init__(self, model: nn.Module, levels: int):
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
            raise ValueError(f"input quantization needs an integer number of levels >= 2, got {levels!r}")
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


def build_model(name: str, *, num_classes: int, in_channels: int, width: float = 1.0, activation: str = "relu",
                activation_beta: float = 0.01, input_levels: int = 0) -> nn.Module:
    """The registered model `name`; `input_levels` >= 2 wraps it in InputQuantization (0: no quantization)."""
    model = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, width=width, activation=activation,
                             activation_beta=activation_beta)
    return InputQuantization(model, input_levels) if input_levels else model


def build_external(factory: str, options: dict | None = None) -> nn.Module:
    """A user's model, untrained: `package.module:function` called with `options`."""
    import importlib

    module_name, _, function_name = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"external model factory {factory!r}: cannot import {module_name!r} ({error})") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise ValueError(f"external model factory {factory!r}: {module_name} has no callable {function_name!r}")
    try:
        check_keywords(build, dict(options or {}), f"external model factory {factory!r}")
    except ValueError as error:
        raise ValueError(f"options: {error}") from None
    try:
        model = build(**(options or {}))
    except Exception as error:  # the user's code: report what it raised, not a traceback through ours
        raise ValueError(f"external model factory {factory!r} raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"external model factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_external(factory: str, weights, options: dict | None = None) -> nn.Module:
    """A user's model: `package.module:function` called with `options`, loaded strictly from safetensors."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = build_external(factory, options)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"external model weights {str(path)!r} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"external model weights {str(path)!r} are not a readable safetensors file ({error})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"external model weights {str(path)!r} do not fit {factory!r}: {error}") from None
    return model.eval()


def correct_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500,
                        device: torch.device | None = None) -> np.ndarray:
    """Whether `model` classifies each example of (x, y) correctly, in batches (moved to `device` if given), as
    a bool array on the CPU. The model's mode is the caller's business."""
    parts = []
    with torch.no_grad():
        for begin in range(0, len(x), batch_size):
            xb, yb = x[begin : begin + batch_size], y[begin : begin + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            parts.append((model(xb).argmax(1) == yb).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def check_finite_outputs(model: nn.Module, x: torch.Tensor, name: str, *, num_classes: int | None = None) -> None:
    """Raise ValueError unless `model` maps a batch of `x` to finite logits of shape (N, classes): a model with NaN
    weights or outputs gives no score at all, rather than a misleading one."""
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as error:  # the user's forward: report what it raised, not a traceback through ours
        raise ValueError(f"defense {name!r}: its forward pass on a batch of test images of shape {tuple(x.shape)} "
                         f"raised {type(error).__name__}: {error}") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(x):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"defense {name!r}: the model must return logits of shape (batch, classes), got {shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"defense {name!r}: the model returns {logits.shape[1]} logits, the data set has {num_classes} classes")
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(1).sum())
        raise ValueError(f"defense {name!r}: the model gives non-finite logits (NaN or inf) on {bad} of {len(x)} test "
                         "images (NaN weights, or training diverged); it gets no score")


class AveragedOverDraws(nn.Module):
    """Expectation over transformation (Athalye et al. 2018) for a randomized model: the mean of `draws` forward
    passes' logits. Attacks see it in place of the model, so their gradients and their stopping decisions average
    the model's randomness out; the harness still judges each adversarial example by one pass of the model."""

    def __init__(self, model: nn.Module, draws: int):
        super().__init__()
        self.model, self.draws = model, int(draws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.draws)]).mean(0)


def is_randomized(model: nn.Module, x: torch.Tensor, *, passes: int = 4, tolerance: float = 1e-4) -> bool:
    """Whether identical forward passes on `x` disagree (predictions, or logits by more than `tolerance`)."""
    with torch.no_grad():
        outputs = [model(x) for _ in range(passes)]
    return any(bool((o - outputs[0]).abs().max() > tolerance) or bool((o.argmax(1) != outputs[0].argmax(1)).any())
               for o in outputs[1:])
