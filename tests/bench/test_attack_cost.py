"""Attack cost: pytest-benchmark timings of every registered attack (`tox -e bench`).

Fixed model (a naturally trained small CNN, seed 0) and fixed batches of the first 1, 16 and 256 mnist5k test
digits. Each attack's benchmark carries its exact model-evaluation counts in `extra_info`; the `floor`
group times one forward + backward (input gradient) of the same batch, so a k-gradient attack's floor is
k x that. `python -m harness attack-cost` renders leaderboards/attack-cost.md from the saved JSON.

Ratios are paired: before each timed round of an attack, a few forward + backward passes of the same batch (or,
for an adapter's bare library call, one call through the adapter) are timed, and the ratio is the median over
rounds of each round's quotient. On a shared machine whose speed drifts by a quarter between minutes, a ratio of
two medians taken minutes apart measured the drift (step-ll read 1.68x its floor in one run, 1.01x in the next).
"""
import inspect
import math
import statistics
import time

import pytest
import torch

from attacks_ext.base import ExampleRandomness
from attacks_ext.pgd import cross_entropy_gradient, random_start
from defenses.recipes import build_recipe
from harness.reports.attack_cost import library_of
from defenses.train import train
from harness.counting import EvaluationCounter
from harness.registry import ATTACKS
from harness.threat import Norm

BATCHES = (1, 16, 256)
EPS = {Norm.LINF: 0.3, Norm.L2: 2.0}
# The benchmarked budget of each attack (the registry defaults, except where a default budget would take
# minutes per call on CPU; attack-cost.md names the budget next to the attack). AutoAttack at its full budget
# is timed on a defense by `python -m harness strength-per-cost` instead.
OPTIONS = {
    "ta-apgd-ce": {"steps": 50}, "ta-apgd-ce-l2": {"steps": 50}, "ta-apgd-dlr": {"steps": 50},
    "ta-apgd-dlr-l2": {"steps": 50}, "ta-apgd-t": {"steps": 50, "targets": 4}, "ta-apgd-t-l2": {"steps": 50, "targets": 4},
    "ta-fab-t": {"steps": 20, "targets": 3}, "ta-fab-t-l2": {"steps": 20, "targets": 3},
    "autoattack-standard": {"steps": 10, "queries": 500}, "autoattack-standard-l2": {"steps": 10, "queries": 500},
    "aa-standard": {"steps": 10, "queries": 500}, "aa-standard-l2": {"steps": 10, "queries": 500},
    "ta-autoattack": {"queries": 500}, "ta-autoattack-l2": {"queries": 500},
    "ta-deepfool": {"steps": 10}, "art-cw-l2": {"steps": 10, "binary_search_steps": 3},
    "art-hopskipjump": {"steps": 5, "queries": 100, "init_queries": 10},
    "art-hopskipjump-linf": {"steps": 5, "queries": 100, "init_queries": 10},
}


def family(name: str) -> str:
    """The benchmark group: the attack's own family, with PGD-like attacks (PGD, APGD, S-O) apart from the
    other iterative ones."""
    attack = ATTACKS.get(name)()
    if attack.family in ("noise", "gradient-free", "one-step"):
        return attack.family
    base = name.removeprefix("ta-").removeprefix("art-")
    if base.startswith(("autoattack", "aa-")):
        return "autoattack"
    if getattr(attack, "minimal", False):
        return "minimal-norm"
    return "pgd" if base.startswith(("pgd", "apgd", "so-")) else "iterative"


@pytest.fixture(scope="module")
def cost_model(mnist):
    torch.manual_seed(0)
    model, _ = train(build_recipe("natural", epochs=2), mnist, seed=0, progress=False)
    return model


FLOOR_SAMPLE = 10  # forward + backward passes timed before each round (5 left the paired ratio +-5% between runs)


class Paired:
    """Times `reference` right before each timed round of `call` (as pytest-benchmark's untimed `setup`), so that
    the two see the machine at the same speed; `run` gives the (call, reference) seconds of every timed round."""

    def __init__(self, call, reference, *, warmup_rounds: int = 1):
        self.call, self.reference, self.warmup = call, reference, warmup_rounds
        self.references, self.calls = [], []

    def setup(self):
        start = time.perf_counter()
        self.reference()
        self.references.append(time.perf_counter() - start)

    def target(self):
        start = time.perf_counter()
        result = self.call()
        self.calls.append(time.perf_counter() - start)
        return result

    def run(self, benchmark, rounds: int) -> list[float]:
        """call time / reference time of each timed round."""
        benchmark.pedantic(self.target, setup=self.setup, rounds=rounds, iterations=1, warmup_rounds=self.warmup)
        ratios = [call / reference for call, reference in zip(self.calls, self.references)]
        return ratios[self.warmup:] or ratios  # a disabled benchmark (no --benchmark-enable) runs once, no warm-up


def rounds_for(batch: int, gradients_per_example: float) -> int:
    """pytest-benchmark rounds of one call: many for calls of a gradient or two per example (a few
    milliseconds, whose median of 3 rounds was noise: 1.0 to 1.7 times the floor between runs), few for the
    long ones."""
    if gradients_per_example <= 2:
        return 15
    return 5 if batch < 256 else 3


# Where the floor's forward + backward is taken. Its cost depends on the input, not just its shape: the floor of
# every ratio is the clean digits, as defined; the others show what a gradient costs at the points attacks visit.
FLOOR_INPUTS = {
    "clean": lambda x, rng: x,
    "linf-ball": lambda x, rng: random_start(x, EPS[Norm.LINF], Norm.LINF, rng),
    "gaussian": lambda x, rng: x + 0.1 * rng.randn(*x.shape[1:]),  # S-O's default sigma
}


@pytest.mark.parametrize("inputs", list(FLOOR_INPUTS))
@pytest.mark.parametrize("batch", BATCHES)
def test_floor(benchmark, cost_model, mnist, batch, inputs):
    """One forward + backward (input gradient) of the batch: the unit every gradient attack pays per step; at the
    clean digits (the floor), a random point of the Linf ball (PGD's start) and x + N(0, 0.1^2) (S-O's draws)."""
    clean, y = mnist.x_test[:batch], mnist.y_test[:batch]
    x = FLOOR_INPUTS[inputs](clean, ExampleRandomness(0, range(batch)))
    benchmark.group = f"floor batch={batch}"
    benchmark.extra_info.update({"attack": "floor", "batch": batch, "library": "-", "family": "floor", "inputs": inputs})
    rounds = 20 if batch < 256 else 10
    if inputs == "clean":
        benchmark.pedantic(lambda: cross_entropy_gradient(cost_model, x, y), rounds=rounds, iterations=1, warmup_rounds=2)
        return
    # Against the clean digits timed right before each round: the columns' medians alone carry the drift.
    ratios = Paired(lambda: cross_entropy_gradient(cost_model, x, y),
                    lambda: cross_entropy_gradient(cost_model, clean, y), warmup_rounds=2).run(benchmark, rounds)
    benchmark.extra_info["clean_ratio"] = statistics.median(ratios)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_cost(benchmark, cost_model, mnist, name, batch):
    factory = ATTACKS.get(name)
    options = {k: v for k, v in OPTIONS.get(name, {}).items() if k in inspect.signature(factory).parameters}
    attack = factory(**options)
    x, y = mnist.x_test[:batch], mnist.y_test[:batch]
    eps = EPS[attack.norm]
    counter = EvaluationCounter(cost_model)
    attack(counter, x, y, eps=eps, generator=torch.Generator().manual_seed(0))  # one counted call
    benchmark.group = f"{family(name)} batch={batch}"
    benchmark.extra_info.update({
        "attack": name, "batch": batch, "library": library_of(name), "family": family(name), "eps": eps,
        "options": options, "forward_evals": counter.forward_evals, "gradient_evals": counter.gradient_evals,
    })
    gradients = counter.gradient_evals / batch
    rounds = rounds_for(batch, gradients)

    def call():
        return attack(cost_model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))

    if not gradients:  # no floor to compare with
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
        return
    # Before each round, up to FLOOR_SAMPLE passes read the machine's speed; the floor is k of them.
    sample = min(math.ceil(gradients), FLOOR_SAMPLE)

    def floor_sample():
        for _ in range(sample):
            cross_entropy_gradient(cost_model, x, y)

    ratios = Paired(call, floor_sample).run(benchmark, rounds)
    benchmark.extra_info["floor_ratio"] = statistics.median(ratios) * sample / gradients


def _bare_torchattacks(build):
    def call(model, x, y, eps):
        return build(model, eps)(x, y)
    return call


def _bare_art(build):
    def call(model, x, y, eps):
        from art.estimators.classification import PyTorchClassifier

        classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                       nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
        return build(classifier, eps, len(x)).generate(x=x.numpy(), y=y.numpy())
    return call


def _bare_calls() -> dict:
    """Each adapter's library call as a user would write it, with the adapter's settings at the benchmarked
    budget (PGD: 40 steps of 2.5 eps / 40, one random start; FGSM: one step of eps)."""
    import numpy as np
    import torchattacks
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch

    return {
        "ta-pgd-linf": _bare_torchattacks(lambda m, eps: torchattacks.PGD(m, eps=eps, alpha=2.5 * eps / 40, steps=40,
                                                                           random_start=True)),
        "ta-fgsm": _bare_torchattacks(lambda m, eps: torchattacks.FGSM(m, eps=eps)),
        "art-pgd-linf": _bare_art(lambda c, eps, batch: ProjectedGradientDescentPyTorch(
            c, norm=np.inf, eps=eps, eps_step=2.5 * eps / 40, max_iter=40, num_random_init=1, batch_size=batch, verbose=False)),
        "art-fgm-linf": _bare_art(lambda c, eps, batch: FastGradientMethod(c, norm=np.inf, eps=eps, eps_step=eps,
                                                                            batch_size=batch)),
    }


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["ta-pgd-linf", "ta-fgsm", "art-pgd-linf", "art-fgm-linf"])
def test_bare_library_call(benchmark, cost_model, mnist, name, batch):
    """The library call behind an adapter, without the adapter (its eval mode, RNG isolation, gradient and mode
    restore, per-call model wrapping), each round right after one call through the adapter: attack-cost.md
    shows the median over rounds of adapter time / library time."""
    call = _bare_calls()[name]
    x, y = mnist.x_test[:batch], mnist.y_test[:batch]
    benchmark.group = f"adapter overhead batch={batch}"
    benchmark.extra_info.update({"attack": name, "bare": True, "batch": batch, "library": library_of(name),
                                 "family": "bare library call"})
    adapter = ATTACKS.get(name)()  # its defaults are the settings of the bare call
    gradients = 1 if adapter.family == "one-step" else 40  # the benchmarked PGD budget

    def through_adapter():
        return adapter(cost_model, x, y, eps=0.3, generator=torch.Generator().manual_seed(0))

    ratios = Paired(lambda: call(cost_model, x, y, 0.3), through_adapter).run(benchmark, rounds_for(batch, gradients))
    benchmark.extra_info["adapter_ratio"] = statistics.median(1 / ratio for ratio in ratios)  # adapter / bare
