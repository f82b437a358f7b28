"""Every registered entry is tested by being registered: a new data set, model, recipe, attack or check (a
plugin's too) is picked up by these parametrized tests with no test code of its own."""
import inspect
import math

import pytest
import torch

from defenses.recipes import build_recipe
from defenses.train import build_recipe_model, train
from harness import spec as spec_module
from harness.reports import aggregate
from harness.check_types import Status, Verdict
from harness.data import Dataset, load_dataset
from harness.matrix import run
from harness.models import build_model
from harness.registry import CHECKS, DATASETS, DEFENSES
from harness.store import ResultStore
from tests.test_matrix import SPEC


@pytest.mark.parametrize("dataset_id", list(DATASETS))
def test_every_data_set_matches_its_metadata_or_names_its_files(dataset_id, tmp_path):
    info = DATASETS.info(dataset_id)
    if info["needs_files"]:
        with pytest.raises(FileNotFoundError, match=dataset_id):
            load_dataset(dataset_id, data_dir=str(tmp_path))
        return
    data = load_dataset(dataset_id)
    assert data.input_shape == info["input_shape"] and data.num_classes == info["classes"]
    assert float(data.x_train.min()) >= 0 and float(data.x_train.max()) <= 1 and len(data.x_test) > 0


@pytest.fixture(scope="module")
def digits(mnist) -> Dataset:
    """48 training digits: every recipe's loop runs its steps in well under a second."""
    return Dataset("digits", mnist.x_train[:48], mnist.y_train[:48], mnist.x_test[:16], mnist.y_test[:16], 10)


@pytest.mark.parametrize("recipe_id", list(DEFENSES))
def test_every_recipe_trains_one_epoch(recipe_id, digits):
    recipe = build_recipe(recipe_id, epochs=1, batch_size=16)
    torch.manual_seed(0)  # the loop builds its model right after seeding the same way: `start` is its initial state
    start = build_recipe_model(recipe, digits)
    sources = {name: build_model(recipe.model, num_classes=10, in_channels=1).eval() for name in recipe.ensemble_sources}
    model, log = train(recipe, digits, seed=0, progress=False, sources=sources)
    assert len(log.epochs) == 1 and math.isfinite(log.epochs[0]["loss"]) and log.forward_passes >= len(digits.x_train)
    moved = [not torch.equal(a, b) for a, b in zip(start.state_dict().values(), model.state_dict().values())
             if a.is_floating_point()]
    assert any(moved), "training left every weight where it started"
    with torch.no_grad():
        assert torch.isfinite(model(digits.x_test)).all()


def _generic_options(check) -> dict:
    """Options that make any check cheap on the tiny benchmark below: fewer examples where it takes some."""
    parameters = inspect.signature(check.__init__).parameters
    return {"examples": 5} if isinstance(getattr(parameters.get("examples"), "default", None), int) else {}


# test_matrix's tiny benchmark (a one-step, an iterative L-inf and an L2 column, two L-inf eps) on 20 examples
TINY = SPEC.replace('name = "tiny"', 'name = "every-check"').replace("eval_examples = 60", "eval_examples = 20")


@pytest.fixture(scope="module")
def every_check(tmp_path_factory, mnist):
    """One tiny benchmark that runs every registered check on one quickly trained model."""
    folder = tmp_path_factory.mktemp("every-check")
    tables = "".join(f"\n[checks.{check_id}]\n" + "".join(f"{k} = {v}\n" for k, v in _generic_options(check).items())
                     for check_id, check in CHECKS.items())
    (folder / "b.toml").write_text(TINY + tables)
    spec = spec_module.load(folder / "b.toml")
    with ResultStore(folder / "s.sqlite") as store:
        summary = run(spec, store=store, cache_dir=folder / "ckpt", device=torch.device("cpu"), progress=False,
                      data=mnist)
        assert summary.failed == []
        return aggregate.build(spec, store, mnist)


@pytest.mark.slow
@pytest.mark.parametrize("check_id", list(CHECKS))
def test_every_check_runs_and_returns_a_typed_verdict(check_id, every_check):
    verdict = every_check.verdicts["natural"][check_id]
    assert isinstance(verdict, Verdict) and verdict.check == check_id
    assert isinstance(verdict.status, Status), f"{check_id}: {verdict.reason}"  # None would be missing evidence
    assert verdict.reason
