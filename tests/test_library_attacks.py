"""AutoAttack at its published budgets, the minimal-perturbation adapters, and PGD on the CW margin loss."""
import numpy as np
import pytest
import torch
from torch import nn

from attacks_ext.base import isolated_global_rng
from attacks_ext.pgd import margin_gradient
from harness.registry import ATTACKS
from harness.threat import Norm, perturbation_norms


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()


def test_autoattack_standard_has_the_original_budgets_and_the_shipped_set_does_not(natural_model):
    """APGD-CE 100, APGD-T 9 targets x 100, FAB-T 9 x 100, Square 5,000; torchattacks' own set has 10 steps."""
    ours = ATTACKS.get("autoattack-standard")()._build(natural_model, 0.3, 0, classes=10).attacks
    assert [type(a).__name__ for a in ours] == ["APGD", "APGDT", "FAB", "Square"]
    apgd, apgdt, fab, square = ours
    assert apgd.steps == 100 and apgd.loss == "ce" and apgd.n_restarts == 1
    assert apgdt.steps == 100 and apgdt.n_target_classes == 9
    assert fab.steps == 100 and fab.multi_targeted and fab.n_target_classes == 9
    assert square.n_queries == 5000
    shipped = ATTACKS.get("ta-autoattack")()._build(natural_model, 0.3, 0, classes=10)._autoattack.attacks
    assert [a.steps for a in shipped[:3]] == [10, 10, 10] and shipped[3].n_queries == 5000


def test_autoattack_standard_cascades_and_is_no_weaker_than_its_first_attack(natural_model, mnist):
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    budget = {"steps": 10, "queries": 200}
    whole = ATTACKS.get("autoattack-standard")(**budget)(natural_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    first = ATTACKS.get("ta-apgd-ce")(steps=10)(natural_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust_whole = (natural_model(whole).argmax(1) == y).float().mean()
        robust_first = (natural_model(first).argmax(1) == y).float().mean()
    assert robust_whole <= robust_first and float(perturbation_norms(x, whole, Norm.LINF).max()) <= 0.1 + 1e-6


@pytest.mark.parametrize("name", ["ta-deepfool", "ta-cw-l2"])
def test_minimal_perturbation_attacks_are_projected_onto_the_ball(natural_model, mnist, name):
    """A minimal-norm point outside the ball is projected onto it: norms never exceed eps, some sit on it."""
    x, y = mnist.x_test[:24], mnist.y_test[:24]
    options = {"steps": 10} if name == "ta-deepfool" else {"steps": 30, "lr": 0.1}
    x_adv = ATTACKS.get(name)(**options)(natural_model, x, y, eps=0.5, generator=torch.Generator().manual_seed(0))
    norms = perturbation_norms(x, x_adv, Norm.L2)
    assert float(norms.max()) <= 0.5 + 1e-4 and bool((norms > 0.49).any())


def test_a_library_call_sees_the_global_rngs_as_after_manual_seed():
    """What a library draws inside the isolation is what it would draw after torch.manual_seed(seed) and
    np.random.seed(seed); the generators are put back afterwards."""
    torch.manual_seed(0)
    np.random.seed(0)
    before = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    with isolated_global_rng(42, torch.device("cpu")):
        inside = torch.rand(5), np.random.rand(5)
    assert torch.equal(torch.random.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    torch.manual_seed(42)
    np.random.seed(42)
    assert torch.equal(inside[0], torch.rand(5)) and np.array_equal(inside[1], np.random.rand(5))


def test_hopskipjump_starts_come_from_each_examples_stream(natural_model, mnist):
    attack = ATTACKS.get("art-hopskipjump")(steps=1, queries=20, init_queries=10)
    from attacks_ext.base import ExampleRandomness

    x = mnist.x_test[:6]
    start, found = attack.starts(natural_model, x, ExampleRandomness(3, range(6)))
    alone, found_alone = attack.starts(natural_model, x[4:5], ExampleRandomness(3, [4]))
    assert found.all() and torch.equal(start[4:5], alone)
    with torch.no_grad():
        assert (natural_model(start).argmax(1) != natural_model(x).argmax(1)).all()


def test_margin_gradient_is_the_closed_form_on_a_linear_model(mnist):
    model = linear_model()
    x, y = mnist.x_test[:8], mnist.y_test[:8]
    grad, logits = margin_gradient(model, x, y)
    weight = model[1].weight.detach()
    runner_up = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    expected = (weight[runner_up] - weight[y]).view_as(grad)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_pgd_on_the_margin_loss_breaks_examples_and_differs_from_cross_entropy(natural_model, mnist):
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    runs = {}
    for loss in ("ce", "cw"):
        x_adv = ATTACKS.get("pgd-linf")(steps=10, loss=loss)(natural_model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0))
        runs[loss] = x_adv
    with torch.no_grad():
        clean = (natural_model(x).argmax(1) == y).float().mean()
        robust = (natural_model(runs["cw"]).argmax(1) == y).float().mean()
    assert robust < clean and not torch.equal(runs["ce"], runs["cw"])
    with pytest.raises(ValueError, match="loss 'hinge' unknown; allowed: 'ce', 'cw'"):
        ATTACKS.get("pgd-linf")(loss="hinge")


@pytest.mark.parametrize("name, options, message", [
    ("autoattack-standard", {"steps": 0}, "steps must be a positive integer"),
    ("ta-autoattack", {"queries": 2.5}, "queries must be a positive integer"),
    ("ta-cw-l2", {"c": 0}, "c and lr must be > 0"),
    ("art-hopskipjump", {"init_queries": 0}, "init_queries must be a positive integer"),
])
def test_bad_budgets_are_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        ATTACKS.get(name)(**options)
