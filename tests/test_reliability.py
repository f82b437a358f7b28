"""A user's own benchmark gets the same trust as ours (issue 15): verdicts that cannot go blank, sweeps that call
a rising accuracy a red flag, randomized models that reproduce, no score for a NaN model, clear errors for bad
input, and a store that cannot lose data silently."""
import dataclasses
import sqlite3

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attacks_ext.checks import RestartSweep, StepSweep, UnboundedEps
from attacks_ext.checks import Column, Context, Evidence, IterativeBeatsOneStep, MonotoneInEps, Status, Verdict
from harness import spec as spec_module
from harness.reports import aggregate
from harness.__main__ import main
from harness.evaluation import CellRunner
from harness.matrix import run
from harness.store import CellRecord, ResultStore, StoreError
from harness.threat import Norm
from tests import planted


def record(correct, name="x", clean=None) -> CellRecord:
    correct = np.asarray(correct, dtype=bool)
    clean = np.ones_like(correct) if clean is None else np.asarray(clean, dtype=bool)
    return CellRecord(name, "b", "d", "k", name, name, {}, "linf", 0.3, clean, correct, 0.0, 0, 0, 0, {}, "c", "cpu", "t")


def one_eps_evidence(check=None, **kw) -> Evidence:
    context = Context({Norm.LINF: (0.3,)}, (Norm.LINF, 0.3), 4)
    requested = planted.keyed(check, context, kw["requested"]) if kw.get("requested") else {}
    return Evidence("d", context, kw.get("columns", {}), kw.get("matrix", {}), requested)


# --- 1. a verdict that does not apply is n/a, and a missing one cannot hide a failing one ------------------------

def test_checks_with_nothing_to_judge_say_not_applicable_not_missing():
    columns = {"pgd": Column("pgd", Norm.LINF, "iterative", (0.3,))}
    evidence = one_eps_evidence(columns=columns, matrix={("pgd", 0.3): record([1, 0, 0, 1])})
    assert MonotoneInEps().evaluate(evidence).status is Status.NOT_APPLICABLE  # one eps: nothing can rise
    assert IterativeBeatsOneStep().evaluate(evidence).status is Status.NOT_APPLICABLE  # no one-step column
    assert Status.NOT_APPLICABLE.label == "n/a"
    two = {"pgd": Column("pgd", Norm.LINF, "iterative", (0.1, 0.3))}
    missing = Evidence("d", Context({Norm.LINF: (0.1, 0.3)}, (Norm.LINF, 0.3), 4), two, {("pgd", 0.1): record([1])}, {})
    assert MonotoneInEps().evaluate(missing).status is None  # applicable, but its cell is not in the store


def test_overall_verdict_ignores_not_applicable_and_a_failure_wins_over_missing():
    verdict = lambda status: Verdict("c", status, "", "")  # noqa: E731
    assert aggregate.overall({"a": verdict(Status.NOT_APPLICABLE), "b": verdict(Status.PASS)}) is Status.PASS
    assert aggregate.overall({"a": verdict(Status.FAIL), "b": verdict(None)}) is Status.FAIL
    assert aggregate.overall({"a": verdict(Status.PASS), "b": verdict(None)}) is None
    assert aggregate.overall({"a": verdict(Status.WARN), "b": verdict(Status.NOT_APPLICABLE)}) is Status.WARN


# --- 2. accuracy that rises with the attack's budget is a red flag --------------------------------------------

def test_step_sweep_calls_a_rise_with_more_steps_a_red_flag_not_convergence():
    """The randomized model of the issue: 19% at 10 steps, 38% at 40, 80% at 80 steps."""
    check = StepSweep(steps=[10, 40, 80])
    rows = lambda share: record([1] * share + [0] * (100 - share))  # noqa: E731
    curve = {"linf: steps 10": rows(19), "linf: steps 40": rows(38), "linf: steps 80": rows(80)}
    verdict = check.evaluate(one_eps_evidence(check, requested=curve))
    assert verdict.status is Status.FAIL and "rises by 61.0 points" in verdict.reason and "converged" not in verdict.reason
    curve = {"linf: steps 10": rows(18), "linf: steps 40": rows(18), "linf: steps 80": rows(23)}
    verdict = check.evaluate(one_eps_evidence(check, requested=curve))
    assert verdict.status is Status.WARN and "McNemar p = 0.031" in verdict.reason  # 5 examples, none the other way
    curve["linf: steps 80"] = rows(20)  # two examples: separate random draws do that, not a red flag
    assert check.evaluate(one_eps_evidence(check, requested=curve)).status is Status.PASS


def test_unbounded_eps_flags_accuracy_rising_with_eps():
    check = UnboundedEps(eps=[0.5, 1.0])
    low, high = record([0] * 100), record([1] * 10 + [0] * 90)
    verdict = check.evaluate(one_eps_evidence(check, requested={"linf: eps=0.5": low, "linf: eps=1": high}))
    assert verdict.status is Status.FAIL and "rises by 10.0 points" in verdict.reason
    restarts = RestartSweep(restarts=2)  # cumulative by construction: it can only fall
    flat = {"linf: restart 1": record([1, 1, 0, 0]), "linf: restart 2": record([1, 1, 0, 0])}
    assert restarts.evaluate(one_eps_evidence(restarts, requested=flat)).status is Status.PASS


# --- 3, 4. randomized models reproduce and are attacked with EOT; a NaN model gets no score -------------------

BYOM = """
[benchmark]
name = "byom"
dataset = "mnist5k"
eval_examples = 40
batch_size = 40
eot_samples = 4

[eps]
linf = [0.1]

[defenses.mine]
factory = "tests.planted:{factory}"
weights = "{weights}"
{options}

[attacks.pgd]
attack = "pgd-linf"
steps = 10
"""


def byom_spec(folder, factory="natural", weights="m.safetensors", options="", model=None):
    if model is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights))
    (folder / "b.toml").write_text(BYOM.format(factory=factory, weights=weights, options=options))
    return spec_module.load(folder / "b.toml")


def test_a_randomized_model_reproduces_and_is_attacked_with_eot(tmp_path, natural_model, mnist):
    model = planted.RandomizedInput(planted.natural())
    model.model.load_state_dict(natural_model.state_dict())
    spec = byom_spec(tmp_path, "randomized", model=model)
    outcomes = []
    for attempt in range(2):
        torch.manual_seed(attempt)  # whatever the global generator holds before the run
        with ResultStore(tmp_path / f"s{attempt}.sqlite") as store:
            assert run(spec, store=store, cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False,
                       data=mnist).failed == []
            outcomes.append({r.attack: r.adv_correct for r in store.cells().values()})
    assert outcomes[0].keys() == outcomes[1].keys()
    for name in outcomes[0]:
        assert np.array_equal(outcomes[0][name], outcomes[1][name]), name
    from harness.preparation import prepare_defenses

    prepared = prepare_defenses(spec, ["mine"], mnist, cache_dir=tmp_path / "c", device=torch.device("cpu"))
    assert CellRunner(spec, mnist, prepared, torch.device("cpu")).eot_draws("mine") == 4


def test_a_model_with_nan_weights_is_a_clear_error_not_a_score(tmp_path, natural_model, mnist, capsys):
    model = planted.natural()
    model.load_state_dict({k: torch.full_like(v, float("nan")) for k, v in natural_model.state_dict().items()})
    byom_spec(tmp_path, model=model)
    code = main(["run", str(tmp_path / "b.toml"), "--home", str(tmp_path / "h"), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "non-finite logits" in error and "'mine'" in error and "Traceback" not in error
    assert not (tmp_path / "o" / "byom.md").exists()


# --- 6. clear errors, never tracebacks -------------------------------------------------------------------------

@pytest.mark.parametrize("factory, options, message", [
    ("not_a_module", "", "returned dict, not a torch.nn.Module"),
    ("natural", "options = { widht = 2 }", "unknown option 'widht' for external model factory"),
])
def test_bad_byom_models_are_reported_before_any_training(tmp_path, natural_model, capsys, factory, options, message):
    byom_spec(tmp_path, factory, options=options, model=natural_model)
    text = (tmp_path / "b.toml").read_text() + '\n[defenses.trained]\nrecipe = "natural"\nepochs = 1\n'
    (tmp_path / "b.toml").write_text(text)
    code = main(["run", str(tmp_path / "b.toml"), "--home", str(tmp_path / "h"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error
    assert not list((tmp_path / "h" / "checkpoints").glob("*.safetensors"))  # nothing was trained first


def test_a_typo_in_adversary_options_lists_the_allowed_ones(tmp_path):
    text = BYOM.replace('[defenses.mine]\nfactory = "tests.planted:{factory}"\nweights = "{weights}"\n{options}\n',
                        '[defenses.at]\nrecipe = "pgd-at"\nadversary_options = { stepz = 3 }\n')
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(spec_module.SpecError, match=r"\[defenses.at\].*unknown option 'stepz' for adversary 'pgd-linf'; "
                                                     r"allowed: steps, step_fraction"):
        spec_module.load(tmp_path / "b.toml")


def test_two_runs_on_one_home_the_second_stops_at_once(tmp_path):
    with ResultStore(tmp_path / "results.sqlite", lock=True):
        with pytest.raises(StoreError, match="another run is using this results store"):
            ResultStore(tmp_path / "results.sqlite", lock=True)
        with ResultStore(tmp_path / "results.sqlite") as reader:  # reading (report) needs no lock
            assert reader.count() == 0
    with ResultStore(tmp_path / "results.sqlite", lock=True):  # released on close
        pass


# --- 7. the store cannot lose data silently --------------------------------------------------------------------

def test_an_emptied_store_file_is_refused_unless_told_to_start_over(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write_cell(record([1, 0, 1]))
    path.write_bytes(b"")
    with pytest.raises(StoreError, match="exists but holds no results store.*--start-over"):
        ResultStore(path)
    with ResultStore(path, start_over=True) as store:
        assert store.count() == 0


def test_a_changed_outcome_blob_fails_its_checksum(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write_cell(record([1, 0, 0, 0, 0, 0, 0, 0], name="pgd"))
    connection = sqlite3.connect(str(path))
    with connection:
        connection.execute("UPDATE cells SET adv_correct = ? WHERE key = 'pgd'", (np.packbits(np.ones(8, bool)).tobytes(),))
    connection.close()
    with ResultStore(path) as store, pytest.raises(StoreError, match="pgd.*fails its checksum.*DELETE FROM cells"):
        store.cells()
    connection = sqlite3.connect(str(path))
    with connection:  # the vector restored, the cost changed: still caught
        connection.execute("UPDATE cells SET adv_correct = ?, gradient_evals = 7 WHERE key = 'pgd'",
                           (np.packbits(np.r_[True, np.zeros(7, bool)]).tobytes(),))
    connection.close()
    with ResultStore(path) as store, pytest.raises(StoreError, match="fails its checksum"):
        store.cells()


def test_a_truncated_store_names_the_file_and_how_to_recover(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        for i in range(200):
            store.write_cell(dataclasses.replace(record(np.ones(4000, bool)), key=f"k{i}"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match=f"{path} is damaged.*recover"):
        with ResultStore(path) as store:
            store.cells()


# --- 8. .pt users have a way in --------------------------------------------------------------------------------

def test_convert_weights_unwraps_a_data_parallel_checkpoint_and_checks_the_factory(tmp_path, natural_model, capsys):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in natural_model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "model.pt")
    target = tmp_path / "model.safetensors"
    assert main(["convert-weights", str(tmp_path / "model.pt"), str(target), "--factory", "tests.planted:natural"]) == 0
    out = capsys.readouterr().out
    assert "'state_dict'" in out and "'module.'" in out and "checked every key and shape" in out
    from harness.models import load_external

    loaded = load_external("tests.planted:natural", target)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), natural_model(x))
    assert main(["convert-weights", str(tmp_path / "model.pt"), str(target), "--factory", "tests.planted:quantized"]) == 2
    assert "do not fit 'tests.planted:quantized'" in capsys.readouterr().err


def test_convert_weights_never_unpickles_arbitrary_objects(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer": planted.SoftmaxOutput(torch.nn.Identity())},
               tmp_path / "full.pt")
    assert main(["convert-weights", str(tmp_path / "full.pt"), str(tmp_path / "out.safetensors")]) == 2
    error = capsys.readouterr().err
    assert "restricted loader" in error and "torch.save(model.state_dict(), path)" in error
    assert not (tmp_path / "out.safetensors").exists()
