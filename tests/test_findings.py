"""The findings board: the dead-unit probe against a hand computation, recipes classified by their fields, and
verdicts that follow the stored vectors (each rule flipped by changing the data it reads)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from attacks_ext.feature_units import dead_units, probe_penultimate_units
from defenses.recipes import build_recipe
from harness import spec as spec_module
from harness.planning import plan
from harness.reports import boards
from harness.reports.claims import kind
from harness.spec_types import DefenseSpec
from harness.store import CellRecord, ResultStore

SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25
rank_by = ["linf", 0.3]

[eps]
linf = [0.1, 0.3]
l2 = [2.0]

[defenses.natural]
recipe = "natural"

[defenses.fgsm-at]
recipe = "fgsm-at"

[defenses.step-ll-at]
recipe = "step-ll-at"

[defenses.pgd-at]
recipe = "pgd-at"

[defenses.pgd-at-l2]
recipe = "pgd-at-l2"

[defenses.gn]
recipe = "gaussian-noise"

[defenses.ls-gn]
recipe = "ls-gn"

[defenses.lsq-gn]
recipe = "lsq-gn"

[attacks.fgsm]
attack = "fgsm"

[attacks.fgsm-pred]
attack = "fgsm-pred"

[attacks.pgd]
attack = "pgd-linf"
steps = 5

[attacks.pgd-l2]
attack = "pgd-l2"
steps = 5

[label_leak]
pairs = [["fgsm", "fgsm-pred"]]

[findings]
dead_units = true
"""


def test_dead_unit_probe_sums_the_logit_layers_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight[:2] = 0.0
        model[1].bias[:2] = -1.0  # units 0 and 1 never fire; the other four always do (inputs are in [0, 1))
        model[1].weight[2:] = model[1].weight[2:].abs()
        model[1].bias[2:] = 0.1
    x = torch.rand(40, 1, 2, 2)
    m = probe_penultimate_units(model, x, torch.zeros(40, dtype=torch.long), generator=None, batch_size=16)
    features = torch.relu(model[1](x.flatten(1))).detach()
    np.testing.assert_allclose(m["unit_activation_sum"], features.abs().sum(0).double().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(m["unit_active_examples"], (features != 0).sum(0).numpy())
    assert dead_units(m) == (2, 6)
    with pytest.raises(ValueError, match="no nn.Linear output layer"):
        probe_penultimate_units(nn.Sequential(nn.Flatten()), x, None, generator=None)


def test_kind_reads_what_a_recipe_trains():
    expected = {"natural": "natural", "fgsm-at": "one-step", "step-ll-at": "one-step", "pgd-at": "pgd-linf",
                "pgd-at-l2": "pgd-l2", "trades": "trades", "gaussian-noise": "gn", "ls-gn": "ls-gn", "lsq-gn": "lsq-gn",
                "atda": "other", "mixed-norm-at": "other"}
    assert {name: kind(DefenseSpec(name, build_recipe(name))) for name in expected} == expected
    assert kind(DefenseSpec("b", build_recipe("natural", input_levels=2))) == "masked"


def _board(tmp_path, mnist, vectors, sums=None):
    """Write every planned cell with the vector `vectors(defense, label, eps)` picks, and render the boards."""
    tmp_path.mkdir()
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    spec = spec_module.load(path)
    clean = np.arange(60) % 10 != 0  # 54 of 60 right
    with ResultStore(tmp_path / "s.sqlite") as store:
        for cell in plan(spec, mnist):
            measurements = {}
            if cell.probe is not None:
                unit_sums = (sums or {}).get(cell.defense, np.ones(8))
                measurements = {"unit_activation_sum": unit_sums, "unit_active_examples": (unit_sums > 0) * 60,
                                "examples": np.asarray([60])}
            adv = clean if cell.attack is None else vectors(cell.defense, cell.label, cell.eps)
            store.write_cell(CellRecord(cell.key, "t", cell.defense, cell.defense_key, cell.label, "x", {}, cell.norm,
                                        cell.eps, clean, adv, 1.0, 1, 1, cell.seed, {}, "c", "cpu", "now",
                                        measurements=measurements))
        paths = boards.write(spec, store, mnist, tmp_path / "out", command="test")
    assert paths[-1].name == "tiny-findings.md"
    table = next(t for t in json.loads(paths[-1].with_suffix(".json").read_text())["tables"] if t["section"] == "Claims")
    return {row[0]: dict(zip(table["columns"], row)) for row in table["rows"]}, paths[-1]


def _share(share: float) -> np.ndarray:
    return np.arange(60) < round(60 * share)


def test_verdicts_follow_the_stored_vectors(tmp_path, mnist):
    def collapsed(defense, label, eps):  # nothing leaks; pgd-at falls to the natural model's level at L2
        if defense == "step-ll-at" and label in ("fgsm", "fgsm-pred"):
            return np.arange(60) % 10 != 0  # as accurate as clean: no signature, nothing leaked
        if label == "pgd-l2":
            return _share(0.8 if defense == "pgd-at-l2" else 0.1)
        return _share(0.5)

    rows, board = _board(tmp_path / "a", mnist, collapsed, sums={"pgd-at": np.r_[np.zeros(4), np.ones(4)],
                                                                  "ls-gn": np.r_[np.zeros(2), np.ones(6)],
                                                                  "lsq-gn": np.r_[np.zeros(3), np.ones(5)]})
    leak = rows["One-step training on the true label leaks it"]
    collapse = rows["L∞ adversarial training collapses under L2 attacks"]
    assert (leak["Verdict"], collapse["Verdict"]) == ("not reproduced", "reproduced")
    assert rows["Adversarial training, label smoothing and logit squeezing deactivate feature units; natural training "
                "does not"]["Verdict"] == "reproduced"
    assert rows["Leaked + reverse never exceed the clean errors"]["Verdict"] == "reproduced"
    assert rows["The cross-norm table: six training methods x PGD/S-O at L∞ and L2"]["Verdict"] == "not measured here"
    assert "figures/tiny-dead-units.png" in board.read_text() and (board.parent / "figures/tiny-dead-units.png").is_file()

    def leaking(defense, label, eps):  # the FGSM-trained model beats its clean accuracy on true-label FGSM examples
        if label == "fgsm" and defense == "fgsm-at":
            return np.ones(60, bool)
        if label == "pgd-l2":
            return _share(0.8 if defense == "pgd-at-l2" else 0.5 if defense == "pgd-at" else 0.1)
        return _share(0.5)

    dead_everywhere = {name: np.r_[np.zeros(4), np.ones(4)] for name in ("natural", "pgd-at", "ls-gn", "lsq-gn")}
    rows, _ = _board(tmp_path / "b", mnist, leaking, sums=dead_everywhere)  # natural training kills units too
    assert rows["One-step training on the true label leaks it"]["Verdict"] == "reproduced"
    assert rows["L∞ adversarial training collapses under L2 attacks"]["Verdict"] == "partly"
    assert rows["Adversarial training, label smoothing and logit squeezing deactivate feature units; natural training "
                "does not"]["Verdict"] == "not reproduced"


def test_bad_findings_table_names_the_key(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC.replace("dead_units = true", "dead_units = 1"))
    with pytest.raises(spec_module.SpecError, match=r"findings.dead_units.*true or false"):
        spec_module.load(path)
    path.write_text(SPEC.replace("dead_units = true", "dead = true"))
    with pytest.raises(spec_module.SpecError, match=r"findings.*unknown key 'dead'.*allowed: dead_units"):
        spec_module.load(path)
