"""Label-leak scoring against a direct computation, and its place in the spec and the board."""
import json

import numpy as np
import pytest
import torch

from attacks_ext.label_leak import (certified_static, fit_robust_linear, held_out_predictions, perturbation_probe_rows,
                                    probe_perturbation_labels, relabelled_targets, score_label_leak)
from harness.reports import boards, drift
from harness import spec as spec_module
from harness.reports import aggregate
from harness.matrix import run
from harness.planning import plan
from harness.registry import ATTACKS
from harness.store import CellRecord, ResultStore
from tests.test_matrix import SPEC


def test_counts_match_a_direct_computation():
    rng = np.random.default_rng(0)
    clean, true_label, free = (rng.random(1000) < p for p in (0.9, 0.6, 0.5))
    score = score_label_leak(clean, true_label, free)
    assert score.leaked == sum(1 for t, f in zip(true_label, free) if t and not f)
    assert score.reverse == sum(1 for t, f in zip(true_label, free) if f and not t)
    assert score.clean_errors == int((~clean).sum()) and score.examples == 1000
    assert score.leaked_rate == pytest.approx(score.leaked / 1000)
    assert score.true_label_accuracy == pytest.approx(true_label.mean())


def test_signature_and_the_fgsm_pred_bound():
    clean = np.array([True, True, False, False, True])
    # twins coincide where the clean prediction is right (FGSM-pred), so they may differ on the 2 errors only
    true_label = np.array([True, True, True, True, True])
    free = np.array([True, True, False, False, True])
    score = score_label_leak(clean, true_label, free)
    assert (score.leaked, score.reverse, score.clean_errors) == (2, 0, 2)
    assert score.leaked + score.reverse <= score.clean_errors
    assert score.signature  # 100% on true-label adversarial examples against 60% clean
    assert not score_label_leak(clean, clean, clean).signature


def test_vectors_must_align():
    with pytest.raises(ValueError, match="equally long"):
        score_label_leak([True], [True, False], [True])


LEAK_SPEC = SPEC.replace('[attacks.fgsm]\nattack = "ta-fgsm"', '[attacks.fgsm]\nattack = "fgsm"\n\n[attacks.fgsm-pred]\nattack = "fgsm-pred"') + \
    '\n[label_leak]\npairs = [["fgsm", "fgsm-pred"]]\n'


@pytest.mark.parametrize("pairs, message", [
    ('[["fgsm", "nope"]]', "'nope' is not an \\[attacks\\] column"),
    ('[["fgsm-pred", "fgsm"]]', "must read the true label and the second must not"),
    ('[["fgsm", "pgd-l2"]]', "must read the true label|same norm"),
    ('[["fgsm"]]', "each pair is"),
])
def test_bad_pairs_name_the_key(tmp_path, pairs, message):
    path = tmp_path / "leak.toml"
    path.write_text(LEAK_SPEC.replace('pairs = [["fgsm", "fgsm-pred"]]', f"pairs = {pairs}"))
    with pytest.raises(spec_module.SpecError, match=r"\[label_leak.pairs\].*(" + message + ")"):
        spec_module.load(path)


def test_board_from_stored_vectors(tmp_path, mnist):
    path = tmp_path / "leak.toml"
    path.write_text(LEAK_SPEC)
    spec = spec_module.load(path)
    assert spec.label_leak_pairs == (("fgsm", "fgsm-pred"),)
    rng = np.random.default_rng(1)
    clean = rng.random(60) < 0.8
    vectors = {}
    with ResultStore(tmp_path / "s.sqlite") as store:
        for cell in plan(spec, mnist):
            adv = clean.copy() if cell.attack is None else rng.random(60) < 0.5
            vectors[(cell.label, cell.eps)] = adv
            store.write_cell(CellRecord(cell.key, "t", cell.defense, cell.defense_key, cell.label, "x", {}, cell.norm,
                                        cell.eps, clean, adv, 1.0, 1, 1, cell.seed, {}, "c", "cpu", "now"))
        paths = boards.write(spec, store, mnist, tmp_path / "out", command="test")
    assert [p.name for p in paths] == ["tiny.md", "tiny-label-leaking.md"]
    markdown = paths[1].read_text()
    expected = score_label_leak(clean, vectors[("fgsm", 0.3)], vectors[("fgsm-pred", 0.3)])
    row = next(line for line in markdown.splitlines() if line.startswith("| natural") and "ε=0.3" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[6]) == expected.leaked and int(cells[7]) == expected.reverse and int(cells[8]) == expected.clean_errors
    assert (tmp_path / "out" / "figures" / "tiny-label-leaking.png").is_file()
    # the drift check tells rows apart by their leading text cells (defense, twins, eps)
    tables = drift.cells(json.loads(paths[1].with_suffix(".json").read_text()))
    assert ("Leaked-label counts", "natural | fgsm / fgsm-pred | ε=0.3", "Leaked") in tables


def test_perturbation_probe_reads_the_label_off_the_true_label_gradient(natural_model, mnist):
    """The label-leaking post's probe on a natural model: the sign of the true-label gradient predicts the true
    label better than the pixels do, and every gradient predicts the label that built it."""
    measurements = probe_perturbation_labels(natural_model, mnist.x_test[:300], mnist.y_test[:300],
                                             generator=torch.Generator().manual_seed(0))
    rows = {row["Gradient"]: row for row in perturbation_probe_rows(measurements)}
    assert list(rows) == ["true", "predicted", "least-likely", "random"]
    true = rows["true"]
    assert true["Probe → true label"] == true["Probe → its own label"]
    assert true["Probe → true label"] > true["Raw pixels → true label"] > 5 * true["Chance"] / 2
    assert all(row["Probe → its own label"] > 80 for row in rows.values())
    random_labels = measurements["random_label"]
    assert not (random_labels == measurements["true_label"]).any()  # a random *wrong* label


def test_linear_probe_is_deterministic_and_fits_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2000, 5, generator=generator)
    labels = (features[:, 0] > 0.5).long()
    folds = torch.arange(2000) % 4
    first = held_out_predictions(features, labels, folds, 2)
    assert np.array_equal(first, held_out_predictions(features, labels, folds, 2))
    assert (first == labels.numpy()).mean() > 0.9


def test_perturbation_probe_on_the_board(tmp_path, mnist, natural_model):
    path = tmp_path / "leak.toml"
    path.write_text(LEAK_SPEC + "perturbation_probe = true\n")
    spec = spec_module.load(path)
    probe_cells = [c for c in plan(spec, mnist) if c.probe is not None]
    assert [(c.check, c.request, c.examples) for c in probe_cells] == [("label-leak", "perturbation-probe", 60)]
    with ResultStore(tmp_path / "s.sqlite") as store:
        clean = np.ones(60, bool)
        for cell in plan(spec, mnist):
            measurements = {}
            if cell.probe is not None:
                measurements = probe_perturbation_labels(natural_model, mnist.x_test[:60], mnist.y_test[:60],
                                                         generator=torch.Generator().manual_seed(cell.seed))
            store.write_cell(CellRecord(cell.key, "t", cell.defense, cell.defense_key, cell.label, "x", {}, cell.norm,
                                        cell.eps, clean, clean, 1.0, 1, 1, cell.seed, {}, "c", "cpu", "now",
                                        measurements=measurements))
        paths = boards.write(spec, store, mnist, tmp_path / "out", command="test")
    tables = drift.cells(json.loads(paths[1].with_suffix(".json").read_text()))
    assert {row for heading, row, _ in tables if heading == "Perturbation probe"} == {"natural | true", "natural | predicted",
                                                                                    "natural | least-likely", "natural | random"}
    path.write_text(LEAK_SPEC + "perturbation_probe = 1\n")
    with pytest.raises(spec_module.SpecError, match=r"label_leak.perturbation_probe.*true or false"):
        spec_module.load(path)


ROBUST = 'robust_features = { source = "natural", train_examples = 300, eps = 2.0, steps = 5, epochs = 2 }\n'


def test_robust_feature_leakage_runs_as_a_cell_and_renders_on_the_board(tmp_path, mnist):
    """Ilyas et al.'s data sets built on the natural defense, tested on the evaluation examples, stored and
    rendered as one label-leak board section; its cost counts towards the source's evaluation."""
    path = tmp_path / "leak.toml"
    path.write_text(LEAK_SPEC + ROBUST)
    spec = spec_module.load(path)
    cells = [c for c in plan(spec, mnist) if c.probe is not None]
    assert [(c.defense, c.request, c.examples) for c in cells] == [("natural", "robust-features", 60)]
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run(spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert summary.failed == []
        board = aggregate.build(spec, store, mnist)
        record = board.robust_features
        leak_board = boards.write(spec, store, mnist, tmp_path / "out", command="test")[1]
        markdown = leak_board.read_text()
    m = record.measurements
    assert np.array_equal(m["true_label"], mnist.y_test[:60].numpy())
    assert 0 < m["rand_reached"][0] <= 1 and len(m["det_network_predictions"]) == 60
    assert record.gradient_evals == 2 * 300 * 5  # both data sets: every training image, every step
    assert board.costs.set_index("Defense").loc["natural", "Eval grad"] >= record.gradient_evals
    tables = drift.cells(json.loads(leak_board.with_suffix(".json").read_text()))
    rows = {row for heading, row, _ in tables if heading == "Robust-feature leakage"}
    assert rows == {"D_rand (random other class)", "D_det (y + 1 mod C)"}
    assert "certified constant in the L2 ball of radius 0.25" in markdown


def test_relabelled_targets_and_the_linear_certificate(mnist):
    y = mnist.y_train[:500]
    targets = relabelled_targets(y, 10, torch.Generator().manual_seed(0))
    assert torch.equal(targets["det"], (y + 1) % 10) and not (targets["rand"] == y).any()
    assert len(set(targets["rand"].tolist())) == 10
    x = mnist.x_train[:500]
    weights = fit_robust_linear(x, y, 10, radius=0.25, steps=100)
    assert certified_static(weights, x, 0.25).mean() > 0.8  # Goh's specification 2 holds at its radius
    certified = torch.from_numpy(certified_static(weights, x, 1.5))
    assert 0 < float(certified.float().mean()) < 1
    # the certificate is sound: L2 PGD at that radius against the linear model moves no certified prediction
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10, bias=False)).eval()
    linear[1].weight.data = weights.float()
    with torch.no_grad():
        predicted = linear(x).argmax(1)
    x_adv = ATTACKS.get("pgd-l2")(steps=40)(linear, x, predicted, eps=1.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = linear(x_adv).argmax(1) != predicted
    assert not (moved & certified).any() and moved.any()


@pytest.mark.parametrize("table, message", [
    ('robust_features = { source = "natral" }', "'natral' is not a defense of this benchmark"),
    ('robust_features = { source = "natural", step = 3 }', "unknown key 'step'"),
    ('robust_features = { source = "natural", eps = -1.0 }', "eps must be"),
    ('robust_features = { source = "natural", network = "vgg" }', "unknown model 'vgg'"),
    ('robust_features = { steps = 3 }', "source"),
])
def test_bad_robust_feature_options_name_the_key(tmp_path, table, message):
    path = tmp_path / "leak.toml"
    path.write_text(LEAK_SPEC + table + "\n")
    with pytest.raises(spec_module.SpecError, match=r"label_leak.robust_features.*" + message):
        spec_module.load(path)
