import pytest

from harness.registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry


def test_duplicate_registration_is_an_error():
    registry = Registry("thing")
    registry.register("a-b", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a-b", 2)


def test_unknown_name_lists_known_ones():
    registry = Registry("thing")
    registry.register("alpha", 1)
    registry.register("beta", 2)
    with pytest.raises(KeyError) as info:
        registry.get("gamma")
    assert str(info.value) == "unknown thing 'gamma'; known: alpha, beta"


@pytest.mark.parametrize("bad", ["", "Has-Caps", "has space", None])
def test_ids_are_kebab_case(bad):
    with pytest.raises(ValueError):
        Registry("thing").register(bad, 1)


def test_decorator_form_returns_the_entry():
    registry = Registry("thing")

    @registry.register("f")
    def f():
        return 3

    assert registry.get("f") is f and f() == 3 and list(registry) == ["f"]


def test_built_in_entries_are_registered():
    for name in ("ta-fgsm", "ta-pgd-linf", "ta-pgd-l2", "ta-apgd-ce", "art-fgm-linf", "art-pgd-linf", "pgd-linf", "pgd-l2"):
        assert name in ATTACKS
    for name in ("madry-cnn", "small-cnn", "cifar-resnet20"):
        assert name in MODELS
    assert {"mnist5k", "mnist", "cifar10"} <= set(DATASETS)
    assert {"natural", "pgd-at"} <= set(DEFENSES)
