"""Label-leak scoring against a direct computation, and its place in the spec and the board."""
import numpy as np
import pytest
import torch

from attacks_ext.label_leak import held_out_predictions, perturbation_probe_rows, probe_perturbation_labels, score_label_leak
from harness import report, spec as spec_module
from harness.matrix import plan
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
        paths = report.write(spec, store, mnist, tmp_path / "out", command="test")
    assert [p.name for p in paths] == ["tiny.md", "tiny-label-leaking.md"]
    markdown = paths[1].read_text()
    expected = score_label_leak(clean, vectors[("fgsm", 0.3)], vectors[("fgsm-pred", 0.3)])
    row = next(line for line in markdown.splitlines() if line.startswith("| natural") and "ε=0.3" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[6]) == expected.leaked and int(cells[7]) == expected.reverse and int(cells[8]) == expected.clean_errors
    assert (tmp_path / "out" / "figures" / "tiny-label-leaking.png").is_file()
    # the drift check tells rows apart by their leading text cells (defense, twins, eps)
    tables = report.parse_tables(markdown)
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
        paths = report.write(spec, store, mnist, tmp_path / "out", command="test")
    tables = report.parse_tables(paths[1].read_text())
    assert {row for heading, row, _ in tables if heading == "Perturbation probe"} == {"natural | true", "natural | predicted",
                                                                                    "natural | least-likely", "natural | random"}
    path.write_text(LEAK_SPEC + "perturbation_probe = 1\n")
    with pytest.raises(spec_module.SpecError, match=r"label_leak.perturbation_probe.*true or false"):
        spec_module.load(path)
