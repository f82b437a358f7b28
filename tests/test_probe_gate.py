"""Attacks with a probe. Targeted APGD (the quick board's gated targeted stage): every target first runs a short probe
on every example still robust, and its full run goes only to the examples that probe brought within the margin.
Square (its gradient-free column): the full query budget runs only on a batch where a short probe broke an example."""
import pytest
import torch

from attacks_ext.base import ExampleRandomness
from harness.counting import EvaluationCounter
from harness.registry import ATTACKS


class _Logits(torch.nn.Module):
    """Ten classes with the label highest; the first pixel carries the example's index for the recording fake."""

    def forward(self, x):
        return torch.arange(5.0, -5.0, -1.0).expand(len(x), 10) + 0 * x.flatten(1)[:, :1]


# The probe's targeted DLR loss per (example, target rank); example 1 is fooled by the probe towards rank 2.
PROBE_LOSS = {0: {1: -0.1, 2: -0.5, 3: -0.9}, 1: {1: -0.6, 2: 0.2, 3: -0.1}, 2: {1: -0.35, 2: -0.29, 3: -1.5},
              3: {1: -0.8, 2: -0.31, 3: -0.3}}


def test_the_full_run_of_each_target_goes_only_to_the_examples_its_probe_brought_within_the_margin(monkeypatch):
    """A recording stand-in for the library's single run: the probe runs every target at probe_steps on every example
    still robust; each target's full runs (restarts of them, at steps) get exactly the robust examples whose probe
    loss for that target is at least -probe_margin; an example the probe fooled gets nothing more."""
    import torchattacks

    calls = []

    def single_run(self, x, y):
        examples = [int(v) for v in x.flatten(1)[:, 0].round()]
        rank = self.target_class - 1
        calls.append((self.steps, rank, tuple(examples)))
        fooled = [self.steps == 5 and PROBE_LOSS[e][rank] >= 0 for e in examples]
        loss = torch.tensor([PROBE_LOSS[e][rank] if self.steps == 5 else -1.0 for e in examples])
        return x, torch.tensor([not f for f in fooled]), loss, x

    monkeypatch.setattr(torchattacks.APGDT, "attack_single_run", single_run)
    x = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 1, 10).clone()
    attack = ATTACKS.get("ta-apgd-t-l2")(steps=50, targets=3, probe_steps=5, probe_margin=0.3, restarts=2)
    attack.run(_Logits(), x, torch.zeros(4, dtype=torch.long), eps=0.5, rng=ExampleRandomness(0, torch.arange(4)))

    probe = [call for call in calls if call[0] == 5]
    full = [call for call in calls if call[0] == 50]
    assert probe == [(5, 1, (0, 1, 2, 3)), (5, 2, (0, 1, 2, 3)), (5, 3, (0, 2, 3))]
    # rank 1: example 0 (-0.1); rank 2: example 2 (-0.29), not 3 (-0.31); rank 3: example 3 (-0.3); 1 was fooled
    assert full == [(50, 1, (0,)), (50, 1, (0,)), (50, 2, (2,)), (50, 2, (2,)), (50, 3, (3,)), (50, 3, (3,))]
    assert len(calls) == 9


def test_the_gated_attack_keeps_what_its_probe_broke_and_costs_less_than_the_full_budget_on_every_example(
        mnist, natural_model):
    """On a real model: the probe phase is the library's own run at probe_steps (same seed, same order), so the
    gated attack breaks every example that run breaks; the full budget on every example costs more evaluations."""
    x, y = mnist.x_test[:100], mnist.y_test[:100]
    eps, rng = 0.1, lambda: ExampleRandomness(0, torch.arange(len(x)))

    def run(**options):
        counter = EvaluationCounter(natural_model)
        x_adv = ATTACKS.get("ta-apgd-t")(targets=3, **options).run(counter, x, y, eps=eps, rng=rng())
        with torch.no_grad():
            robust = (natural_model(x_adv).argmax(1) == y).numpy()
        return robust, counter.forward_evals + counter.gradient_evals

    probe_only, _ = run(steps=3)
    gated, gated_cost = run(steps=60, probe_steps=3, probe_margin=0.3)
    _, full_cost = run(steps=60)
    assert not (gated & ~probe_only).any()  # every example the probe's run broke stays broken
    assert gated.sum() < probe_only.sum()  # and the full runs of the gated examples break more
    assert gated_cost < full_cost


@pytest.mark.parametrize("options, message", [
    ({"steps": 20, "probe_steps": 20}, "probe_steps \\(20\\) must be below steps \\(20\\)"),
    ({"probe_steps": -1}, "probe_steps must be 0 \\(no probe\\) or a positive integer"),
    ({"probe_steps": "ten"}, "probe_steps must be 0 \\(no probe\\) or a positive integer, got 'ten'"),
    ({"probe_steps": 10, "probe_margin": 1.5}, "probe_margin must be in \\[0, 1\\]"),
    ({"restarts": 0}, "restarts must be a positive integer"),
])
def test_bad_probe_options_are_errors_naming_the_option_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        ATTACKS.get("ta-apgd-t-l2")(**options)


# --- Square with a probe: the full query budget only where the probe found the gradient columns failing ----------

class _FooledMarker(torch.nn.Module):
    """Class 0 unless the second pixel is set (class 1): the recording fake marks what it fooled there."""

    def forward(self, x):
        marked = x.flatten(1)[:, 1:2]
        return torch.cat([1 - marked, marked], 1)


def _recording_square(monkeypatch, fools):
    """Square's single run replaced by a recorder: `fools[n_queries]` are the examples a run of that budget fools."""
    import torchattacks

    calls = []

    def single_run(self, x, y):
        examples = tuple(int(v) for v in x.flatten(1)[:, 0].round())
        calls.append((self.n_queries, examples))
        x_adv = x.clone()
        for row, example in enumerate(examples):
            if example in fools.get(self.n_queries, ()):
                x_adv.view(len(x), -1)[row, 1] = 1.0
        return torch.full((len(x),), float(self.n_queries)), x_adv

    monkeypatch.setattr(torchattacks.Square, "attack_single_run", single_run)
    return calls


def _square_batch():
    x = torch.zeros(4, 1, 1, 10)
    x[:, 0, 0, 0] = torch.arange(4.0)
    return x, torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("name", ["ta-square", "ta-square-l2"])
def test_square_spends_its_full_budget_only_on_a_batch_whose_probe_broke_an_example(monkeypatch, name):
    """The probe runs Square at probe_queries on the whole batch; nothing broken ends the attack there. When the probe
    breaks an example, the full budget runs once on the examples it left, and what either run broke stays broken."""
    x, y = _square_batch()
    attack = ATTACKS.get(name)(queries=500, probe_queries=20)

    calls = _recording_square(monkeypatch, {})
    x_adv = attack.run(_FooledMarker(), x, y, eps=0.3, rng=ExampleRandomness(0, torch.arange(4)))
    assert calls == [(20, (0, 1, 2, 3))]
    assert (_FooledMarker()(x_adv).argmax(1) == 0).all()

    calls = _recording_square(monkeypatch, {20: {1}, 500: {2}})
    x_adv = attack.run(_FooledMarker(), x, y, eps=0.3, rng=ExampleRandomness(0, torch.arange(4)))
    assert calls == [(20, (0, 1, 2, 3)), (500, (0, 2, 3))]
    assert _FooledMarker()(x_adv).argmax(1).tolist() == [0, 1, 1, 0]


def test_square_without_a_probe_runs_the_full_budget_on_every_example(monkeypatch):
    x, y = _square_batch()
    calls = _recording_square(monkeypatch, {})
    ATTACKS.get("ta-square")(queries=500).run(_FooledMarker(), x, y, eps=0.3, rng=ExampleRandomness(0, torch.arange(4)))
    assert calls == [(500, (0, 1, 2, 3))]


def test_gated_square_on_a_real_model_keeps_what_its_probe_broke_and_costs_only_the_probe_where_it_broke_nothing(
        mnist, natural_model):
    """The probe is the library's own run at probe_queries (same seed, same examples): the gated attack breaks every
    example that run breaks. At an eps where the probe breaks nothing, the attack costs the probe's queries only."""
    x, y = mnist.x_test[:60], mnist.y_test[:60]
    rng = lambda: ExampleRandomness(0, torch.arange(len(x)))  # noqa: E731

    def run(eps, **options):
        counter = EvaluationCounter(natural_model)
        x_adv = ATTACKS.get("ta-square")(**options).run(counter, x, y, eps=eps, rng=rng())
        with torch.no_grad():
            robust = (natural_model(x_adv).argmax(1) == y).numpy()
        return robust, counter.forward_evals + counter.gradient_evals

    probe_only, _ = run(0.3, queries=30)
    gated, _ = run(0.3, queries=300, probe_queries=30)
    assert not (gated & ~probe_only).any() and gated.sum() < probe_only.sum()
    quiet, quiet_cost = run(0.005, queries=300, probe_queries=30)
    _, full_cost = run(0.005, queries=300)
    with torch.no_grad():
        clean = (natural_model(x).argmax(1) == y).numpy()
    assert (quiet == clean).all()  # the probe broke nothing: no full run
    assert quiet_cost <= 35 * len(x) < full_cost


@pytest.mark.parametrize("options, message", [
    ({"queries": 100, "probe_queries": 100}, "probe_queries \\(100\\) must be below queries \\(100\\)"),
    ({"probe_queries": -5}, "probe_queries must be 0 \\(no probe\\) or a positive integer, got -5"),
    ({"probe_queries": 1.5}, "probe_queries must be 0 \\(no probe\\) or a positive integer, got 1.5"),
])
def test_bad_square_probe_options_are_errors_naming_the_option_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        ATTACKS.get("ta-square-l2")(**options)
