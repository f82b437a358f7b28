"""What makes the evaluation waste nothing and stay exact: random draws per (seed, example index), per-example
early stop, and the cascade over still-robust examples."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from attacks_ext.base import ExampleRandomness
from attacks_ext.pgd import ProjectedGradientDescent, random_start
from attacks_ext.second_order import SecondOrderAttack
from harness.models import InputQuantization
from harness.reports import aggregate, leaderboard
from harness import spec as spec_module
from harness.counting import EvaluationCounter
from harness.evaluation import evaluate_cell
from harness.matrix import run
from harness.planning import plan
from harness.preparation import prepare_defenses
from harness.registry import ATTACKS
from harness.store import ResultStore
from harness.threat import Norm


def smooth_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.Tanh(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("attack_id, options, eps", [
    ("pgd-linf", {"steps": 5}, 0.2), ("pgd-l2", {"steps": 5}, 1.5), ("so-linf", {"steps": 3, "draws": 2}, 0.2),
    ("step-rnd", {}, 0.2), ("random-sign", {}, 0.2), ("truncnorm-noise", {}, 0.2),
])
def test_draws_depend_only_on_the_seed_and_the_example_index(mnist, attack_id, options, eps):
    """The same example gets the same adversarial point alone, in any batch size and next to any others."""
    model, attack = smooth_model(), ATTACKS.get(attack_id)(**options)
    x, y = mnist.x_test[:12], mnist.y_test[:12]
    whole = attack(model, x, y, eps=eps, generator=ExampleRandomness(7, range(12)))
    halves = torch.cat([attack(model, x[:5], y[:5], eps=eps, generator=ExampleRandomness(7, range(5))),
                        attack(model, x[5:], y[5:], eps=eps, generator=ExampleRandomness(7, range(5, 12)))])
    picked = [9, 2, 4]
    shuffled = attack(model, x[picked], y[picked], eps=eps, generator=ExampleRandomness(7, picked))
    assert torch.allclose(whole, halves, atol=1e-5)
    assert torch.allclose(whole[picked], shuffled, atol=1e-5)
    other_seed = attack(model, x, y, eps=eps, generator=ExampleRandomness(8, range(12)))
    assert not torch.equal(whole, other_seed)


def test_example_streams_survive_examples_leaving():
    rng = ExampleRandomness(3, range(6))
    first = rng.rand(4)
    kept = rng.subset(torch.tensor([1, 4]))
    second_kept = kept.rand(4)
    again = ExampleRandomness(3, range(6))
    again.rand(4)
    assert torch.equal(again.rand(4)[[1, 4]], second_kept) and first.shape == (6, 4)
    assert ExampleRandomness(3, [0, 1]).library_seed() != ExampleRandomness(3, [0, 2]).library_seed()


def test_streams_made_at_first_draw_are_shared_between_a_subset_and_its_parent():
    """A stream is made when first drawn from, by a subset or by its parent; either way both then read the one
    stream, as if every stream had been made up front."""
    rng = ExampleRandomness(3, [10, 11, 12, 13])
    kept = rng.subset(torch.tensor([1, 3]))
    kept_first = kept.rand(2)  # streams of examples 11 and 13 made by the subset
    parent = rng.rand(2)  # continues those two, starts the other two
    inner = kept.subset(torch.tensor([1])).rand(2)  # example 13's third draw
    alone = {i: ExampleRandomness(3, [i]) for i in (10, 11, 12, 13)}
    first = {i: alone[i].rand(2)[0] for i in alone}
    second = {i: alone[i].rand(2)[0] for i in alone}
    assert torch.equal(kept_first, torch.stack([first[11], first[13]]))
    assert torch.equal(parent, torch.stack([first[10], second[11], first[12], second[13]]))
    assert torch.equal(inner[0], alone[13].rand(2)[0])


@pytest.mark.parametrize("norm, eps", [(Norm.LINF, 0.08), (Norm.L2, 1.0)])
def test_early_stop_equals_the_run_to_the_end_that_keeps_any_misclassified_iterate(natural_model, mnist, norm, eps):
    x, y = mnist.x_test[:200], mnist.y_test[:200]
    steps, fraction = 8, 0.25
    stopped_counter = EvaluationCounter(natural_model)
    attack = ProjectedGradientDescent("pgd", norm, steps=steps, step_fraction=fraction)
    stopped = attack(stopped_counter, x, y, eps=eps, generator=ExampleRandomness(5, range(200)), stop_when_fooled=True)
    with torch.no_grad():
        stopped_robust = natural_model(stopped).argmax(1) == y
        # the reference: iterate k of the full run is PGD with k steps from the same start; robust = right at every k
        robust = natural_model(random_start(x, eps, norm, ExampleRandomness(5, range(200)))).argmax(1) == y
    full_counter = EvaluationCounter(natural_model)
    for k in range(1, steps + 1):
        counter = full_counter if k == steps else natural_model
        iterate = ProjectedGradientDescent("pgd", norm, steps=k, step_fraction=fraction)(
            counter, x, y, eps=eps, generator=ExampleRandomness(5, range(200)))
        with torch.no_grad():
            robust &= natural_model(iterate).argmax(1) == y
    assert torch.equal(stopped_robust, robust)
    assert 0 < int(robust.sum()) < 200  # some examples fall on the way, some never do
    assert (full_counter.gradient_evals, full_counter.forward_evals) == attack.evaluations_to_end(200, eps)
    assert stopped_counter.gradient_evals < full_counter.gradient_evals  # what early stop saved
    assert stopped_counter.forward_evals == stopped_counter.gradient_evals  # no extra forward to check


def test_an_iterate_that_stops_moving_leaves_the_attack_with_the_point_the_run_to_the_end_returns(mnist):
    """Input rounding has a zero gradient: no PGD iterate ever moves, so each example leaves after one step (a
    fixed point, or fooled at its start) with what the full run returns. S-O draws fresh noise every step, so an
    unchanged iterate is no fixed point there and it runs on."""
    model = InputQuantization(smooth_model(), 2).eval()
    x, y = mnist.x_test[:50], mnist.y_test[:50]
    for norm, eps in ((Norm.LINF, 0.3), (Norm.L2, 2.0)):
        attack = ProjectedGradientDescent("pgd", norm, steps=20)
        counter = EvaluationCounter(model)
        stopped = attack(counter, x, y, eps=eps, generator=ExampleRandomness(1, range(50)), stop_when_fooled=True)
        full = attack(model, x, y, eps=eps, generator=ExampleRandomness(1, range(50)))
        assert torch.equal(stopped, full)
        assert counter.gradient_evals == 50
    so = SecondOrderAttack("so", Norm.LINF, steps=5, draws=2)
    counter = EvaluationCounter(model)
    so(counter, x, y, eps=0.3, generator=ExampleRandomness(1, range(50)), stop_when_fooled=True)
    with torch.no_grad():
        survivors = int((model(random_start(x, 0.3, Norm.LINF, ExampleRandomness(1, range(50)))).argmax(1) == y).sum())
    assert survivors > 0 and counter.gradient_evals == 2 * (5 * survivors + (50 - survivors))


CASCADE_SPEC = """
[benchmark]
name = "cascade"
dataset = "mnist5k"
eval_examples = 80
batch_size = 30
cascade = {cascade}

[eps]
linf = [0.05, 0.15]
l2 = [1.0]

[defenses.natural]
recipe = "natural"
epochs = 1

[attacks.pgd]                 # listed first: the cascade still runs the one-step columns before it
attack = "pgd-linf"
steps = 10

[attacks.fgsm]
attack = "fgsm"

[attacks.fgsm-pred]
attack = "fgsm-pred"

[attacks.ta-fgsm]
attack = "ta-fgsm"
eps = [0.15]

[attacks.so]
attack = "so-linf"
steps = 5
draws = 2
eps = [0.15]

[attacks.pgd-l2]
attack = "pgd-l2"
steps = 10

[label_leak]
pairs = [["fgsm", "fgsm-pred"]]

[checks.iterative-beats-one-step]
examples = 40

[checks.restart-sweep]
restarts = 3
steps = 5
eps = 0.15
examples = 40
"""


def _board(tmp_path, mnist, cascade: bool):
    folder = tmp_path / f"cascade-{cascade}"
    folder.mkdir()
    (folder / "spec.toml").write_text(CASCADE_SPEC.format(cascade=str(cascade).lower()))
    spec = spec_module.load(folder / "spec.toml")
    with ResultStore(folder / "results.sqlite") as store:
        summary = run(spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert summary.failed == []
        board = aggregate.build(spec, store, mnist)
        records = store.cells()
    return spec, board, records


@pytest.mark.slow
def test_the_cascade_gives_the_worst_case_of_every_attack_on_every_example(tmp_path, mnist):
    spec, cascaded, records = _board(tmp_path, mnist, True)
    _, independent, independent_records = _board(tmp_path, mnist, False)
    worst = [c for c in cascaded.summary.columns if c.startswith("Worst")]
    assert worst and cascaded.summary[worst].equals(independent.summary[worst])
    for norm, grid in spec.eps:  # per example, not just the percentages
        for eps in grid:
            labels = [a.label for a in spec.attacks if a.norm is norm and eps in a.eps]
            both = [np.logical_and.reduce([board.outcomes[("natural", label, eps)].robust_correct for label in labels])
                    for board in (cascaded, independent)]
            assert np.array_equal(*both) and 0 < both[0].sum() < 80
    # the label-leak twins ran on every example: their own accuracies, identical in both runs
    for label in ("fgsm", "fgsm-pred"):
        for eps in (0.05, 0.15):
            assert np.array_equal(cascaded.outcomes[("natural", label, eps)].adv_correct,
                                  independent.outcomes[("natural", label, eps)].adv_correct)
    # a cascaded column attacked only what was left, and it stored which examples those were
    pgd = cascaded.outcomes[("natural", "pgd", 0.15)]
    attacked = pgd.measurements["attacked"]
    before = [cascaded.outcomes[("natural", "clean", 0.0)]] + [
        cascaded.outcomes[("natural", label, 0.15)] for label in ("fgsm", "fgsm-pred", "ta-fgsm")]
    assert np.array_equal(attacked, np.logical_and.reduce([r.robust_correct for r in before]))
    assert attacked.sum() < 80 and not (pgd.robust_correct & ~attacked).any()
    spent = lambda frame: float((frame["Eval fwd"] + frame["Eval grad"]).sum())
    assert spent(cascaded.costs) < spent(independent.costs)
    # naive is the same count in both runs: every attack on every example, run to the end
    assert cascaded.costs["Eval naive"].iloc[0] == pytest.approx(independent.costs["Eval naive"].iloc[0])
    assert spent(independent.costs) < independent.costs["Eval naive"].iloc[0]  # early stop alone saves
    markdown = leaderboard.render_markdown(cascaded, command="test", figure="f.png")
    assert "**cascade**" in markdown and "Model evaluations spent of naive" in markdown
    # what each column broke first is the same with and without the cascade (only its cost differs), and at each
    # (norm, eps) the columns' counts add up to the clean-correct examples the worst case does not keep
    earned = [leaderboard.column_yield(board) for board in (cascaded, independent)]
    assert earned[0]["Broken first"].tolist() == earned[1]["Broken first"].tolist()
    assert (earned[0]["Model evaluations"] <= earned[1]["Model evaluations"]).all()
    assert (earned[0]["Model evaluations"] < earned[1]["Model evaluations"]).any()
    clean = cascaded.outcomes[("natural", "clean", 0.0)].clean_correct
    for norm, grid in spec.eps:
        for eps in grid:
            labels = [a.label for a in spec.attacks if a.norm is norm and eps in a.eps]
            worst = np.logical_and.reduce([cascaded.outcomes[("natural", label, eps)].robust_correct for label in labels])
            rows = earned[0][(earned[0]["Norm"] == norm.symbol) & (earned[0]["eps"] == f"{eps:g}")]
            assert sorted(rows["Column"]) == sorted(labels)
            assert rows["Broken first"].sum() == clean.sum() - worst.sum() > 0
    assert "What each column earned" in markdown
    # in a cascade the iterative-vs-one-step check runs its own standalone cells, so it cannot pass trivially
    verdict = cascaded.verdicts["natural"]["iterative-beats-one-step"]
    assert verdict.status is not None and "pgd" in verdict.figure
    requested = [c for c in plan(spec, mnist) if c.check == "iterative-beats-one-step"]
    names = {c.request for c in requested}
    assert {"pgd @ 0.05", "fgsm @ 0.15", "pgd @ 0.15"} <= names
    # only the first iterative column at an eps (so comes after pgd), and only where a one-step column exists (L2 has none)
    assert not {"so @ 0.15", "pgd-l2 @ 1"} & names
    assert all(not c.after and c.examples == 40 for c in requested)
    # each of them repeats a matrix column, so it takes over that column's outcomes and attacks only the
    # examples the column skipped; its vector is exactly the standalone one, for less
    assert all(c.reuses is not None for c in requested)
    model = prepare_defenses(spec, ["natural"], mnist, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"),
                             progress=False)["natural"].load_model(mnist, torch.device("cpu"))
    x, y = mnist.x_test[:40], mnist.y_test[:40]
    for cell in requested:
        standalone = evaluate_cell(cell, model, x, y, batch_size=spec.batch_size, device=torch.device("cpu"))
        stored = records[cell.key]
        assert np.array_equal(stored.robust_correct, standalone.robust_correct), cell.request
        assert stored.forward_evals + stored.gradient_evals <= standalone.forward_evals + standalone.gradient_evals
        if cell.request.startswith("pgd @"):
            assert stored.gradient_evals < standalone.gradient_evals, cell.request
    # each restart attacks only what the restarts before it left robust: the sweep's curve is unchanged
    restarts = [c for c in plan(spec, mnist) if c.check == "restart-sweep" and c.attack.norm is Norm.LINF]
    assert [bool(c.after) for c in restarts] == [False, True, True] and restarts[2].after == (restarts[1].key,)
    alone = [evaluate_cell(dataclasses.replace(c, after=(), reuses=None), model, x, y, batch_size=spec.batch_size,
                           device=torch.device("cpu")).robust_correct for c in restarts]
    assert np.array_equal(np.logical_and.accumulate(alone), [records[c.key].robust_correct for c in restarts])
    assert records[restarts[2].key].measurements["attacked"].sum() < 40


def test_a_cascade_cell_depends_on_the_cells_before_it_and_shares_their_seed(tmp_path, mnist):
    path = tmp_path / "spec.toml"
    path.write_text(CASCADE_SPEC.format(cascade="true"))
    spec = spec_module.load(path)
    cells = [c for c in plan(spec, mnist) if c.check is None]
    order = [c.label for c in cells if c.eps == 0.15 and c.norm == "linf"]
    assert order == ["fgsm", "fgsm-pred", "ta-fgsm", "pgd", "so"]
    by_label = {(c.label, c.eps): c for c in cells}
    assert by_label[("fgsm", 0.15)].after == () and by_label[("fgsm-pred", 0.15)].after == ()
    assert by_label[("so", 0.15)].after == (by_label[("clean", 0.0)].key,) + tuple(
        by_label[(label, 0.15)].key for label in ("fgsm", "fgsm-pred", "ta-fgsm", "pgd"))
    path.write_text(CASCADE_SPEC.format(cascade="false"))
    plain = {(c.label, c.eps): c for c in plan(spec_module.load(path), mnist) if c.check is None}
    assert plain[("pgd", 0.15)].seed == by_label[("pgd", 0.15)].seed  # the draws do not depend on the chain
    assert plain[("pgd", 0.15)].key != by_label[("pgd", 0.15)].key  # its stored vector does


def test_cascade_must_be_a_boolean(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(CASCADE_SPEC.replace("cascade = {cascade}", 'cascade = "yes"'))
    with pytest.raises(spec_module.SpecError, match=r"benchmark\.cascade.*true or false"):
        spec_module.load(path)


def test_a_standalone_column_attacks_every_example_and_the_chain_goes_on_after_it(tmp_path, mnist):
    """A paper's table needs each attack's own accuracy: `standalone = true` keeps the column out of the chain's
    filter (its cell is the non-cascade cell, key included) while the columns after it attack what it left."""
    path = tmp_path / "spec.toml"
    marked = 'attack = "pgd-linf"\nstandalone = true'
    path.write_text(CASCADE_SPEC.format(cascade="true").replace('attack = "pgd-linf"', marked))
    cells = {(c.label, c.eps): c for c in plan(spec_module.load(path), mnist) if c.check is None}
    path.write_text(CASCADE_SPEC.format(cascade="false"))
    plain = {(c.label, c.eps): c for c in plan(spec_module.load(path), mnist) if c.check is None}
    assert cells[("pgd", 0.15)].after == () and cells[("pgd", 0.15)].key == plain[("pgd", 0.15)].key
    # the column after it (not marked) attacks what the whole chain left, the standalone column included
    assert cells[("so", 0.15)].after == (cells[("clean", 0.0)].key,) + tuple(
        cells[(label, 0.15)].key for label in ("fgsm", "fgsm-pred", "ta-fgsm", "pgd"))
    path.write_text(CASCADE_SPEC.format(cascade="true").replace('attack = "so-linf"', 'attack = "so-linf"\nstandalone = 1'))
    with pytest.raises(spec_module.SpecError, match=r"attacks\.so\.standalone.*true or false"):
        spec_module.load(path)


def test_a_restart_column_is_the_same_attack_from_new_draws_on_what_the_first_left(tmp_path, mnist, natural_model):
    """`restart = k` repeats a column's attack from other random starts (AutoAttack-style restarts, as a column of
    its own): a new seed, the survivors of the first draw as its examples, and adversarial points that differ."""
    path = tmp_path / "spec.toml"
    second = '[attacks.pgd-again]\nattack = "pgd-linf"\nsteps = 10\nrestart = 1\n\n[attacks.so]'
    path.write_text(CASCADE_SPEC.format(cascade="true").replace("[attacks.so]", second))
    spec = spec_module.load(path)
    cells = {(c.label, c.eps): c for c in plan(spec, mnist) if c.check is None}
    first, again = cells[("pgd", 0.15)], cells[("pgd-again", 0.15)]
    assert again.seed != first.seed and first.key in again.after
    x, y = mnist.x_test[:20], mnist.y_test[:20]
    starts = [first.attack.build()(natural_model, x, y, eps=0.15, generator=ExampleRandomness(cell.seed, range(20)))
              for cell in (first, again)]
    assert (starts[0] - starts[1]).flatten(1).abs().amax(1).min() > 0  # every example moved differently
    for bad in ("-1", "true", "1.5"):
        path.write_text(CASCADE_SPEC.format(cascade="true").replace("[attacks.so]", second.replace("restart = 1", f"restart = {bad}")))
        with pytest.raises(spec_module.SpecError, match=r"attacks\.pgd-again\.restart.*non-negative integer"):
            spec_module.load(path)
