"""Sanity checks: planted failures are flagged by the check meant for them, a natural model passes them all,
the unbounded-eps check passes a model that is genuinely robust at small eps, and a failing defense ranks last."""
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attacks_ext.checks import GradientFreeVsWhiteBox, RestartSweep, StepSweep
from attacks_ext.checks import Column, Context, Evidence, FgsmDirectionLoss, GradientNormTrace, MonotoneInEps, Status
from harness.reports import drift, sanity as report_sanity
from harness import spec as spec_module
from harness.reports import aggregate
from harness.matrix import run
from harness.models import InputQuantization
from harness.spec import SpecError
from harness.store import CellRecord, ResultStore
from harness.threat import Norm
from tests import planted

CHECKS = """
[checks.unbounded-eps]
eps = [0.5, 1.0]
steps = 40
examples = 40
[checks.restart-sweep]
steps = 10
examples = 40
[checks.step-sweep]
steps = [5, 10, 20]
examples = 40
[checks.gradient-free]
queries = 300
examples = 40
[checks.transfer]
source = "natural"
examples = 40
[checks.monotone-eps]
[checks.iterative-beats-one-step]
[checks.zero-gradients]
[checks.randomized-outputs]
[checks.probability-outputs]
[checks.fgsm-direction-loss]
[checks.linearized-robustness]
[checks.gradient-norm-trace]
steps = 10
examples = 40
[checks.loss-landscape]
images = 4
grid = 7
"""

SPEC = """
[benchmark]
name = "planted"
dataset = "mnist5k"
eval_examples = 100
batch_size = 100
rank_by = ["linf", 0.1]

[eps]
linf = [0.05, 0.1]

[defenses.natural]
factory = "tests.planted:natural"
weights = "natural.safetensors"

[defenses.quantized]
factory = "tests.planted:quantized"
weights = "quantized.safetensors"

[defenses.randomized]
factory = "tests.planted:randomized"
weights = "randomized.safetensors"

[defenses.softmax]
factory = "tests.planted:softmax"
weights = "softmax.safetensors"

[defenses.pgd-at]             # genuinely robust at small eps
recipe = "pgd-at"
epochs = 3
eps = 0.1
adversary_options = { steps = 5 }

[attacks.fgsm]
attack = "fgsm"

[attacks.pgd]
attack = "pgd-linf"
steps = 20

[attacks.transfer]            # a black-box column: PGD-7 crafted on the natural model
attack = "pgd-linf"
steps = 7
source = "natural"
""" + CHECKS


@pytest.fixture(scope="module")
def planted_board(tmp_path_factory, natural_model, mnist):
    folder = tmp_path_factory.mktemp("planted")
    weights = natural_model.state_dict()
    for name, wrap in (("natural", lambda m: m), ("quantized", lambda m: InputQuantization(m, 2)),
                       ("randomized", planted.RandomizedInput), ("softmax", planted.SoftmaxOutput)):
        model = planted.natural()
        model.load_state_dict(weights)
        save_file({k: v.contiguous() for k, v in wrap(model).state_dict().items()}, str(folder / f"{name}.safetensors"))
    (folder / "planted.toml").write_text(SPEC)
    spec = spec_module.load(folder / "planted.toml")
    torch.manual_seed(0)  # the randomized model draws from torch's global generator
    with ResultStore(folder / "results.sqlite") as store:
        summary = run(spec, store=store, cache_dir=folder / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert summary.failed == []
        board = aggregate.build(spec, store, mnist)
        sanity = report_sanity.render_sanity(board, folder / "out", command="test")
    return board, sanity, folder


def statuses(board, defense):
    return {check: verdict.status for check, verdict in board.verdicts[defense].items()}


@pytest.mark.slow
def test_a_natural_model_passes_every_check(planted_board):
    board, _, _ = planted_board
    assert statuses(board, "natural") == {check: Status.PASS for check in board.verdicts["natural"]}


@pytest.mark.slow
@pytest.mark.parametrize("defense, check", [
    ("quantized", "zero-gradients"), ("quantized", "unbounded-eps"), ("quantized", "gradient-free"),
    ("quantized", "loss-landscape"), ("quantized", "fgsm-direction-loss"), ("quantized", "transfer"),
    ("randomized", "randomized-outputs"), ("softmax", "probability-outputs"),
])
def test_each_planted_failure_is_flagged_by_its_check(planted_board, defense, check):
    board, _, _ = planted_board
    verdict = board.verdicts[defense][check]
    assert verdict.status in (Status.WARN, Status.FAIL), verdict
    assert verdict.reason and verdict.figure


@pytest.mark.slow
def test_checks_meant_for_other_failures_stay_quiet(planted_board):
    board, _, _ = planted_board
    for defense in ("quantized", "softmax"):
        assert board.verdicts[defense]["randomized-outputs"].status is Status.PASS
    for defense in ("quantized", "randomized"):
        assert board.verdicts[defense]["probability-outputs"].status is Status.PASS
    assert board.verdicts["softmax"]["zero-gradients"].status is not Status.FAIL


@pytest.mark.slow
def test_unbounded_eps_passes_a_model_robust_at_small_eps(planted_board):
    board, _, _ = planted_board
    ranking = board.summary.set_index("Defense")
    assert ranking.loc["pgd-at", "Worst L∞ 0.1"] > ranking.loc["natural", "Worst L∞ 0.1"] + 20  # genuinely robust
    assert board.verdicts["pgd-at"]["unbounded-eps"].status is Status.PASS
    assert board.verdicts["pgd-at"]["zero-gradients"].status is Status.PASS


@pytest.mark.slow
def test_failing_defenses_rank_below_every_passing_one(planted_board):
    board, sanity, folder = planted_board
    order = list(board.summary["Defense"])
    failing = [d for d in order if aggregate.overall(board.verdicts[d]) is Status.FAIL]
    assert {"quantized", "randomized", "softmax"} <= set(failing)
    assert order[-len(failing):] == failing
    ranking = board.summary.set_index("Defense")
    # without the checks the quantized model would top the board: gradient attacks cannot move it
    assert ranking.loc["quantized", "Worst L∞ 0.1"] > ranking.loc["pgd-at", "Worst L∞ 0.1"]
    assert ranking.loc["quantized", "Sanity"] == "[fail](planted-sanity.md#defense-quantized)"
    assert "## Defense: quantized" in sanity and "| zero-gradients " in sanity
    assert (folder / "out" / "figures" / "planted-sanity-unbounded-eps.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_transfer_column_crafts_on_its_source_and_is_not_white_box(planted_board):
    board, _, _ = planted_board
    linf = board.details[Norm.LINF].set_index("Defense")
    # the same weights behind a zero gradient: PGD on the target cannot move, PGD on the source transfers
    assert linf.loc["quantized", "transfer @ L∞ 0.1"] < linf.loc["quantized", "pgd @ L∞ 0.1"] - 3
    # on its own source the transfer column is white-box PGD-7
    assert linf.loc["natural", "transfer @ L∞ 0.1"] <= linf.loc["natural", "fgsm @ L∞ 0.1"]
    evidence = board.evidence["gradient-free"]["quantized"]
    assert evidence.columns["transfer"].family == "transfer"
    assert [label for label, _ in evidence.white_box(Norm.LINF, 0.1)] == ["fgsm", "pgd"]


# --- pure functions on hand-made evidence ------------------------------------------------------------------

def record(correct, name="x") -> CellRecord:
    correct = np.asarray(correct, dtype=bool)
    return CellRecord(name, "b", "d", "k", name, name, {}, "linf", 0.3, np.ones_like(correct), correct, 0.0, 0, 0, 0,
                      {}, "c", "cpu", "t")


def evidence(*, check=None, requested=None, matrix=None, columns=None) -> Evidence:
    context = Context({Norm.LINF: (0.1, 0.3)}, (Norm.LINF, 0.3), 4)
    return Evidence("d", context, columns or {}, matrix or {}, planted.keyed(check, context, requested) if requested else {})


def tiled(vector, times=25):
    """The same outcomes on `times` as many examples: the same percentages, far more evidence."""
    return np.tile(np.asarray(vector, dtype=bool), times)


def test_restart_sweep_counts_an_example_only_if_it_survives_every_restart():
    check = RestartSweep(restarts=4, warn_drop=1.0)
    runs = [[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    verdict = check.evaluate(evidence(check=check, requested={f"linf: restart {i + 1}": record(tiled(r)) for i, r in enumerate(runs)}))
    assert verdict.details == {"L∞ 1 restarts": 100.0, "L∞ 2 restarts": 75.0, "L∞ 4 restarts": 50.0}
    assert verdict.status is Status.WARN  # the last doubling still lowered accuracy by 25 points (25 of 100 examples)
    few = check.evaluate(evidence(check=check, requested={f"linf: restart {i + 1}": record(r) for i, r in enumerate(runs)}))
    assert few.status is Status.PASS and "not significant" in few.reason  # the same 25 points, but one example of 4
    converged = [[1, 1, 0, 0]] * 4
    assert check.evaluate(evidence(check=check, requested={f"linf: restart {i + 1}": record(r) for i, r in enumerate(converged)})).status is Status.PASS


def test_step_sweep_warns_while_more_steps_still_help():
    check = StepSweep(steps=[10, 20, 40], warn_drop=1.0)
    curve = {"linf: steps 10": record(tiled([1, 1, 1, 1])), "linf: steps 20": record(tiled([1, 1, 1, 0])),
             "linf: steps 40": record(tiled([1, 0, 0, 0]))}
    assert check.evaluate(evidence(check=check, requested=curve)).status is Status.WARN
    curve["linf: steps 40"] = record(tiled([1, 1, 1, 0]))
    assert check.evaluate(evidence(check=check, requested=curve)).status is Status.PASS


@pytest.mark.parametrize("broken_only, status", [(1, Status.PASS), (3, Status.PASS), (5, Status.WARN), (15, Status.FAIL)])
def test_gradient_free_flags_what_it_alone_breaks_only_when_significant(broken_only, status):
    """100 examples, warn above 2%, fail above 10%: 3 examples (3%) are above the warn threshold but 3 vs 0
    discordant examples is no evidence (one-sided exact p = 0.125); 5 are (p = 0.031); 15 fail."""
    check = GradientFreeVsWhiteBox(examples=100)
    pgd = Column("pgd", Norm.LINF, "iterative", (0.1, 0.3))
    context = Context({Norm.LINF: (0.1, 0.3)}, (Norm.LINF, 0.3), 100, columns=(pgd,))
    white_box = record([1] * 80 + [0] * 20)
    square = record([1] * (80 - broken_only) + [0] * (20 + broken_only))
    verdict = check.evaluate(Evidence("d", context, {"pgd": pgd}, {("pgd", 0.3): white_box},
                                      planted.keyed(check, context, {check.name(Norm.LINF, check.kind): square})))
    assert verdict.status is status
    assert ("not significant" in verdict.reason) is (broken_only == 3)


def test_monotone_check_flags_accuracy_rising_with_eps():
    columns = {"fgsm": Column("fgsm", Norm.LINF, "one-step", (0.1, 0.3))}
    falling = {("fgsm", 0.1): record([1, 1, 1, 0]), ("fgsm", 0.3): record([1, 0, 0, 0])}
    assert MonotoneInEps().evaluate(evidence(matrix=falling, columns=columns)).status is Status.PASS
    rising = {("fgsm", 0.1): record([1, 0, 0, 0]), ("fgsm", 0.3): record([1, 1, 1, 0])}
    verdict = MonotoneInEps().evaluate(evidence(matrix=rising, columns=columns))
    assert verdict.status is Status.FAIL and "fgsm 0.1 → 0.3" in verdict.figure


def test_fgsm_line_signature_is_a_rise_then_a_fall_below_the_start():
    loss = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 0.5], [1.0, 0.8, 0.5], [1.0, 1.0, 1.0]])
    assert FgsmDirectionLoss.signature(loss).tolist() == [False, True, False, False]


def trace(pgd, so, norm, eps) -> CellRecord:
    probe = dataclasses.replace(record([1, 1, 1, 1]), options={"norm": norm, "eps": eps})
    return dataclasses.replace(probe, measurements={"pgd_correct": np.array(pgd), "so_correct": np.array(so),
                                                    "pgd_grad_l1": np.ones(3), "so_grad_l1": np.ones(3)})


def test_gradient_trace_runs_under_each_norm_and_warns_where_s_o_beats_pgd():
    """Li et al.'s finding: a model trained under L-inf can look robust to L2 PGD and not to L2 S-O."""
    context = Context({Norm.LINF: (0.1, 0.3), Norm.L2: (1.0, 2.0)}, (Norm.LINF, 0.3), 4)
    check = GradientNormTrace()
    requests = {r.name: dict(r.options) for r in check.requests(context)}
    assert {name: (o["norm"], o["eps"]) for name, o in requests.items()} == {"trace linf": ("linf", 0.3),
                                                                              "trace l2": ("l2", 2.0)}
    same = trace([1, 1, 0, 0], [1, 1, 0, 0], "linf", 0.3)
    evidence_of = lambda l2: Evidence("d", context, {}, {}, planted.keyed(check, context, {"trace linf": same, "trace l2": l2}))  # noqa: E731
    assert check.evaluate(evidence_of(trace([1, 1, 1, 0], [1, 0, 0, 0], "l2", 2.0))).status is Status.PASS  # 2 of 4
    same = trace(tiled([1, 1, 0, 0]), tiled([1, 1, 0, 0]), "linf", 0.3)
    verdict = check.evaluate(evidence_of(trace(tiled([1, 1, 1, 0]), tiled([1, 0, 0, 0]), "l2", 2.0)))
    assert verdict.status is Status.WARN and "at L2 2" in verdict.reason and "McNemar" in verdict.reason
    assert verdict.details == {"PGD L∞ 0.3 (%)": 50.0, "S-O L∞ 0.3 (%)": 50.0, "PGD L2 2 (%)": 75.0, "S-O L2 2 (%)": 25.0}
    assert check.evaluate(evidence_of(trace([1, 1, 0, 0], [1, 1, 0, 0], "l2", 2.0))).status is Status.PASS
    assert check.evaluate(evidence_of(None)).status is None  # one norm's probe missing: no verdict
    assert [r.name for r in GradientNormTrace(norms=["linf"]).requests(context)] == ["trace linf"]
    assert [r.name for r in GradientNormTrace(norms=("l2",)).requests(context)] == ["trace l2"]  # as the TOML gives it
    with pytest.raises(ValueError, match="norms must be a non-empty list"):
        GradientNormTrace(norms=[])


def test_a_missing_cell_gives_no_verdict_rather_than_a_pass():
    check = RestartSweep()
    verdict = check.evaluate(evidence(check=check, requested={"linf: restart 1": record([1, 1, 1, 1])}))
    assert verdict.status is None and "not run yet" in verdict.reason


@pytest.mark.parametrize("table, message", [
    ("[checks.unbouded-eps]\n", "[checks.unbouded-eps] unknown check 'unbouded-eps'; known: "),
    ("[checks.unbounded-eps]\nstep = 10\n", "unknown option 'step' for unbounded-eps; allowed: eps, steps"),
    ("[checks.unbounded-eps]\neps = [300]\n", "did you mean 300/255"),
    ("[checks.restart-sweep]\nexamples = 5000\n", "asks for 5000 examples but [benchmark.eval_examples] is 100"),
    ("[checks.monotone-eps]\nwarn_rise = 6.0\n", "must not exceed the fail threshold"),
    ("[checks.transfer]\nsource = \"natral\"\n", "source 'natral' is not a defense of this benchmark; defenses: natural"),
    ("[attacks.t]\nattack = \"fgsm\"\nsource = \"natral\"\n", "[attacks.t.source] 'natral' is not a defense of this benchmark"),
    ("[attacks.t]\nattack = \"ta-square\"\nsource = \"natural\"\n", "ta-square is gradient-free; a transfer attack needs"),
    ("[checks.gradient-free]\nattack = \"pgd-linf\"\n", "'pgd-linf' is iterative, not gradient-free"),
    ("[checks.gradient-norm-trace]\nnorms = [\"l3\"]\n", "[checks.gradient-norm-trace] unknown norm 'l3'; allowed: linf, l2"),
])
def test_check_options_are_validated_with_the_key(tmp_path, table, message):
    base = SPEC.split("[checks.")[0]
    (tmp_path / "b.toml").write_text(base + table)
    with pytest.raises(SpecError) as error:
        spec_module.load(tmp_path / "b.toml")
    assert message in str(error.value)


def test_compare_tolerates_numbers_inside_text_within_the_tolerance():
    def board(verdict="pass", share="12.5%"):
        return {"tables": [{"section": "Defense: a", "columns": ["Check", "Verdict", "Figure"],
                            "rows": [["zero-gradients", verdict, f"median 1.84e+00, {share}"]]}]}

    assert drift.compare(board(), board(share="13.1%")) == []
    assert drift.compare(board(), board(share="15.0%"))
    assert drift.compare(board(), board(verdict="warn"))


def test_probe_measurements_round_trip_and_an_old_store_gains_the_column(tmp_path):
    import sqlite3

    from harness.store import SCHEMA

    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA.replace(",\n    measurements   BLOB,             -- safetensors bytes of a probe's per-example arrays; NULL for attack cells", "")
    old_schema = old_schema.replace("\n    checksum       TEXT              -- sha256 of every other column of the row (see `_checksum`)", "")
    assert "measurements" not in old_schema and "checksum" not in old_schema
    connection = sqlite3.connect(str(path))
    connection.executescript(old_schema)
    connection.close()
    arrays = {"loss": np.arange(6, dtype=np.float64).reshape(2, 3), "changed": np.array([0, 1], dtype=np.uint8)}
    with ResultStore(path) as store:
        store.write_cell(dataclasses.replace(record([1, 0], name="probe"), measurements=arrays))
        store.write_cell(record([1, 1], name="attack"))
        cells = store.cells()
    assert cells["attack"].measurements == {}
    assert set(cells["probe"].measurements) == {"loss", "changed"}
    assert np.array_equal(cells["probe"].measurements["loss"], arrays["loss"])


def test_identical_requests_from_two_checks_share_one_cell(tmp_path, mnist):
    from harness.planning import plan

    (tmp_path / "s.toml").write_text(SPEC.split("[defenses.quantized]")[0].replace('weights = "natural.safetensors"', 'weights = "n.safetensors"')
                                     + "[attacks.pgd]\nattack = \"pgd-linf\"\nsteps = 20\n" + CHECKS)
    save_file({k: v.contiguous() for k, v in planted.natural().state_dict().items()}, str(tmp_path / "n.safetensors"))
    cells = plan(spec_module.load(tmp_path / "s.toml"), mnist)
    by_label = {cell.label: cell.key for cell in cells}
    assert by_label["restart-sweep: linf: restart 1"] == by_label["step-sweep: linf: steps 10"]  # same attack, eps
    assert by_label["randomized-outputs: outputs"] == by_label["probability-outputs: outputs"]
    assert by_label["restart-sweep: linf: restart 1"] != by_label["restart-sweep: linf: restart 2"]
    assert len({cell.key for cell in cells}) < len(cells)


@pytest.mark.parametrize("probe_id, options", [("linearization", ()), ("fgsm-line", (("eps_max", 0.3), ("points", 4))),
                                               ("output-stats", (("passes", 2),)), ("input-gradients", ())])
def test_per_example_probes_stream_their_examples_in_batches(natural_model, mnist, monkeypatch, probe_id, options):
    """A probe whose arrays hold one row per example never sees more than a batch at once (memory stays flat as
    the test set grows), and gives what it gives on all the examples at once."""
    from harness.cells import Cell
    from harness.check_types import ProbeRequest
    from harness.evaluation import evaluate_probe
    from harness.registry import PROBES

    seen, probe = [], PROBES.get(probe_id)
    monkeypatch.setitem(PROBES._entries, probe_id, lambda model, x, y, **kw: seen.append(len(x)) or probe(model, x, y, **kw))
    cell = Cell("k", "natural", "key", None, 0.0, seed=3, examples=50,
                probe=ProbeRequest("p", probe_id, options, 50), check="c", request="p")
    x, y = mnist.x_test[:50], mnist.y_test[:50]
    streamed = evaluate_probe(cell, natural_model, x, y, batch_size=16, device=torch.device("cpu"))
    assert seen == [16, 16, 16, 2] and PROBES.info(probe_id)["shared"] is not None
    whole = evaluate_probe(cell, natural_model, x, y, batch_size=50, device=torch.device("cpu"))
    assert seen[-1] == 50 and streamed.measurements.keys() == whole.measurements.keys()
    for name, value in whole.measurements.items():
        np.testing.assert_allclose(streamed.measurements[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert streamed.forward_evals == whole.forward_evals and np.array_equal(streamed.clean_correct, whole.clean_correct)
