"""Registry-wide attack invariants, and our PGD against torchattacks' and ART's."""
import numpy as np
import pytest
import torch

from attacks_ext.base import Attack
from harness.counting import EvaluationCounter
from harness.registry import ATTACKS
from harness.threat import Norm, perturbation_norms, verify
from tests.conftest import accuracy

EPS = {Norm.LINF: 0.2, Norm.L2: 1.5}
FAST = {"steps": 5, "queries": 100}  # enough to exercise the loop; the defaults are for benchmarks
# Minimal-perturbation attacks need more steps to reach the boundary (or a larger step); decision-based ones
# are held to few queries so the registry-wide tests stay quick.
FAST_FOR = {
    "ta-cw-l2": {"steps": 20, "lr": 0.1},
    "ta-deepfool": {"steps": 10},
    "art-cw-l2": {"steps": 10, "binary_search_steps": 2, "learning_rate": 0.1, "initial_const": 1.0},
    "art-hopskipjump": {"steps": 2, "queries": 50, "init_queries": 10},
    "art-hopskipjump-linf": {"steps": 2, "queries": 50, "init_queries": 10},
}


def build(name: str) -> Attack:
    factory = ATTACKS.get(name)
    import inspect

    options = {k: v for k, v in FAST.items() if k in inspect.signature(factory).parameters}
    return factory(**{**options, **FAST_FOR.get(name, {})})


@pytest.fixture(params=list(ATTACKS), ids=list(ATTACKS))
def attack(request) -> Attack:
    return build(request.param)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


_CALLS: dict[str, dict] = {}  # attack name -> what one hostile call left behind (the invariants below read it)


@pytest.fixture()
def hostile_call(attack, natural_model, mnist) -> dict:
    """One call of `attack` on 100 test digits with the model in a mixed train/eval state, an existing gradient on its
    first parameter and torch's and numpy's global generators seeded: each invariant below is its own test, reading
    what that one call left, so the registry-wide tests attack once per attack rather than once per invariant (100
    digits: on 32 a noise attack can leave every one as it was)."""
    if attack.name not in _CALLS:
        x, y = mnist.x_test[:100].clone(), mnist.y_test[:100].clone()
        original = x.clone()
        natural_model.train()
        natural_model.classifier.eval()  # a mixed state must come back exactly as it was
        params = list(natural_model.parameters())
        params[0].grad = torch.ones_like(params[0])  # an existing gradient must survive, values included
        torch.manual_seed(123)
        np.random.seed(123)
        try:
            x_adv = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator())
            after = (torch.rand(1), np.random.rand())
            modes = (natural_model.training, natural_model.features.training, natural_model.classifier.training)
            first_grad = None if params[0].grad is None else params[0].grad.clone()
            other_grads = [p.grad for p in params[1:]]
        finally:
            natural_model.eval()
            params[0].grad = None
        torch.manual_seed(123)
        np.random.seed(123)
        _CALLS[attack.name] = {"x": x, "y": y, "original": original, "x_adv": x_adv, "rng": after,
                               "rng_untouched": (torch.rand(1), np.random.rand()), "modes": modes,
                               "first_grad": first_grad, "other_grads": other_grads}
    return _CALLS[attack.name]


def test_output_is_inside_the_threat_model(attack, hostile_call):
    x, x_adv, eps = hostile_call["x"], hostile_call["x_adv"], EPS[attack.norm]
    verify(x, x_adv, attack.norm, eps)  # raises on any violation
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert float(perturbation_norms(x, x_adv, attack.norm).max()) > 0.5 * eps  # it really perturbs


def test_shape_dtype_device_kept_and_input_untouched(hostile_call):
    x, x_adv = hostile_call["x"], hostile_call["x_adv"]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert torch.equal(x, hostile_call["original"])


def test_zero_eps_changes_nothing(attack, natural_model, batch):
    x, y = batch
    x_adv = attack(natural_model, x, y, eps=0.0, generator=generator())
    assert torch.allclose(x_adv, x, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in ATTACKS if not ATTACKS.info(n)["uses_true_label"]])
def test_label_free_attacks_do_not_read_the_label(name, natural_model, batch):
    """An attack declared label-free (it builds on the prediction, the least-likely class or noise) gives the same
    point whatever labels it is handed: the label-leak board's twins rest on that."""
    attack = build(name)
    x, y = batch
    flipped = (y + 1 + torch.arange(len(y)) % 9) % 10
    assert bool((flipped != y).all())
    first = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator(7))
    assert torch.equal(first, attack(natural_model, x, flipped, eps=EPS[attack.norm], generator=generator(7)))


def test_same_seed_same_output(attack, natural_model, batch):
    x, y = batch
    first = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator(7))
    second = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator(7))
    assert torch.equal(first, second)


def test_global_rng_untouched(hostile_call):
    (torch_after, numpy_after), (torch_expected, numpy_expected) = hostile_call["rng"], hostile_call["rng_untouched"]
    assert torch.equal(torch_after, torch_expected) and numpy_after == numpy_expected


def test_model_mode_and_gradients_restored(hostile_call):
    assert hostile_call["modes"] == (True, True, False)
    assert hostile_call["first_grad"] is not None and torch.equal(hostile_call["first_grad"],
                                                                  torch.ones_like(hostile_call["first_grad"]))
    assert all(grad is None for grad in hostile_call["other_grads"])


def test_robust_accuracy_at_most_clean(hostile_call, natural_model):
    x, y, x_adv = hostile_call["x"], hostile_call["y"], hostile_call["x_adv"]
    with torch.no_grad():
        clean = natural_model(x).argmax(1) == y
        robust = clean & (natural_model(x_adv).argmax(1) == y)
    assert robust.float().mean() < clean.float().mean()


@pytest.mark.parametrize("eps, message", [(-0.1, ">= 0"), (float("nan"), "finite"), (8.0, "8/255")])
def test_bad_eps_is_a_clear_error(natural_model, batch, eps, message):
    x, y = batch
    with pytest.raises(ValueError, match=message):
        ATTACKS.get("pgd-linf")(steps=1)(natural_model, x, y, eps=eps)


def test_counter_counts_every_model_evaluation(natural_model, batch):
    x, y = batch
    counter = EvaluationCounter(natural_model)
    ATTACKS.get("pgd-linf")(steps=7)(counter, x, y, eps=0.1, generator=generator())
    assert counter.forward_evals == 7 * len(x) and counter.gradient_evals == 7 * len(x)


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps, ids", [
    (Norm.LINF, 0.1, ("pgd-linf", "ta-pgd-linf", "art-pgd-linf")),
    (Norm.L2, 1.5, ("pgd-l2", "ta-pgd-l2", "art-pgd-l2")),
])
def test_our_pgd_agrees_with_torchattacks_and_art(natural_model, mnist, norm, eps, ids):
    """Same model, same settings (20 steps, step 2.5 * eps / 20, random start): within 2 points."""
    x, y = mnist.x_test[:500], mnist.y_test[:500]
    robust = {}
    for name in ids:
        x_adv = ATTACKS.get(name)(steps=20)(natural_model, x, y, eps=eps, generator=generator())
        verify(x, x_adv, norm, eps)
        robust[name] = 100 * accuracy(natural_model, x_adv, y)
    assert 5 < robust[ids[0]] < 95, f"eps {eps} does not discriminate: {robust}"
    assert max(robust.values()) - min(robust.values()) <= 2.0, robust
