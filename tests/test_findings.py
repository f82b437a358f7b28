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


def _board(tmp_path, mnist, vectors, sums=None, spec_text=SPEC):
    """Write every planned cell with the vector `vectors(defense, label, eps)` picks, and render the boards."""
    tmp_path.mkdir()
    path = tmp_path / "tiny.toml"
    path.write_text(spec_text)
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
    return _rows(paths[-1], "Claims"), paths[-1]


def _rows(board, section: str) -> dict[str, dict]:
    table = next(t for t in json.loads(board.with_suffix(".json").read_text())["tables"] if t["section"] == section)
    return {row[0]: dict(zip(table["columns"], row)) for row in table["rows"]}


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
    transfer = "One-step examples transfer more than iterative ones; transfer rises with eps"  # no [transfer]: one row
    assert rows[transfer]["Verdict"] == "not measured here" and "mnist-kurakin-findings.md" in rows[transfer]["Ours"]
    assert "One-step adversarial examples transfer more than iterative ones" not in rows
    assert "figures/tiny-dead-units.png" in board.read_text() and (board.parent / "figures/tiny-dead-units.png").is_file()
    table5 = _rows(board, "One-step adversaries for adversarial training (Kurakin et al. Table 5)")
    columns = set(table5["fgsm-at"])
    assert {"fgsm 0.3", "pgd 0.3"} <= columns and "pgd-l2 2" not in columns  # the paper's L∞ columns only

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


CROSS_NORM_SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25
rank_by = ["linf", 0.3]
cascade = true

[eps]
linf = [0.3]
l2 = [2.0]

[defenses.natural]
recipe = "natural"
[defenses.pgd-at]
recipe = "pgd-at"
[defenses.pgd-at-l2]
recipe = "pgd-at-l2"
[defenses.trades]
recipe = "trades"
[defenses.mixed-norm-at]
recipe = "mixed-norm-at"
[defenses.ensemble-at]
recipe = "ensemble-at"
ensemble_sources = ["natural"]
[defenses.atda]
recipe = "atda"

[attacks.pgd]
attack = "pgd-linf"
steps = 5
standalone = true
[attacks.so-linf]
attack = "so-linf"
steps = 5
standalone = true
[attacks.last]
attack = "pgd-linf"
steps = 3
[attacks.pgd-l2]
attack = "pgd-l2"
steps = 5
standalone = true
[attacks.so-l2]
attack = "so-l2"
steps = 5
standalone = true

[findings]
"""


def test_the_cross_norm_table_and_its_claims_follow_the_stored_vectors(tmp_path, mnist):
    shares = {  # (defense, column) -> robust share; the rest keep 0.5. "last" runs on the chain's survivors.
        ("pgd-at", "so-l2"): 0.1, ("pgd-at", "pgd-l2"): 0.3, ("pgd-at-l2", "so-linf"): 0.05, ("pgd-at-l2", "pgd"): 0.6,
        ("mixed-norm-at", "last"): 0.2, ("mixed-norm-at", "so-l2"): 0.2, ("pgd-at", "pgd"): 0.9,
        ("pgd-at", "so-linf"): 0.9, ("pgd-at-l2", "pgd-l2"): 0.9, ("pgd-at-l2", "so-l2"): 0.9,
        ("ensemble-at", "pgd-l2"): 0.7, ("ensemble-at", "so-l2"): 0.7, ("atda", "pgd-l2"): 0.1, ("atda", "so-l2"): 0.1}

    def vectors(defense, label, eps):
        return _share(shares.get((defense, label), 0.5))

    rows, board = _board(tmp_path / "a", mnist, vectors, spec_text=CROSS_NORM_SPEC)
    table = _rows(board, "The cross-norm table (Li et al. Table 1)")
    assert set(table) == {"natural", "pgd-at", "pgd-at-l2", "trades", "mixed-norm-at", "ensemble-at", "atda"}
    pgd_at = table["pgd-at"]  # each column its own accuracy; the worst case per example over the norm's columns
    robust = lambda share: pytest.approx(100 * np.mean(_share(share) & (np.arange(60) % 10 != 0)))  # 54 clean-right
    assert (pgd_at["PGD-L∞ 0.3"], pgd_at["S-O-L∞ 0.3"], pgd_at["Worst L∞ 0.3"]) == (robust(0.9), robust(0.9), robust(0.5))
    assert (pgd_at["PGD-L2 2"], pgd_at["S-O-L2 2"], pgd_at["Worst L2 2"]) == (robust(0.3), robust(0.1), robust(0.1))
    assert pgd_at["Paper PGD-L2"] == 0.4 and table["atda"]["Trained with"] == "ATDA, L∞"
    assert table["natural"]["Paper PGD-L∞"] is None
    assert rows["S-O finds what PGD misses on a model attacked in the norm it was not trained for"]["Verdict"] == "reproduced"
    assert "60 test digits, columns pgd-l2, so-l2, pgd, so-linf" in rows[
        "S-O finds what PGD misses on a model attacked in the norm it was not trained for"]["Ours"]
    mixed = "Training on mixed L∞ and L2 examples barely helps: it matches neither single-norm model in its own norm"
    fix = "Ensemble adversarial training and ATDA partly fix the cross-norm collapse of L∞ training"
    assert (rows[mixed]["Verdict"], rows[fix]["Verdict"]) == ("reproduced", "partly")
    assert not any(claim.startswith("The cross-norm table") for claim in rows)  # the table is on this board
    leaderboard = (board.parent / "tiny.md").read_text()  # says which cascade columns hold their own accuracy
    assert "pgd, so-linf, pgd-l2, so-l2 are marked standalone and ran on every example" in leaderboard
    assert "| last | pgd-linf | steps=3 | L∞ | 0.3 | survivors |" in " ".join(leaderboard.split())

    shares.update({("mixed-norm-at", "so-l2"): 0.9, ("mixed-norm-at", "pgd-l2"): 0.9, ("atda", "pgd-l2"): 0.7,
                   ("atda", "so-l2"): 0.7, ("pgd-at-l2", "so-linf"): 0.6, ("pgd-at", "so-l2"): 0.3})
    rows, _ = _board(tmp_path / "b", mnist, vectors, spec_text=CROSS_NORM_SPEC)
    assert (rows[mixed]["Verdict"], rows[fix]["Verdict"]) == ("partly", "reproduced")
    assert rows["S-O finds what PGD misses on a model attacked in the norm it was not trained for"]["Verdict"] == (
        "not reproduced")


def test_the_first_column_of_a_chain_holds_its_own_accuracy_without_being_marked_standalone(tmp_path, mnist):
    """mnist-li leaves its first L2 column unmarked so that its cells are the quick board's: only the clean
    evaluation comes before it, so it attacks every clean-correct example and the Table 1 column reads it."""
    spec_text = CROSS_NORM_SPEC.replace('[attacks.pgd-l2]\nattack = "pgd-l2"\nsteps = 5\nstandalone = true\n',
                                        '[attacks.pgd-l2]\nattack = "pgd-l2"\nsteps = 5\n')
    assert spec_text != CROSS_NORM_SPEC
    _, board = _board(tmp_path / "a", mnist, lambda defense, label, eps: _share(0.3 if label == "pgd-l2" else 0.5),
                      spec_text=spec_text)
    table = _rows(board, "The cross-norm table (Li et al. Table 1)")
    assert table["pgd-at"]["PGD-L2 2"] == pytest.approx(100 * np.mean(_share(0.3) & (np.arange(60) % 10 != 0)))
    leaderboard = " ".join((board.parent / "tiny.md").read_text().split())
    assert "| pgd-l2 | pgd-l2 | steps=5 | L2 | 2 | every clean-correct example |" in leaderboard
    assert "| last | pgd-linf | steps=3 | L∞ | 0.3 | survivors |" in leaderboard  # not first: after pgd and so-linf


KURAKIN_SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25
rank_by = ["linf", 0.1]

[eps]
linf = [0.1, 0.3]

[defenses.natural]
recipe = "natural"
[defenses.fgsm-at]
recipe = "fgsm-at"
[defenses.step-ll-at]
recipe = "step-ll-at"
[defenses.random-sign-at]
recipe = "fgsm-at"
adversary = "random-sign"
[defenses.natural-w05]
recipe = "natural"
width = 0.5
[defenses.natural-w2]
recipe = "natural"
width = 2.0
[defenses.step-ll-at-w05]
recipe = "step-ll-at"
width = 0.5
[defenses.step-ll-at-w2]
recipe = "step-ll-at"
width = 2.0

[attacks.fgsm]
attack = "fgsm"
[attacks.step-ll]
attack = "step-ll"
[attacks.iter-ll]
attack = "iter-ll"
eps = [0.1]

[findings]
"""


def test_kurakin_table5_and_capacity_follow_the_stored_vectors(tmp_path, mnist):
    shares = {("step-ll-at-w05", "step-ll"): 0.3, ("step-ll-at", "step-ll"): 0.5, ("step-ll-at-w2", "step-ll"): 0.7,
              ("step-ll-at-w05", "iter-ll"): 0.1, ("step-ll-at-w2", "iter-ll"): 0.2,
              ("natural", "step-ll"): 0.4, ("natural", "iter-ll"): 0.3, ("random-sign-at", "fgsm"): 0.25}

    def vectors(defense, label, eps):
        return _share(shares.get((defense, label), 0.1))

    rows, board = _board(tmp_path / "a", mnist, vectors, spec_text=KURAKIN_SPEC)
    table5 = _rows(board, "One-step adversaries for adversarial training (Kurakin et al. Table 5)")
    assert set(table5) == {"natural", "fgsm-at", "step-ll-at", "random-sign-at"}  # width 1 only
    sign = table5["random-sign-at"]  # every example counts, clean-misclassified ones too
    assert (sign["Adversary"], sign["fgsm 0.1"], sign["Clean"]) == ("random-sign", pytest.approx(25.0), pytest.approx(90.0))
    assert sign["Paper: clean / FGSM 2, 4, 8, 16"] == "76.5 / 38.8, 36.6, 35.0, 32.7"
    assert "random-sign-at (random-sign)" in rows[
        "Step l.l. or step rnd. is the best one-step adversary for adversarial training"]["Ours"]
    capacity = _rows(board, "Model capacity (Kurakin et al. Sec. 4.3)")
    assert [r["Width"] for r in capacity.values()] == [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]
    by_defense = capacity
    assert by_defense["step-ll-at-w2"]["step-ll ratio"] == pytest.approx(0.7 * 60 / 54)  # adversarial / clean
    assert "iter-ll ratio" in by_defense["natural"] and "fgsm ratio" not in by_defense["natural"]  # Fig. 1's attacks
    gains = "Adversarially trained models get more robust with width"
    optimum = "Naturally trained models have an optimal width for robustness"
    assert (rows[gains]["Verdict"], rows[optimum]["Verdict"]) == ("reproduced", "reproduced")
    assert not any(claim.startswith("Adversarially trained models get more robust with width;") for claim in rows)
    assert (board.parent / "figures/tiny-capacity.png").is_file()

    shares.update({("step-ll-at-w2", "step-ll"): 0.45, ("step-ll-at-w2", "iter-ll"): 0.05, ("natural", "iter-ll"): 0.1,
                   ("natural-w2", "step-ll"): 0.6})
    rows, _ = _board(tmp_path / "b", mnist, vectors, spec_text=KURAKIN_SPEC)
    assert (rows[gains]["Verdict"], rows[optimum]["Verdict"]) == ("not reproduced", "not reproduced")
