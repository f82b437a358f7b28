from pathlib import Path

import pytest

from harness import spec
from harness.threat import Norm

QUICK = Path(__file__).resolve().parent.parent / "benchmarks" / "mnist-quick.toml"

BASE = """
[benchmark]
name = "t"
dataset = "mnist5k"
{benchmark}
[eps]
linf = {linf}
l2 = [1.0]
[defenses.natural]
recipe = "natural"
{defense}
[attacks.pgd]
attack = "{attack}"
{attack_options}
"""


def write(tmp_path, benchmark="", linf="[0.1, 0.3]", defense="", attack="pgd-linf", attack_options="steps = 5"):
    path = tmp_path / "bench.toml"
    path.write_text(BASE.format(benchmark=benchmark, linf=linf, defense=defense, attack=attack, attack_options=attack_options))
    return path


def test_quick_benchmark_loads():
    loaded = spec.load(QUICK)
    assert loaded.name == "mnist-quick" and loaded.dataset == "mnist5k"
    assert {d.name for d in loaded.defenses} >= {"natural", "pgd-at"}
    assert loaded.rank_by == (Norm.LINF, 0.3)
    pgd = next(a for a in loaded.attacks if a.label == "pgd-40")
    assert pgd.attack_id == "pgd-linf" and dict(pgd.options) == {"steps": 40} and 0.3 in pgd.eps


@pytest.mark.parametrize("kwargs, key, message", [
    (dict(benchmark="seeed = 1"), "benchmark", "unknown key 'seeed'"),
    (dict(attack="pgd-linfinity"), "attacks.pgd.attack", "unknown attack 'pgd-linfinity'; known: "),
    (dict(linf="[-0.1]"), "eps.linf", ">= 0"),
    (dict(linf="[8]"), "eps.linf", "exceeds 1"),
    (dict(attack_options="stepz = 5"), "attacks.pgd", "unknown option 'stepz' for pgd-linf; allowed: steps"),
    (dict(attack_options="steps = 0"), "attacks.pgd", "positive integer"),
    (dict(defense="epoch = 3"), "defenses.natural", "unknown option 'epoch'"),
    (dict(defense="eps = -1.0"), "defenses.natural", "eps must be"),
    (dict(benchmark="rank_by = ['linf', 0.2]"), "benchmark.rank_by", "not a point"),
    (dict(benchmark="eval_examples = 0"), "benchmark.eval_examples", "positive integer"),
    (dict(benchmark="threads = 0"), "benchmark.threads", "positive integer"),
])
def test_errors_name_the_offending_key(tmp_path, kwargs, key, message):
    with pytest.raises(spec.SpecError) as info:
        spec.load(write(tmp_path, **kwargs))
    text = str(info.value)
    assert f"[{key}" in text and message in text, text


def test_attack_eps_must_be_a_subset_of_its_grid(tmp_path):
    """A column at an eps the grid lacks would be computed, stored and shown nowhere: it is an error."""
    assert spec.load(write(tmp_path, attack_options="steps = 2\neps = [0.3]")).attacks[0].eps == (0.3,)
    with pytest.raises(spec.SpecError, match=r"\[attacks.pgd.eps\] 0.05 not on the \[eps\] linf grid \(0.1, 0.3\)"):
        spec.load(write(tmp_path, attack_options="steps = 2\neps = [0.05]"))


def test_l2_eps_above_the_input_diameter_is_rejected(tmp_path):
    """28 x 28 inputs in [0, 1] are at most 28 apart in L2: a larger eps admits every image and means a unit slip."""
    path = write(tmp_path)
    path.write_text(path.read_text().replace("l2 = [1.0]", "l2 = [1.0, 300]"))
    with pytest.raises(spec.SpecError, match=r"\[eps.l2\] L2 eps=300 exceeds 28, the largest L2 distance"):
        spec.load(path)
    path.write_text(path.read_text().replace("l2 = [1.0, 300]", "l2 = [1.0, 28]"))
    assert spec.load(path).eps_grid(Norm.L2) == (1.0, 28.0)


def test_external_defense_requires_safetensors(tmp_path):
    path = write(tmp_path)
    path.write_text(path.read_text() + '\n[defenses.mine]\nfactory = "m:f"\nweights = "w.pt"\n')
    with pytest.raises(spec.SpecError, match=r"\[defenses.mine.weights\] must be a .safetensors file"):
        spec.load(path)


def test_invalid_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[benchmark\n")
    with pytest.raises(spec.SpecError, match="not valid TOML"):
        spec.load(tmp_path / "bad.toml")
    with pytest.raises(spec.SpecError, match="no such benchmark file"):
        spec.load(tmp_path / "absent.toml")


def test_full_profile_loads():
    loaded = spec.load(QUICK.parent / "mnist-full.toml")
    assert loaded.dataset == "mnist" and dict(loaded.dataset_options)["data_dir"] == "data/mnist"
    ensemble = next(d for d in loaded.defenses if d.name == "ensemble-at")
    assert ensemble.recipe.ensemble_sources == ("natural", "gn")


@pytest.mark.parametrize("path", [QUICK, QUICK.parent / "mnist-full.toml"])
def test_the_quick_and_full_boards_end_every_threat_with_square_at_autoattacks_budget(path):
    # A model whose gradients fail (binarized) stood 45 points above AutoAttack at L2 and 32 examples at L-inf 0.3
    # until Square ran on the gradient columns' survivors: every (norm, eps) the board reports needs that pass.
    loaded = spec.load(path)
    for norm, grid in loaded.eps:
        for eps in grid:
            chain = [a for a in loaded.attacks if a.norm is norm and eps in a.eps and a.source is None and not a.standalone]
            assert chain[-1].attack_id in {"ta-square", "ta-square-l2"}, (path.name, norm, eps)
            assert dict(chain[-1].options)["queries"] == 5000, (path.name, norm, eps)


def test_mnist_li_reads_the_quick_boards_l2_cells_on_the_models_both_train(mnist):
    """mnist-li's L2 chain up to its own last column (targeted FAB) is the quick board's cell for cell on natural,
    pgd-at, pgd-at-l2 and trades: with one home (as in CI) it computes none of them again."""
    from harness.planning import plan

    quick = {c.key for c in plan(spec.load(QUICK), mnist)}
    li = [c for c in plan(spec.load(QUICK.parent / "mnist-li.toml"), mnist) if c.check is None and c.norm == "l2"]
    shared = [c for c in li if c.defense in ("natural", "pgd-at", "pgd-at-l2", "trades") and c.label != "fab-t-l2"]
    assert len(shared) == 4 * 4  # pgd-l2-40, so-l2, apgd-ce-l2 and the gated apgd-t-l2 on each of the four
    assert all(c.key in quick for c in shared), [c.describe() for c in shared if c.key not in quick]
    assert not any(c.key in quick for c in li if c.defense == "atda" or c.label == "fab-t-l2")


@pytest.mark.parametrize("sources, message", [
    ('["nowhere"]', "source 'nowhere' is not another trained defense of this benchmark"),
    ('["ens"]', "source 'ens' is not another trained defense"),
])
def test_ensemble_sources_must_be_defenses_of_the_benchmark(tmp_path, sources, message):
    path = write(tmp_path)
    path.write_text(path.read_text() + f'\n[defenses.ens]\nrecipe = "ensemble-at"\nensemble_sources = {sources}\n')
    with pytest.raises(spec.SpecError, match=r"\[defenses.ens.ensemble_sources\] " + message):
        spec.load(path)


def test_ensemble_source_cycles_are_rejected(tmp_path):
    path = write(tmp_path)
    path.write_text(path.read_text() + '\n[defenses.a]\nrecipe = "ensemble-at"\nensemble_sources = ["b"]\n'
                    '\n[defenses.b]\nrecipe = "ensemble-at"\nensemble_sources = ["a"]\n')
    with pytest.raises(spec.SpecError, match="cycle: a -> b -> a"):
        spec.load(path)


@pytest.mark.parametrize("bench, defense, message", [
    ("training_seeds = 1", "", r"\[benchmark.training_seeds\] must be a non-empty list"),
    ("training_seeds = [1, 2]", "", "must include the benchmark's seed 0"),
    ("", "training_seeds = [0, 0]", r"\[defenses.natural.training_seeds\] lists a seed twice"),
    ("", "training_seeds = [0, -1]", "must be a non-empty list of integers >= 0"),
])
def test_training_seeds_are_validated_with_the_key(tmp_path, bench, defense, message):
    with pytest.raises(spec.SpecError, match=message):
        spec.load(write(tmp_path, benchmark=bench, defense=defense))


def test_training_seeds_make_replicas_of_trained_defenses_and_a_defense_overrides_the_benchmark(tmp_path):
    loaded = spec.load(write(tmp_path, benchmark="training_seeds = [0, 1]\nseed = 0", defense="training_seeds = [0, 3, 4]"))
    assert [(r.name, r.seed, r.replica_of) for r in loaded.replicas] == [("natural@seed3", 3, "natural"),
                                                                         ("natural@seed4", 4, "natural")]
    assert [d.name for d in loaded.defenses] == ["natural"] and loaded.training_seed(loaded.defenses[0]) == 0
    assert spec.load(write(tmp_path)).replicas == ()


def test_the_benchmark_fixes_torch_threads_unless_the_flag_says_otherwise(tmp_path):
    """The thread count is part of every checkpoint key: the TOML's `threads` decides it for every executor."""
    import argparse

    import torch

    from harness.__main__ import _executor, _threads

    assert spec.load(write(tmp_path)).threads is None
    loaded = spec.load(write(tmp_path, benchmark="threads = 1"))
    assert loaded.threads == 1
    before = torch.get_num_threads()
    flags = dict(executor="sequential", ray_address=None, gpus_per_task=0.0, max_in_flight=None)
    try:
        torch.set_num_threads(2)
        assert _executor(argparse.Namespace(threads=None, **flags), loaded) is None
        assert torch.get_num_threads() == 1
        _executor(argparse.Namespace(threads=2, **flags), loaded)
        assert torch.get_num_threads() == 2
        assert _threads(loaded) == 1 and torch.get_num_threads() == 1  # report, scaling, strength-per-cost
    finally:
        torch.set_num_threads(before)


def test_the_readmes_benchmark_example_loads(tmp_path):
    """What a newcomer copies from 'Writing a benchmark' must load: [benchmark] training_seeds makes replicas of the
    rows only, so the `row = false` model with its own seed beside it is not a conflict."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text[text.index("## Writing a benchmark"):], re.S).group(1)
    (tmp_path / "example.toml").write_text(example)
    loaded = spec.load(tmp_path / "example.toml")
    assert [d.name for d in loaded.extra_models] == ["natural-seed1"] and loaded.extra_models[0].seed == 1
    assert loaded.transfer.models == ("pgd-at", "natural-seed1")
    assert not any(r.name.startswith("natural-seed1@") for r in loaded.replicas)
