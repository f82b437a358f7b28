import pytest
import torch

from harness.threat import Norm, ThreatModelViolation, verify


def test_accepts_points_on_the_boundary():
    x = torch.full((2, 1, 4, 4), 0.5)
    verify(x, x + 0.1, Norm.LINF, 0.1)
    delta = torch.zeros_like(x)
    delta[:, 0, 0, 0] = 0.3
    verify(x, x + delta, Norm.L2, 0.3)


@pytest.mark.parametrize("norm, change, match", [
    (Norm.LINF, lambda x: x + 0.11, "exceed the linf budget"),
    (Norm.L2, lambda x: x + 0.1, "exceed the l2 budget"),
    (Norm.LINF, lambda x: x * float("nan"), "NaN"),
    (Norm.LINF, lambda x: x - 0.6, r"leave \[0, 1\]"),
    (Norm.LINF, lambda x: x[:1], "shape"),
])
def test_rejects_violations(norm, change, match):
    x = torch.full((2, 1, 4, 4), 0.5)
    with pytest.raises(ThreatModelViolation, match=match):
        verify(x, change(x), norm, 0.1)


def test_norm_parse_names_allowed_values():
    assert Norm.parse("LINF") is Norm.LINF
    with pytest.raises(ValueError, match="allowed: linf, l2"):
        Norm.parse("l1")
