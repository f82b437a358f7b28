import pytest
import torch

from defenses.recipes import build_recipe
from defenses.train import train
from harness.data import Dataset, load_dataset
from harness.models import correct_predictions


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def tiny_mnist(mnist) -> Dataset:
    """800 train / 200 test digits: enough to train a model that is right most of the time in a second."""
    return Dataset("mnist5k-tiny", mnist.x_train[:800], mnist.y_train[:800], mnist.x_test[:200], mnist.y_test[:200], 10)


@pytest.fixture(scope="session")
def natural_model(mnist):
    """A naturally trained small CNN (2 epochs on mnist5k, ~97% clean)."""
    model, _ = train(build_recipe("natural", epochs=2), mnist, seed=0, progress=False)
    return model


@pytest.fixture()
def batch(mnist):
    return mnist.x_test[:32].clone(), mnist.y_test[:32].clone()


def accuracy(model, x, y) -> float:
    return float(correct_predictions(model, x, y).mean())
