"""[transfer]: Kurakin et al.'s transfer matrices. Each cell crafts once on its source and every model classifies the
result; the stored rows agree with torchattacks' FGSM and BIM crafted by hand on the same models; the rates follow
the paper's definitions (a hand computation); the claims' verdicts follow the stored vectors; bad sections name
their key."""
import json

import numpy as np
import pytest
import torch
import torchattacks
from safetensors.torch import save_file

from harness import spec as spec_module
from harness.matrix import run
from harness.planning import plan
from harness.preparation import prepare_defenses
from harness.reports import boards
from harness.reports.transfer import rates
from harness.store import CellRecord, ResultStore

SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 40
batch_size = 16
rank_by = ["linf", 0.1]

[eps]
linf = [0.1]

[defenses.a]
factory = "tests.planted:natural"
weights = "a.safetensors"

[defenses.b]                 # trained here at another seed, for the matrices only
recipe = "natural"
epochs = 1
seed = 1
row = false

[attacks.fgsm]
attack = "fgsm"

[transfer]
models = ["a", "b"]
attacks = ["fgsm", "iter-basic"]
eps = [0.1]
sweep = [0.05, 0.1]

[findings]
"""


def _predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_each_cell_crafts_once_and_every_model_classifies_what_torchattacks_crafts(tmp_path, mnist, natural_model):
    save_file({k: v.contiguous() for k, v in natural_model.state_dict().items()}, str(tmp_path / "a.safetensors"))
    (tmp_path / "tiny.toml").write_text(SPEC)
    spec = spec_module.load(tmp_path / "tiny.toml")
    assert [d.name for d in spec.defenses] == ["a"] and [d.name for d in spec.extra_models] == ["b"]
    cells = [c for c in plan(spec, mnist) if c.targets]
    # two sources x two methods at 0.1, and the first model's examples at the sweep's other eps
    assert sorted((c.defense, c.attack.attack_id, c.eps) for c in cells) == [
        ("a", "fgsm", 0.05), ("a", "fgsm", 0.1), ("a", "iter-basic", 0.05), ("a", "iter-basic", 0.1),
        ("b", "fgsm", 0.1), ("b", "iter-basic", 0.1)]
    assert all(c.targets == ("a", "b") for c in cells)
    assert not any(c.defense == "b" and not c.targets for c in plan(spec, mnist))  # no row, no column, no clean cell
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert run(spec, store=store, cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False,
                   data=mnist).failed == []
        records = store.cells([c.key for c in cells])
        board_paths = boards.write(spec, store, mnist, tmp_path / "out", command="test")
    prepared = prepare_defenses(spec, ["a", "b"], mnist, cache_dir=tmp_path / "c", device=torch.device("cpu"),
                                progress=False)
    model_a, model_b = (prepared[n].load_model(mnist, torch.device("cpu")) for n in ("a", "b"))
    x, y = mnist.x_test[:40], mnist.y_test[:40]
    by = {(c.defense, c.attack.attack_id, c.eps): records[c.key] for c in cells}

    crafted = {("a", "fgsm"): torchattacks.FGSM(model_a, eps=0.1)(x, y),
               ("b", "iter-basic"): torchattacks.BIM(model_b, eps=0.1, alpha=1 / 255, steps=30)(x, y)}
    for (source, method), x_adv in crafted.items():
        record = by[(source, method, 0.1)]
        target_adv = record.measurements["target_adv"]
        for row, model in enumerate((model_a, model_b)):
            assert np.array_equal(target_adv[row], (_predictions(model, x_adv) == y).numpy()), (source, method, row)
            assert np.array_equal(record.measurements["target_clean"][row], (_predictions(model, x) == y).numpy())
        source_model = model_a if source == "a" else model_b
        assert np.array_equal(record.adv_correct, (_predictions(source_model, x_adv) == y).numpy())
    # crafted once, on the source: FGSM is one gradient per example; BIM at eps 0.1 takes min(25.5 + 4, 1.25 * 25.5)
    # steps in 0-255 units, rounded up to 30, and runs them all (no early stop)
    assert (by[("a", "fgsm", 0.1)].forward_evals, by[("a", "fgsm", 0.1)].gradient_evals) == (40, 40)
    assert by[("b", "iter-basic", 0.1)].gradient_evals == 40 * 30

    findings = board_paths[-1]
    tables = {t["section"]: t for t in json.loads(findings.with_suffix(".json").read_text())["tables"]}
    matrix = tables["Transfer rate (Table 4)"]
    row = dict(zip(matrix["columns"], next(r for r in matrix["rows"] if r[1] == "fgsm" and r[2] == "A a")))
    transferred, eligible = rates(by[("a", "fgsm", 0.1)], 1)[0]
    assert row["→ B"] == pytest.approx(100 * transferred / eligible) and row["→ A"] == pytest.approx(100.0)
    figure = "figures/tiny-transfer-eps.png"
    assert figure in findings.read_text() and (findings.parent / figure).is_file()


def test_rates_follow_the_papers_definitions():
    """Hand computation: the transfer rate keeps examples the source gets right clean and wrong adversarial and the
    target gets right clean; the error rate counts every adversarial example."""
    source_clean = np.array([1, 1, 1, 1, 0, 1], bool)
    source_adv = np.array([0, 0, 1, 0, 0, 0], bool)
    target_clean = np.array([1, 1, 1, 0, 1, 1], bool)
    target_adv = np.array([0, 1, 1, 0, 0, 1], bool)
    record = CellRecord("k", "t", "a", "ka", "x", "fgsm", {}, "linf", 0.1, source_clean, source_adv, 1.0, 1, 1, 0, {},
                        "c", "cpu", "now", measurements={"target_clean": np.stack([source_clean, target_clean]),
                                                         "target_adv": np.stack([source_adv, target_adv])})
    # eligible: examples 0, 1, 5; of those the target misclassifies example 0 only
    assert rates(record, 1) == ((1, 3), (3, 6))
    assert rates(record, 0) == ((4, 4), (5, 6))  # the source on its own examples: every eligible one transfers


CLAIMS_SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25
rank_by = ["linf", 0.1]

[eps]
linf = [0.1]

[defenses.a]
recipe = "natural"
[defenses.b]
recipe = "natural"
seed = 1
row = false
[defenses.c]
recipe = "natural"
activation = "elu"
row = false

[attacks.fgsm]
attack = "fgsm"

[transfer]
models = ["a", "b", "c"]
attacks = ["fgsm", "step-ll", "iter-basic"]
eps = [0.1]
sweep = [0.05, 0.1, 0.3]

[findings]
"""


def _claims(tmp_path, mnist, rate):
    """Write every planned cell; a [transfer] cell's target rows transfer `rate(source, method, eps, target)` of its 30
    eligible examples (the source gets 50 of 60 right clean and fools 30 of them; every target gets all 60 right)."""
    tmp_path.mkdir()
    (tmp_path / "tiny.toml").write_text(CLAIMS_SPEC)
    spec = spec_module.load(tmp_path / "tiny.toml")
    clean, fooled = np.arange(60) < 50, np.arange(60) < 30
    with ResultStore(tmp_path / "s.sqlite") as store:
        for cell in plan(spec, mnist):
            measurements, adv = {}, clean
            if cell.targets:
                adv = clean & ~fooled
                rows = [~(np.arange(60) < round(30 * rate(cell.defense, cell.attack.attack_id, cell.eps, t)))
                        for t in cell.targets]
                measurements = {"target_clean": np.ones((len(rows), 60), bool), "target_adv": np.stack(rows)}
            store.write_cell(CellRecord(cell.key, "t", cell.defense, cell.defense_key, cell.label, "x", {}, cell.norm,
                                        cell.eps, clean, adv, 1.0, 1, 1, cell.seed, {}, "c", "cpu", "now",
                                        measurements=measurements))
        findings = boards.write(spec, store, mnist, tmp_path / "out", command="test")[-1]
    table = next(t for t in json.loads(findings.with_suffix(".json").read_text())["tables"] if t["section"] == "Claims")
    return {row[0]: dict(zip(table["columns"], row)) for row in table["rows"]}


ONE_STEP = "One-step adversarial examples transfer more than iterative ones"
RISES = "Adversarial examples transfer more at larger eps"


def test_the_transfer_claims_follow_the_stored_vectors(tmp_path, mnist):
    def paper_like(source, method, eps, target):
        return eps * (1 if method == "iter-basic" else 2)  # one-step above BIM everywhere; all rise with eps

    rows = _claims(tmp_path / "a", mnist, paper_like)
    assert (rows[ONE_STEP]["Verdict"], rows[RISES]["Verdict"]) == ("reproduced", "reproduced")
    assert "on 6 of 6 pairs" in rows[ONE_STEP]["Ours"]
    unmeasured = {r["Source"] for r in rows.values() if r["Verdict"] == "not measured here"}
    assert "Kurakin et al. (002) Tables 4, 6, Fig. 2" not in unmeasured  # the quick board's placeholder row is gone

    def mixed(source, method, eps, target):  # BIM beats FGSM from c and step l.l. from b; FGSM falls at eps 0.3
        if method == "fgsm":
            return 0.1 if source == "c" else 0.2 if eps == 0.3 else 0.5
        if method == "step-ll":
            return 0.2 if source == "b" else 0.4
        return 0.3

    rows = _claims(tmp_path / "b", mnist, mixed)
    assert (rows[ONE_STEP]["Verdict"], rows[RISES]["Verdict"]) == ("partly", "not reproduced")
    assert "on 2 of 6 pairs" in rows[ONE_STEP]["Ours"]  # only a's pairs: every one-step method above every iterative


@pytest.mark.parametrize("edit, key, message", [
    (("models = [\"a\", \"b\"]", "models = [\"a\", \"z\"]"), "transfer.models", "'z' is not a defense"),
    (("models = [\"a\", \"b\"]", "models = [\"a\"]"), "transfer.models", "two or more"),
    (("\"fgsm\", \"iter-basic\"]", "\"fgsm\", \"ta-square\"]"), "transfer.attacks", "needs its gradients"),
    (("\"fgsm\", \"iter-basic\"]", "\"fgsm\", \"pgd-l2\"]"), "transfer.attacks", "mixes"),
    (("sweep = [0.05, 0.1]", "sweep = [0.05]"), "transfer.sweep", "two or more eps"),
    (("models = [\"a\", \"b\"]", "models = [\"a\", \"a\"]"), "transfer.models", "twice"),
    (("seed = 1\n", "seed = 1\ntraining_seeds = [0, 1]\n"), "defenses.b.seed", "give one"),
    (("seed = 1\n", "seed = -1\n"), "defenses.b.seed", "integer >= 0"),
    (("row = false", "row = 0"), "defenses.b.row", "true or false"),
])
def test_a_bad_transfer_section_names_its_key(tmp_path, edit, key, message):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "tiny.toml").write_text(SPEC.replace(*edit))
    with pytest.raises(spec_module.SpecError, match=rf"\[{key}\].*{message}"):
        spec_module.load(tmp_path / "tiny.toml")


def test_a_model_without_a_row_must_be_in_the_transfer_section(tmp_path):
    (tmp_path / "tiny.toml").write_text(SPEC.replace("models = [\"a\", \"b\"]", "models = [\"a\", \"c\"]").replace(
        "[attacks.fgsm]", "[defenses.c]\nrecipe = \"natural\"\n\n[attacks.fgsm]"))
    with pytest.raises(spec_module.SpecError, match=r"\[defenses.b.row\] row = false trains a model for the"):
        spec_module.load(tmp_path / "tiny.toml")
