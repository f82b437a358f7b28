"""The one training loop and the checkpoint cache."""
import json

import pytest
import torch

import defenses.checkpoints as checkpoints
import defenses.train as training
from defenses.recipes import build_recipe
from defenses.checkpoints import checkpoint_key, obtain_checkpoint
from defenses.train import train
from tests.conftest import accuracy


def test_natural_training_learns(tiny_mnist):
    model, log = train(build_recipe("natural", epochs=2), tiny_mnist, seed=0, progress=False)
    assert not model.training
    assert accuracy(model, tiny_mnist.x_test, tiny_mnist.y_test) > 0.75
    assert [e["epoch"] for e in log.epochs] == [1, 2]
    assert log.forward_passes == 2 * 800 and log.backward_passes == 2 * 800  # one pass per example per epoch


def test_the_logged_clean_accuracy_is_the_models_on_the_fixed_monitor_images(tiny_mnist):
    """Measured once per epoch on the first training images, not by a clean pass beside every training batch."""
    model, log = train(build_recipe("gaussian-noise", epochs=1), tiny_mnist, seed=0, progress=False)
    monitored = min(training.MONITOR_EXAMPLES, len(tiny_mnist.x_train))
    expected = accuracy(model, tiny_mnist.x_train[:monitored], tiny_mnist.y_train[:monitored])
    assert log.epochs[-1]["clean_accuracy"] == pytest.approx(expected)
    assert log.forward_passes == 800  # the monitor pass is bookkeeping, not training cost


def test_same_seed_same_weights(tiny_mnist):
    recipe = build_recipe("natural", epochs=1)
    first, _ = train(recipe, tiny_mnist, seed=3, progress=False)
    second, _ = train(recipe, tiny_mnist, seed=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_pgd_at_trains_on_adversarial_examples_with_the_eps_ramp(tiny_mnist):
    recipe = build_recipe("pgd-at", epochs=2, eps_ramp_epochs=2, adversary_options={"steps": 3})
    assert recipe.adversary == "pgd-linf" and recipe.eps == 0.3
    assert [recipe.eps_at(e) for e in range(3)] == [0.15, 0.3, 0.3]
    _, log = train(recipe, tiny_mnist, seed=0, progress=False)
    # per example and epoch: 3 adversary steps + the training pass (bookkeeping forwards are not training cost)
    assert log.forward_passes == 2 * 800 * (3 + 1)
    assert log.backward_passes == 2 * 800 * (3 + 1)
    assert all(e["adversary_accuracy"] is not None for e in log.epochs)


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 3}, "unknown option 'epoch'"),
    ({"eps": -0.1}, "eps must be"),
    ({"lr": 0}, "lr must be a finite number > 0"),
    ({"model": "vgg"}, "unknown model 'vgg'"),
    ({"optimizer": "rmsprop"}, "allowed: adam, sgd"),
    ({"adversary": "pgd-linfinity"}, "unknown attack"),
])
def test_bad_recipes_fail_before_training(overrides, message):
    with pytest.raises((ValueError, KeyError), match=message):
        build_recipe("natural", **overrides)


def test_cache_trains_once_then_loads(tiny_mnist, tmp_path, monkeypatch):
    recipe = build_recipe("natural", epochs=1)
    first = obtain_checkpoint(recipe, tiny_mnist, seed=0, cache_dir=tmp_path, progress=False)
    assert first.weights.suffix == ".safetensors" and first.weights.exists()
    assert first.key == checkpoint_key(recipe, tiny_mnist, 0)
    monkeypatch.setattr(checkpoints, "train", lambda *a, **k: pytest.fail("retrained although the cache was valid"))
    second = obtain_checkpoint(recipe, tiny_mnist, seed=0, cache_dir=tmp_path, progress=False)
    assert second.key == first.key and second.log["forward_passes"] == 800


def test_cache_key_depends_on_recipe_data_seed_and_code(tiny_mnist, mnist, monkeypatch):
    recipe = build_recipe("natural", epochs=1)
    base = checkpoint_key(recipe, tiny_mnist, 0)
    assert base != checkpoint_key(build_recipe("natural", epochs=2), tiny_mnist, 0)
    assert base != checkpoint_key(recipe, mnist, 0)
    assert base != checkpoint_key(recipe, tiny_mnist, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)  # 1 and 2 threads train different bits
    try:
        assert base != checkpoint_key(recipe, tiny_mnist, 0)
    finally:
        torch.set_num_threads(threads)
    assert base == checkpoint_key(recipe, tiny_mnist, 0)
    monkeypatch.setattr(checkpoints, "training_code_version", lambda roots=(): "edited")
    assert base != checkpoint_key(recipe, tiny_mnist, 0)


def test_training_code_version_follows_imports_not_folders(tmp_path, monkeypatch):
    """The key covers the modules training imports (transitively): a new attack or check module, or an edit to
    code training never runs, leaves every checkpoint valid; an edit to the adversary's module does not."""
    import shutil

    for package in training.OUR_PACKAGES:
        shutil.copytree(training.REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(training, "REPO_ROOT", tmp_path)
    recipe = build_recipe("pgd-at")
    roots = training.recipe_code_roots(recipe)
    assert "attacks_ext.pgd" in roots and "harness.models" in roots
    before = training.training_code_version(roots)
    (tmp_path / "attacks_ext" / "my_new_attack.py").write_text("x = 1\n")
    with open(tmp_path / "attacks_ext" / "checks" / "monotone_eps.py", "a") as handle:
        handle.write("# a check changed\n")
    with open(tmp_path / "harness" / "reports" / "aggregate.py", "a") as handle:
        handle.write("# a report changed\n")
    with open(tmp_path / "defenses" / "checkpoints.py", "a") as handle:  # how the cache is written, not training
        handle.write("# the cache changed\n")
    assert training.training_code_version(roots) == before
    with open(tmp_path / "attacks_ext" / "base.py", "a") as handle:  # imported by the adversary's module
        handle.write("# the attack interface changed\n")
    assert training.training_code_version(roots) != before


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "sidecar"])
def test_damaged_cache_is_reported_and_retrained(tiny_mnist, tmp_path, capsys, damage):
    recipe = build_recipe("natural", epochs=1)
    first = obtain_checkpoint(recipe, tiny_mnist, seed=0, cache_dir=tmp_path, progress=False)
    raw = bytearray(first.weights.read_bytes())
    if damage == "flip-byte":
        raw[-10] ^= 0xFF
        first.weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        first.weights.write_bytes(bytes(raw[:100]))
    else:
        first.weights.with_suffix(".json").write_text("{not json")
    again = obtain_checkpoint(recipe, tiny_mnist, seed=0, cache_dir=tmp_path, progress=False)
    assert "failed verification" in capsys.readouterr().err
    assert json.loads(again.weights.with_suffix(".json").read_text())["sha256"] == checkpoints.file_sha256(again.weights)


def test_the_weights_digest_sees_the_tensors_not_the_file(tmp_path):
    """strength-per-cost reuses AutoAttack's rows by this digest: the same weights saved under another checkpoint
    key (file metadata) hash alike, and one changed value does not."""
    from safetensors.torch import save_file

    from defenses.checkpoints import weights_digest

    state = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.zeros(2)}
    save_file(state, tmp_path / "a.safetensors", metadata={"key": "before"})
    save_file(state, tmp_path / "b.safetensors", metadata={"key": "after"})
    save_file({**state, "layer.bias": torch.tensor([0.0, 1e-7])}, tmp_path / "c.safetensors", metadata={"key": "before"})
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()
    assert weights_digest(tmp_path / "a.safetensors") == weights_digest(tmp_path / "b.safetensors")
    assert weights_digest(tmp_path / "a.safetensors") != weights_digest(tmp_path / "c.safetensors")
