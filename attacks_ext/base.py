"""The one attack interface.

An attack is a name, a norm, whether it reads the true label, and
`__call__(model, x, y, *, eps, generator, stop_when_fooled) -> x_adv` with inputs in [0, 1] on any device.
The base class validates eps, puts the model in eval mode and restores every module's mode and every
parameter's `.grad` afterwards, so an attack never leaves a trace on the model it was given. Subclasses
implement `run`. Threat-model enforcement is the harness's job (`harness.threat.verify`), not the attack's.

Randomness is per example (`ExampleRandomness`): example i's random start and noise draws come from its own
stream seeded by (seed, example index), so an example's adversarial point does not depend on the batch size,
on which examples share its batch, or on examples leaving the batch (early stop, the evaluation cascade).
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
from typing import Iterable

import numpy as np
import torch
from torch import nn

from harness.registry import Choice, Family
from harness.threat import Norm, check_eps  # noqa: F401  (check_eps: re-exported for attacks)


FAMILIES = tuple(f.value for f in Family)


class LabelMode(Choice):
    """The label a one-step direction is built from (Kurakin et al. 2017): the true one (it leaks labels), the
    model's prediction, its least-likely class, a random other class, or none (the prediction's entropy)."""

    TRUE = "true"
    PREDICTED = "predicted"
    LEAST_LIKELY = "least-likely"
    RANDOM = "random"
    ENTROPY = "entropy"


class ExampleRandomness:
    """One random stream per example, seeded by (seed, example index); every draw returns one row per example.

    Draws are made on the CPU so every device sees the same numbers. `subset` keeps the streams of the
    examples still in play, so the others' draws do not shift when an example leaves the batch.
    """

    def __init__(self, seed: int, indices: Iterable[int], *, _streams: list | None = None,
                 _positions: list[int] | None = None):
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        # A stream is made at its first draw (most attacks never draw, and a generator per example costs a few
        # microseconds each). A subset shares its parent's list of streams and names its slots in it.
        self._streams = _streams if _streams is not None else [None] * len(self.indices)
        self._positions = _positions if _positions is not None else list(range(len(self.indices)))

    @staticmethod
    def stream_seed(seed: int, index) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, keep: torch.Tensor) -> "ExampleRandomness":
        """The streams of the examples at positions `keep` (an index tensor), sharing their state."""
        positions = keep.tolist()
        return ExampleRandomness(self.seed, [self.indices[k] for k in positions], _streams=self._streams,
                                 _positions=[self._positions[k] for k in positions])

    def _generators(self) -> list[torch.Generator]:
        for slot, index in zip(self._positions, self.indices):
            if self._streams[slot] is None:
                self._streams[slot] = torch.Generator().manual_seed(self.stream_seed(self.seed, index))
        return [self._streams[slot] for slot in self._positions]

    def _draw(self, sample, shape: tuple, dtype) -> torch.Tensor:
        if not self.indices:
            return torch.empty((0, *shape), dtype=dtype)
        return torch.stack([sample(shape, generator=g, dtype=dtype) for g in self._generators()])

    def rand(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) of shape (N, *shape)."""
        return self._draw(torch.rand, tuple(shape), dtype)

    def randn(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) of shape (N, *shape)."""
        return self._draw(torch.randn, tuple(shape), dtype)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """One integer in [low, high) per example, shape (N,)."""
        if not self.indices:
            return torch.empty((0,), dtype=torch.long)
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self._generators()])

    def library_seed(self) -> int:
        """One 31-bit seed for a library call on this batch. Libraries draw for the whole batch from a global
        RNG, so their draws depend on the batch's composition; ours do not."""
        return self.stream_seed(self.seed, ",".join(map(str, self.indices))) % (2**31 - 1)


class Attack(abc.ABC):
    """Base class of every attack; see the module docstring for the contract."""

    norm: Norm
    uses_true_label: bool = True
    uses_gradients: bool = True  # False for noise baselines; gradient-free attacks set it too
    family: str = "iterative"  # one of FAMILIES; the sanity checks compare families against each other
    per_example_eps: bool = False  # True where `run` accepts eps as an (N, 1, ..., 1) tensor

    def __init__(self, name: str, norm: Norm | str, *, uses_true_label: bool = True, family: str | None = None):
        self.name = name
        self.norm = Norm.parse(norm)
        self.uses_true_label = uses_true_label
        if family is not None:
            self.family = Family.parse(family).value
            self.uses_gradients = family in ("one-step", "iterative")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, norm={self.norm.value})"

    stops_early: bool = False  # True where `run` takes `stop_when_fooled` (our iterative attacks)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 generator: torch.Generator | ExampleRandomness | None = None,
                 stop_when_fooled: bool = False) -> torch.Tensor:
        """x_adv for the batch. `generator`: an `ExampleRandomness` for per-example streams (the matrix passes
        one seeded by the cell and indexed by example), or a torch.Generator whose next draw seeds streams
        indexed 0..N-1 (training). `stop_when_fooled`: an example leaves the attack at its first misclassified
        iterate, which is kept (attacks without early stop ignore it and run to the end)."""
        eps = check_eps(eps, self.norm)
        if isinstance(eps, torch.Tensor):
            if not self.per_example_eps:
                raise TypeError(f"{self.name} takes one eps per batch; per-example eps needs one of our own attacks")
            if len(eps) != len(x):
                raise ValueError(f"per-example eps has {len(eps)} entries for a batch of {len(x)}")
            eps = eps.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if isinstance(generator, ExampleRandomness):
            if len(generator) != len(x):
                raise ValueError(f"ExampleRandomness holds {len(generator)} streams for a batch of {len(x)}")
            rng = generator
        else:
            rng = ExampleRandomness(seed_from(generator if generator is not None else torch.Generator().manual_seed(0)),
                                    range(len(x)))
        modes = [(module, module.training) for module in model.modules()]
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        model.eval()
        try:
            with torch.enable_grad():
                early = {"stop_when_fooled": stop_when_fooled} if self.stops_early else {}
                x_adv = self.run(model, x.detach(), y.detach(), eps=eps, rng=rng, **early)
        finally:
            for module, training in modes:
                module.training = training
            for p, grad in grads:
                p.grad = grad
        return x_adv.detach().to(device=x.device, dtype=x.dtype)

    @abc.abstractmethod
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
            rng: ExampleRandomness) -> torch.Tensor:
        """Return x_adv for the batch; model is in eval mode; eps a float or an (N, 1, ..., 1) tensor."""

    def evaluations_to_end(self, examples: int, eps: float) -> tuple[int, int] | None:
        """(forward, gradient) evaluations of a run to the end on `examples` examples without early stop, where
        the attack knows it exactly (the cost early stop is measured against); None where it does not."""
        return None


def seed_from(generator: torch.Generator) -> int:
    """Draw a 31-bit seed from our generator for libraries that only read global RNG state."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@contextlib.contextmanager
def isolated_global_rng(seed: int, device: torch.device):
    """Seed torch's global RNG for `device` (and the CPU's) and numpy's for a library call, and restore them
    afterwards. Only the generators that are restored are seeded: `torch.manual_seed` would also reseed every
    other accelerator's generator for good (and costs a millisecond per call queueing those seeds)."""
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for cuda_device in devices:
            with torch.cuda.device(cuda_device):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
