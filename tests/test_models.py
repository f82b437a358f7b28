import pytest
import torch

from harness.models import build_model, load_external
from harness.registry import MODELS

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("width", [0.5, 1.0, 2.0])
def test_models_take_unit_inputs_and_scale_with_width(name, width):
    shape = MODELS.info(name)["input_shape"]
    model = build_model(name, num_classes=10, in_channels=shape[0], width=width).eval()
    assert model(torch.rand(3, *shape)).shape == (3, 10)
    narrow = sum(p.numel() for p in build_model(name, num_classes=10, in_channels=shape[0], width=0.5).parameters())
    wide = sum(p.numel() for p in build_model(name, num_classes=10, in_channels=shape[0], width=2.0).parameters())
    assert wide > 3 * narrow


def test_madry_cnn_has_the_published_layout():
    model = build_model("madry-cnn", num_classes=10, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [(l.in_features, l.out_features) for l in linears] == [(64 * 7 * 7, 1024), (1024, 10)]


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="width"):
        build_model("small-cnn", num_classes=10, in_channels=1, width=0)


def test_external_model_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="cannot import"):
        load_external("no_such_module_xyz:build", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_external("harness.models:nope", tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_external("harness.models:small_cnn", tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"\x80\x04corrupt")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_external("harness.models:small_cnn", tmp_path / "w.safetensors")
