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


def test_output_is_inside_the_threat_model(attack, natural_model, batch):
    x, y = batch
    eps = EPS[attack.norm]
    x_adv = attack(natural_model, x, y, eps=eps, generator=generator())
    verify(x, x_adv, attack.norm, eps)  # raises on any violation
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert float(perturbation_norms(x, x_adv, attack.norm).max()) > 0.5 * eps  # it really perturbs


def test_shape_dtype_device_kept_and_input_untouched(attack, natural_model, batch):
    x, y = batch
    original = x.clone()
    x_adv = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator())
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert torch.equal(x, original)


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


def test_global_rng_untouched(attack, natural_model, batch):
    x, y = batch
    torch.manual_seed(123)
    np.random.seed(123)
    attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator())
    after_torch, after_numpy = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(after_torch, torch.rand(1)) and after_numpy == np.random.rand()


def test_model_mode_and_gradients_restored(attack, natural_model, batch):
    x, y = batch
    natural_model.train()
    natural_model.classifier.eval()  # a mixed state must come back exactly as it was
    params = list(natural_model.parameters())
    params[0].grad = torch.ones_like(params[0])  # an existing gradient must survive, values included
    try:
        attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator())
        assert natural_model.training and natural_model.features.training and not natural_model.classifier.training
        assert torch.equal(params[0].grad, torch.ones_like(params[0]))
        assert all(p.grad is None for p in params[1:])
    finally:
        natural_model.eval()
        params[0].grad = None


def test_robust_accuracy_at_most_clean(attack, natural_model, mnist):
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    x_adv = attack(natural_model, x, y, eps=EPS[attack.norm], generator=generator())
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
