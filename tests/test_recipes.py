"""Each recipe's defining property, on a tiny model and data."""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import defenses.train as training
from attacks_ext.base import Attack
from defenses.recipes import build_recipe
from defenses.train import (draw_eps, kurakin_loss, recipe_loss, smoothed_cross_entropy, squeeze_term, train,
                            trades_adversary, trades_kl)
from harness.data import Dataset
from harness.models import ReluDecay, build_model
from harness.registry import ATTACKS, DEFENSES
from harness.threat import Norm
from tests.conftest import accuracy


@pytest.fixture(scope="module")
def micro(mnist) -> Dataset:
    """64 training digits: enough for the loop to take a few steps in milliseconds."""
    return Dataset("micro", mnist.x_train[:64], mnist.y_train[:64], mnist.x_test[:32], mnist.y_test[:32], 10)


class SpyAttack(Attack):
    """Records every call the training loop makes (batch, eps, crafting model) and returns x unchanged."""

    per_example_eps = True
    calls: list = []

    def __init__(self, norm=Norm.LINF):
        super().__init__("spy", norm)

    def run(self, model, x, y, *, eps, rng):
        SpyAttack.calls.append({"n": len(x), "eps": eps.flatten().clone(), "model": model})
        return x.clone()


@pytest.fixture()
def spy(monkeypatch):
    SpyAttack.calls = []
    monkeypatch.setitem(ATTACKS._entries, "spy", lambda: SpyAttack())
    monkeypatch.setitem(ATTACKS._entries, "spy-l2", lambda: SpyAttack(Norm.L2))
    return SpyAttack.calls


def test_every_named_recipe_is_registered_and_valid():
    expected = {"natural", "pgd-at", "pgd-at-l2", "mixed-norm-at", "trades", "fgsm-at", "step-ll-at", "step-rnd-at",
                "half-normal-fgsm-at", "ensemble-at", "gaussian-noise", "label-smoothing", "logit-squeezing",
                "ls-gn", "lsq-gn", "atda"}
    assert expected <= set(DEFENSES)
    for name in DEFENSES:
        assert build_recipe(name).name == name


def test_k_of_m_adversarial_examples_with_per_example_eps_and_delay(micro, spy):
    recipe = build_recipe("fgsm-at", adversary="spy", batch_size=16, epochs=1, delay_steps=1)
    train(recipe, micro, seed=0, progress=False)
    assert len(spy) == 3  # 4 minibatches of 16, the first clean-only (delay)
    assert all(call["n"] == 8 for call in spy)  # k = round(0.5 * 16)
    eps = torch.cat([call["eps"] for call in spy])
    assert float(eps.min()) >= 0 and float(eps.max()) <= 0.3 and len(set(eps.tolist())) > 10


def test_kurakin_loss_weights_adversarial_examples_by_lambda():
    per_example = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    k, lam = 2, 0.3
    expected = ((3.0 + 4.0 + 5.0) + lam * (1.0 + 2.0)) / ((5 - k) + lam * k)
    assert float(kurakin_loss(per_example, k, lam)) == pytest.approx(expected)
    assert float(kurakin_loss(per_example, 0, lam)) == pytest.approx(3.0)
    assert float(kurakin_loss(per_example, 5, lam)) == pytest.approx(3.0)


def test_eps_draws_follow_the_truncated_half_normal():
    recipe = build_recipe("fgsm-at")  # sigma 0.15 truncated to [0, 0.3]
    draws = draw_eps(recipe, 0.3, 20000, torch.Generator().manual_seed(0)).double().numpy()
    assert draws.min() >= 0 and draws.max() <= 0.3
    reference = stats.truncnorm(a=0, b=0.3 / 0.15, loc=0, scale=0.15)
    assert stats.kstest(draws, reference.cdf).pvalue > 0.01
    fixed = draw_eps(build_recipe("pgd-at"), 0.3, 5, torch.Generator())
    assert fixed.tolist() == pytest.approx([0.3] * 5)


def test_label_smoothing_targets():
    logits = torch.randn(4, 10)
    y = torch.tensor([0, 3, 9, 3])
    alpha = 0.5
    target = torch.full((4, 10), alpha / 10)
    target[torch.arange(4), y] = 1 - alpha + alpha / 10  # y_hot - alpha * (y_hot - 1/C)
    assert torch.allclose(target.sum(1), torch.ones(4))
    expected = -(target * F.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(smoothed_cross_entropy(logits, y, alpha), expected)
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y, reduction="none"))


def test_logit_squeezing_term_in_each_form():
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    ce = F.cross_entropy(logits, y)
    frobenius = torch.sqrt((logits ** 2).sum())
    per_example = torch.stack([row.norm() for row in logits]).mean()
    assert torch.allclose(squeeze_term(logits, "batch-frobenius"), frobenius)
    assert torch.allclose(squeeze_term(logits, "per-example-mean"), per_example)
    as_written = build_recipe("logit-squeezing", logit_squeeze_form="batch-frobenius", logit_squeeze=0.5)
    assert torch.allclose(recipe_loss(as_written, logits, y, 0), ce + 0.5 * frobenius)
    summed = build_recipe("logit-squeezing", logit_squeeze=0.5)  # the paper's: summed cross-entropy
    assert summed.logit_squeeze_form == "batch-frobenius-sum-ce"
    assert torch.allclose(recipe_loss(summed, logits, y, 0), 6 * ce + 0.5 * frobenius)
    mean = build_recipe("logit-squeezing", logit_squeeze_form="per-example-mean", logit_squeeze=2.0)
    assert torch.allclose(recipe_loss(mean, logits, y, 0), ce + 2.0 * per_example)


def test_trades_loss_against_a_direct_computation(natural_model, mnist):
    x, y = mnist.x_test[:16], mnist.y_test[:16]
    x_adv = trades_adversary(natural_model, x, eps=0.3, steps=5, generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = natural_model(x), natural_model(x_adv)
    p, q = F.softmax(clean, 1), F.softmax(adv, 1)
    direct = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(trades_kl(clean, adv), direct, atol=1e-6)
    with torch.no_grad():
        nudged = natural_model(x + 0.001)
    assert float(direct) > float(trades_kl(clean, nudged))  # the ascent raised the KL
    recipe = build_recipe("trades", trades_beta=3.0)
    assert torch.allclose(recipe_loss(recipe, clean, y, 0) + 3.0 * trades_kl(clean, adv),
                          F.cross_entropy(clean, y) + 3.0 * direct, atol=1e-5)


def test_trades_trains_and_records_adversarial_accuracy(micro):
    _, log = train(build_recipe("trades", epochs=1, trades_steps=2, batch_size=32), micro, seed=0, progress=False)
    assert log.epochs[0]["adversary_accuracy"] is not None
    # training pass, the inner maximization's clean reference (eval mode, as TRADES does), 2 ascent steps,
    # and the adversarial pass of the KL term
    assert log.forward_passes == 64 * (1 + 1 + 2 + 1)


def test_atda_terms_against_a_hand_computation():
    """Song et al. 2019, Sec. 3: numbers worked out by hand on two examples and two classes."""
    clean, adversarial = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.zeros(2, 2)
    # clean logits about their mean (2, 1): (-1, -1), (1, 1) -> second moments [[2, 2], [2, 2]]; the adversarial
    # ones are all zero: CORAL = mean |2| = 2; mean matching = mean(|2 - 0|, |1 - 0|) = 1.5
    assert float(training.atda_alignment(clean, adversarial)) == pytest.approx(3.5)
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # z = (1, 0) of class 0: |z - c_0|_1 = 0, |z - c_1|_1 = 2; one other class: softplus(0 - 2) = log(1 + e^-2)
    assert float(training.atda_margin(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), centers)) == pytest.approx(
        math.log1p(math.exp(-2)))
    # two examples of class 0 at (2, 0) and (4, 0), centers at 0: c_0 -= 0.1 * (2 * 0 - (6, 0)) / (1 + 2) = (0.2, 0)
    moved = torch.zeros(2, 2)
    training.move_centers(moved, torch.tensor([[2.0, 0.0], [4.0, 0.0]]), torch.tensor([0, 0]))
    assert torch.allclose(moved, torch.tensor([[0.2, 0.0], [0.0, 0.0]]))


def test_atda_trains_on_every_clean_example_and_its_fgsm_example(micro):
    _, log = train(build_recipe("atda", epochs=1, batch_size=32), micro, seed=0, progress=False)
    assert log.epochs[0]["adversary_accuracy"] is not None and math.isfinite(log.epochs[0]["loss"])
    # forward: the clean pass, FGSM's, the adversarial pass; backward: FGSM's, and the step's through both passes
    assert log.forward_passes == 64 * 3 and log.backward_passes == 64 * 3


def test_atda_loss_is_cross_entropy_on_both_plus_the_weighted_terms(micro):
    """The loss of the loop's first step, recomputed outside it: CE(clean) + CE(FGSM) + lambda * (CORAL + mean
    matching + margin), the margin against centers that start at zero (every term of it is then softplus(0))."""
    recipe = build_recipe("atda", epochs=1, batch_size=16, atda_weight=0.5)
    one_batch = Dataset("one", micro.x_train[:16], micro.y_train[:16], micro.x_test, micro.y_test, 10)
    _, log = train(recipe, one_batch, seed=0, progress=False)
    torch.manual_seed(0)
    model = training.build_recipe_model(recipe, one_batch).train()
    x, y = one_batch.x_train, one_batch.y_train
    x_adv = ATTACKS.get("fgsm")()(model, x, y, eps=torch.full((16,), 0.3), generator=torch.Generator())
    clean, adversarial = model(x), model(x_adv)
    expected = (F.cross_entropy(clean, y) + F.cross_entropy(adversarial, y)
                + 0.5 * (training.atda_alignment(clean, adversarial) + math.log(2)))
    assert log.epochs[0]["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_ensemble_sources_craft_in_turn(micro, spy, natural_model):
    recipe = build_recipe("ensemble-at", adversary="spy", batch_size=16, epochs=1, ensemble_sources=["natural"])
    _, log = train(recipe, micro, seed=0, progress=False, sources={"natural": natural_model})
    crafting = [call["model"].model for call in spy]  # the counted wrapper around the crafting model
    assert crafting[1] is natural_model and crafting[3] is natural_model  # odd minibatches: the fixed source
    assert crafting[0] is not natural_model and crafting[0] is crafting[2]  # even ones: the model being trained
    assert log.source_passes == 0  # the spy reads no gradient; a real adversary's source cost is counted below


def test_ensemble_source_gradients_are_the_sources_own(micro, natural_model):
    recipe = build_recipe("ensemble-at", batch_size=16, epochs=1, ensemble_sources=["natural"])
    _, log = train(recipe, micro, seed=0, progress=False, sources={"natural": natural_model})
    assert log.source_passes == 2 * 2 * 8  # 2 minibatches crafted on the source, 8 examples, forward + backward
    assert all(p.grad is None for p in natural_model.parameters()) and not natural_model.training


def test_missing_ensemble_source_fails_before_training(micro):
    recipe = build_recipe("ensemble-at", ensemble_sources=["natural"])
    with pytest.raises(ValueError, match="ensemble source.*natural.*not provided"):
        train(recipe, micro, seed=0, progress=False)


def test_mixed_norm_training_alternates_adversaries(micro, spy):
    recipe = build_recipe("mixed-norm-at", adversary="spy", adversary_options={}, mixed_adversary="spy-l2",
                          mixed_eps=2.0, batch_size=16, epochs=1)
    train(recipe, micro, seed=0, progress=False)
    assert [float(call["eps"][0]) for call in spy] == pytest.approx([0.3, 2.0, 0.3, 2.0])


def test_the_mixed_adversary_takes_the_adversarys_options(micro, monkeypatch):
    """Both halves of mixed-norm training get one budget: pgd-l2 is built with the recipe's adversary_options."""
    built, real = [], ATTACKS.get("pgd-l2")

    def recording(**options):
        built.append(options)
        return real(**options)

    monkeypatch.setitem(ATTACKS._entries, "pgd-l2", recording)
    train(build_recipe("mixed-norm-at", adversary_options={"steps": 2}, batch_size=16, epochs=1), micro, seed=0,
          progress=False)
    assert built and built[-1] == {"steps": 2}
    with pytest.raises(ValueError, match="adversary_options: unknown option 'steps' for mixed_adversary 'step-ll'"):
        build_recipe("mixed-norm-at", mixed_adversary="step-ll")


def test_gaussian_noise_is_applied_in_training_only(micro, monkeypatch):
    seen = []
    original = training.build_recipe_model

    def recording(recipe, data):
        model = original(recipe, data)
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
        return model

    monkeypatch.setattr(training, "build_recipe_model", recording)
    # every training image a flat 0.5 grey, so the clean batch behind the recorded inputs is known whatever the
    # shuffle: x + N(0, 0.5^2) clipped to [0, 1] clips where |z| > 1, and inside it is a normal truncated at +-1 sigma
    grey = Dataset("grey", torch.full_like(micro.x_train, 0.5), micro.y_train, micro.x_test, micro.y_test, 10)
    model, _ = train(build_recipe("gaussian-noise", epochs=1, batch_size=64), grey, seed=0, progress=False)
    noise = seen[0] - 0.5
    clipped = (noise.abs() >= 0.5 - 1e-6).double().mean().item()
    assert clipped == pytest.approx(2 * stats.norm.sf(1.0), abs=0.01)
    assert noise[noise.abs() < 0.5 - 1e-6].std().item() == pytest.approx(0.5 * stats.truncnorm(-1, 1).std(), rel=0.03)
    x = micro.x_test
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # evaluation is deterministic: no noise layer in the model
    plain = build_model("small-cnn", num_classes=10, in_channels=1)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model(x))


def test_overfit_guard_flags_and_stops(tiny_mnist, monkeypatch):
    calls = {"n": 0}

    class CollapsingPgd(Attack):  # strong for the first two epochs' checks, then it destroys every input
        def __init__(self, **options):
            super().__init__("pgd-linf", Norm.LINF)

        def run(self, model, x, y, *, eps, rng):
            calls["n"] += 1
            return x.clone() if calls["n"] <= 2 else torch.zeros_like(x)

    monkeypatch.setitem(ATTACKS._entries, "pgd-linf", CollapsingPgd)
    recipe = build_recipe("fgsm-at", epochs=4, batch_size=50, overfit_guard="flag", guard_examples=100)
    _, flagged = train(recipe, tiny_mnist, seed=0, progress=False)
    assert [e["guard_pgd_accuracy"] > 0.2 for e in flagged.epochs[:2]] == [True, True]
    assert len(flagged.epochs) == 4 and flagged.guard["epoch"] == 3 and flagged.guard["action"] == "flag"
    assert flagged.forward_passes == 4 * (700 + 350)  # 700 digits trained on (100 held out), half crafted by FGSM
    calls["n"] = 0
    _, stopped = train(build_recipe("fgsm-at", epochs=4, batch_size=50, overfit_guard="stop", guard_examples=100),
                       tiny_mnist, seed=0, progress=False)
    assert len(stopped.epochs) == 3 and stopped.guard["best_epoch"] in (1, 2)


@pytest.mark.parametrize("overrides, message", [
    ({"adversarial_weight": 1.5}, "adversarial_weight must be in \\[0, 1\\]"),
    ({"adversarial_fraction": -0.1}, "adversarial_fraction must be in \\[0, 1\\]"),
    ({"eps": -0.1}, "eps must be a finite number >= 0"),
    ({"eps_sigma": 0}, "eps_sigma must be > 0"),
    ({"label_smoothing": 2}, "label_smoothing must be in"),
    ({"logit_squeeze_form": "frobenius"}, "allowed: batch-frobenius, batch-frobenius-sum-ce, per-example-mean"),
    ({"activation": "tanh"}, "allowed: relu, relu6, relu-decay"),
    ({"overfit_guard": "yes"}, "allowed: off, flag, stop"),
    ({"adversary": "ta-pgd-linf"}, "per-example eps"),
    ({"mixed_adversary": "ta-pgd-l2", "mixed_eps": 1.0}, "mixed_adversary 'ta-pgd-l2' takes one eps per batch"),
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"colour": "red"}, "unknown option 'colour'"),
])
def test_bad_kurakin_recipes_fail_with_the_option_named(overrides, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build_recipe("fgsm-at", **overrides)


def test_trades_and_guard_preconditions():
    with pytest.raises(ValueError, match="trades"):
        build_recipe("trades", adversary="fgsm")
    with pytest.raises(ValueError, match="loss 'atda' crafts its own FGSM examples"):
        build_recipe("atda", adversary="fgsm")
    with pytest.raises(ValueError, match="atda_weight must be a finite number >= 0"):
        build_recipe("atda", atda_weight=-1)
    with pytest.raises(ValueError, match="overfit_guard watches adversarial training"):
        build_recipe("natural", overfit_guard="stop")
    with pytest.raises(ValueError, match="ensemble_sources craft"):
        build_recipe("natural", ensemble_sources=("x",))


def test_activations(micro):
    x = torch.linspace(-2, 5, 15)
    assert torch.allclose(ReluDecay(0.1)(x), torch.relu(x) / (1 + 0.1 * torch.relu(x) ** 2))
    for activation, module in (("relu6", "ReLU6"), ("relu-decay", "ReluDecay"), ("elu", "ELU")):
        model, _ = train(build_recipe("natural", epochs=1, activation=activation), micro, seed=0, progress=False)
        kinds = {type(m).__name__ for m in model.modules()}
        assert module in kinds and "ReLU" not in kinds


@pytest.mark.slow
def test_recipes_train_to_useful_models(tiny_mnist):
    """Short runs: every recipe family learns (clean accuracy well above chance) on 800 digits."""
    for name, overrides in [("fgsm-at", {}), ("step-ll-at", {}), ("pgd-at-l2", {"adversary_options": {"steps": 3}}),
                            ("ls-gn", {}), ("lsq-gn", {})]:
        model, log = train(build_recipe(name, epochs=3, **overrides), tiny_mnist, seed=0, progress=False)
        assert accuracy(model, tiny_mnist.x_test, tiny_mnist.y_test) > 0.5, (name, log.epochs[-1])
        assert math.isfinite(log.epochs[-1]["loss"])


def test_vocabularies_become_enums_at_the_boundary():
    """TOML spellings of squeeze forms, guards and label modes become enum members when a recipe or attack is built
    (so code compares members, not strings), and print as the spelling the user wrote."""
    from attacks_ext.base import LabelMode
    from attacks_ext.onestep import OneStepAttack
    from defenses.recipes import OverfitGuard, SqueezeForm

    squeezed = build_recipe("logit-squeezing", logit_squeeze_form="per-example-mean", logit_squeeze=2.0)
    assert squeezed.logit_squeeze_form is SqueezeForm.PER_EXAMPLE_MEAN
    assert "(per-example-mean)" in squeezed.summary()
    assert build_recipe("fgsm-at", overfit_guard="stop").overfit_guard is OverfitGuard.STOP
    assert ATTACKS.get("step-ll")().target is LabelMode.LEAST_LIKELY
    assert OneStepAttack("x", Norm.LINF, target="predicted", uses_true_label=False).target is LabelMode.PREDICTED
    with pytest.raises(ValueError, match="target 'truth' unknown; allowed: true, predicted, least-likely, random, entropy"):
        OneStepAttack("x", Norm.LINF, target="truth", uses_true_label=True)
