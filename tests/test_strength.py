"""Strength per cost: our cascade and AutoAttack side by side on one defense (harness.strength)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import spec as spec_module, strength
from harness.reports.attack_cost import strength_section, strength_summary
from harness.evaluation import evaluate_cell
from harness.planning import plan
from harness.preparation import prepare_defenses
from harness.threat import Norm

SPEC = """
[benchmark]
name = "strength-test"
dataset = "mnist5k"
eval_examples = 60
batch_size = 32
cascade = true

[eps]
linf = [0.15]

[defenses.natural]
recipe = "natural"
epochs = 1

[attacks.fgsm]
attack = "fgsm"

[attacks.pgd]
attack = "pgd-linf"
steps = 5
"""

CONTENDERS = (
    ("AutoAttack standard, small budget", "autoattack-standard", (("steps", 5), ("queries", 50))),
    ("pgd alone", "pgd-linf", (("steps", 5),)),
)


@pytest.mark.slow
def test_ours_is_the_per_example_worst_case_and_contenders_are_counted(tmp_path, mnist):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    spec = spec_module.load(path)
    result = strength.compare(spec, defense="natural", norm=Norm.LINF, eps=0.15, cache_dir=tmp_path / "ckpt",
                              device=torch.device("cpu"), contenders=CONTENDERS, progress=False, data=mnist)
    ours, autoattack, pgd_alone = result["rows"]
    assert ours["label"] == strength.OURS and result["ours_columns"] == ["fgsm", "pgd"]
    # ours equals every column run alone on every example, worst case per example
    prepared = prepare_defenses(spec, ["natural"], mnist, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"))
    model = prepared["natural"].load_model(mnist, torch.device("cpu"))
    x, y = mnist.x_test[:60], mnist.y_test[:60]
    alone = [evaluate_cell(cell, model, x, y, batch_size=32, device=torch.device("cpu")).robust_correct
             for cell in plan(spec, mnist) if cell.attack is not None and cell.check is None]
    assert np.array_equal(np.asarray(ours["robust_vector"]), np.logical_and.reduce(alone))
    # the contender with our pgd's attack and options draws what our pgd column drew
    assert np.array_equal(np.asarray(pgd_alone["robust_vector"]), alone[1])
    assert pgd_alone["missed_by_this"] >= 0 and pgd_alone["broken_only_by_this"] == 0
    for row in result["rows"]:
        assert row["forward_evals"] >= 60 and row["seconds"] > 0  # the clean pass is in every row
    assert autoattack["gradient_evals"] > 0 and 0 <= autoattack["robust"] <= result["clean"]
    # where ours spends: the columns' evaluations add up to ours, their first breaks to every clean-correct example
    # ours broke (pgd, after fgsm, breaks what fgsm left)
    columns = ours["columns"]
    assert [column["label"] for column in columns] == ["clean", "fgsm", "pgd"] and columns[0]["broken_first"] == 0
    assert sum(column["forward_evals"] for column in columns) == ours["forward_evals"]
    assert sum(column["gradient_evals"] for column in columns) == ours["gradient_evals"]
    assert sum(column["broken_first"] for column in columns) == round(60 * result["clean"] / 100) - sum(
        ours["robust_vector"])
    assert columns[2]["broken_first"] == int((alone[0] & ~alone[1]).sum())
    # JSON round trip and the attack-cost.md section
    saved = strength.load(strength.write({"comparisons": [result]}, tmp_path / "out" / "strength.json"))
    text = "\n".join(strength_summary(saved) + strength_section(saved[0]))
    assert "Strength per cost against AutoAttack" in text and "of its model evaluations in total" in text
    assert f"| {ours['robust']:.2f} " in text and "### `natural`, L∞ 0.15" in text
    spent = columns[2]["forward_evals"] + columns[2]["gradient_evals"]
    share = spent / (autoattack["forward_evals"] + autoattack["gradient_evals"])
    assert "**Where ours spends**" in text
    spending = text.split("**Where ours spends**")[1].split("###")[0]
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in spending.splitlines() if "|" in line]
    assert ["L∞ 0.15", "pgd", "1", f"{share:.3f}", str(columns[2]["broken_first"])] in cells
    assert strength.load(strength.write(result, tmp_path / "one.json")) == [result]  # a single comparison reads too

    # --reuse: a contender row of an earlier run on the same weights, examples, threat, options and versions is
    # taken as it was (a planted vector proves it was not rerun), even where a code change re-keyed the checkpoint;
    # a row from other weights is rerun.
    planted = {**result, "rows": [dict(row) for row in result["rows"]], "defense_key": "key-before-a-code-change"}
    planted["rows"][1]["robust_vector"] = [not v for v in autoattack["robust_vector"]]
    elsewhere = {**planted, "weights": "other-weights"}
    other_threads = {**planted, "threads": planted["threads"] + 1}  # CPU kernels split their sums by thread
    again = strength.compare(spec, defense="natural", norm=Norm.LINF, eps=0.15, cache_dir=tmp_path / "ckpt",
                             device=torch.device("cpu"), contenders=CONTENDERS, progress=False, data=mnist,
                             reuse=[elsewhere, planted])
    reused = again["rows"][1]
    assert reused["robust_vector"] == planted["rows"][1]["robust_vector"]
    assert reused["reused_from"] == {"date": result["date"], "commit": result["commit"]}
    assert reused["broken_only_by_this"] == int((~np.asarray(reused["robust_vector"]) & np.asarray(ours["robust_vector"])).sum())
    assert (f"AutoAttack standard, small budget (run {result['date'][:10]}, commit {result['commit']})"
            in "\n".join(strength_section(again)))
    again = strength.compare(spec, defense="natural", norm=Norm.LINF, eps=0.15, cache_dir=tmp_path / "ckpt",
                             device=torch.device("cpu"), contenders=CONTENDERS, progress=False, data=mnist,
                             reuse=[elsewhere, other_threads])
    assert again["rows"][1]["robust_vector"] == autoattack["robust_vector"] and "reused_from" not in again["rows"][1]


def test_a_comparison_store_keeps_what_finished_replaces_a_case_in_place_and_offers_its_rows_for_reuse(
        tmp_path, monkeypatch):
    """strength-per-cost's JSON holds hours of AutoAttack runs: every comparison is written as it finishes, a rerun
    replaces only its own case (other benchmarks' comparisons stay), and the stored rows are offered for reuse."""
    offered = []

    def compare(spec, *, defense, norm, eps, reuse, **options):
        offered.append((defense, [comparison["rows"][0]["label"] for comparison in reuse]))
        if defense == "interrupted":
            raise KeyboardInterrupt
        return {"benchmark": spec.name, "defense": defense, "norm": norm.value, "eps": eps, "examples": 1,
                "rows": [{"label": f"new {defense}"}]}

    monkeypatch.setattr(strength, "compare", compare)
    store = tmp_path / "leaderboards" / "strength-per-cost.json"
    strength.write({"comparisons": [
        {"benchmark": "b", "defense": "a", "norm": "linf", "eps": 0.3, "examples": 1, "rows": [{"label": "old a"}]},
        {"benchmark": "other", "defense": "a", "norm": "linf", "eps": 0.3, "examples": 1, "rows": [{"label": "other a"}]},
    ]}, store)
    spec = type("Spec", (), {"name": "b"})()
    with pytest.raises(KeyboardInterrupt):
        strength.compare_cases(spec, [("a", Norm.LINF, 0.3), ("c", Norm.L2, 2.0), ("interrupted", Norm.LINF, 0.3)],
                               path=store)
    assert [c["rows"][0]["label"] for c in strength.load(store)] == ["new a", "other a", "new c"]
    assert offered[0] == ("a", ["old a", "other a"])
    # a write cut short (a full disk, a killed process) leaves the store as it was
    real_write_text = Path.write_text

    def cut_short(path, text):
        real_write_text(path, text[:10])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="no space left"):
        strength.write({"comparisons": []}, store)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert [c["rows"][0]["label"] for c in strength.load(store)] == ["new a", "other a", "new c"]
    store.write_text('{"comparisons": [')
    with pytest.raises(ValueError, match="strength-per-cost.json: not a strength-per-cost result .not JSON"):
        strength.compare_cases(spec, [("a", Norm.LINF, 0.3)], path=store)


def test_bad_requests_name_what_is_allowed(tmp_path, mnist):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    spec = spec_module.load(path)
    with pytest.raises(ValueError, match="defense 'pgd-at' is not in .*its defenses: natural"):
        strength.compare(spec, defense="pgd-at", norm=Norm.LINF, eps=0.15, cache_dir=tmp_path, device=torch.device("cpu"),
                         data=mnist)
    with pytest.raises(ValueError, match=r"no column at linf eps 0.3; its grid: \[\('linf', 0.15\)\]"):
        strength.compare(spec, defense="natural", norm=Norm.LINF, eps=0.3, cache_dir=tmp_path, device=torch.device("cpu"),
                         data=mnist)
    with pytest.raises(ValueError, match="not a strength-per-cost result"):
        (tmp_path / "x.json").write_text("{}")
        strength.load(tmp_path / "x.json")


def test_a_training_seed_replica_compares_at_the_rank_by_threat_only(tmp_path, mnist):
    """The board's seed table reports each replica's worst case at the rank-by threat: strength-per-cost compares it
    there, on the replica's own weights, and names the rank-by threat when asked for another."""
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.replace('cascade = true', 'cascade = true\nrank_by = ["linf", 0.15]\ntraining_seeds = [0, 1]')
                    .replace("linf = [0.15]", "linf = [0.1, 0.15]"))
    spec = spec_module.load(path)
    with pytest.raises(ValueError, match=r"'natural@seed1' is a training-seed replica: it runs only the rank-by "
                                         r"threat \(linf eps 0.15\), not linf eps 0.1"):
        strength.compare(spec, defense="natural@seed1", norm=Norm.LINF, eps=0.1, cache_dir=tmp_path,
                         device=torch.device("cpu"), data=mnist)
    results = {name: strength.compare(spec, defense=name, norm=Norm.LINF, eps=0.15, cache_dir=tmp_path / "ckpt",
                                      device=torch.device("cpu"), contenders=CONTENDERS[1:], progress=False, data=mnist)
               for name in ("natural", "natural@seed1")}
    assert results["natural@seed1"]["defense"] == "natural@seed1"
    assert results["natural@seed1"]["weights"] != results["natural"]["weights"]  # the replica's own model
    assert [r["label"] for r in results["natural@seed1"]["rows"]] == [strength.OURS, "pgd alone"]
