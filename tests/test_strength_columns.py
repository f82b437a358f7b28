"""Strength on every column (issue 14): the attack-running checks run at every norm the board reports, the
reference audit fails a row whose columns are weaker than AutoAttack, and survivors-only requests attack only
what the matrix left standing."""
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from attacks_ext.checks import RestartSweep, StepSweep, UnboundedEps
from attacks_ext.checks import GradientFreeVsWhiteBox, TransferVsWhiteBox
from attacks_ext.checks import Column, Context, Evidence, Status
from attacks_ext.checks import AttackConvergence
from attacks_ext.checks import ReferenceAttack
from harness import spec as spec_module
from harness.reports import aggregate
from harness.matrix import run
from harness.planning import plan
from harness.store import CellRecord, ResultStore
from tests import planted
from harness.threat import Norm

CONTEXT = Context({Norm.LINF: (0.1, 0.3), Norm.L2: (1.0, 2.0)}, (Norm.LINF, 0.3), 100, ("natural", "pgd-at"),
                  (Column("pgd", Norm.LINF, "iterative", (0.1, 0.3), "pgd-linf"),
                   Column("pgd-l2", Norm.L2, "iterative", (1.0, 2.0), "pgd-l2")), True)


def record(correct, *, attacked=None, eps=0.3, name="x") -> CellRecord:
    correct = np.asarray(correct, dtype=bool)
    measurements = {} if attacked is None else {"attacked": np.asarray(attacked, dtype=bool)}
    return CellRecord(name, "b", "d", "k", name, name, {}, "linf", eps, np.ones_like(correct), correct, 0.0, 0, 0, 0,
                      {}, "c", "cpu", "t", measurements)


@pytest.mark.parametrize("check, attack_ids", [
    (UnboundedEps(), {"pgd-linf", "pgd-l2"}), (RestartSweep(), {"pgd-linf", "pgd-l2"}),
    (StepSweep(), {"pgd-linf", "pgd-l2"}), (GradientFreeVsWhiteBox(), {"ta-square", "ta-square-l2"}),
    (TransferVsWhiteBox(), {"pgd-linf", "pgd-l2"}), (ReferenceAttack(), {"aa-standard", "aa-standard-l2"}),
])
def test_attack_checks_run_at_every_norm_of_the_grid(check, attack_ids):
    requests = check.requests(CONTEXT)
    assert {r.attack_id for r in requests} == attack_ids
    by_norm = {r.name.split(":")[0] for r in requests}
    assert by_norm == {"linf", "l2"}
    if not isinstance(check, UnboundedEps):  # at the rank-by eps of each norm: L-inf's rank_by, L2's largest
        assert {r.eps for r in requests} == {0.3, 2.0}
    assert {r.name.split(":")[0] for r in check.requests(dataclasses.replace(CONTEXT, grid={Norm.LINF: (0.3,)}))} <= {"linf"}


def test_a_norm_that_never_ran_is_missing_not_a_pass():
    check = StepSweep(steps=[10, 20])
    linf_only = {"linf: steps 10": record([1, 1, 0, 0]), "linf: steps 20": record([1, 1, 0, 0])}
    verdict = check.evaluate(Evidence("d", CONTEXT, {}, {}, planted.keyed(check, CONTEXT, linf_only)))
    assert verdict.status is None and "L2" in verdict.reason
    both = {**linf_only, "l2: steps 10": record([1, 1, 1, 0] * 25), "l2: steps 20": record([1, 0, 0, 0] * 25)}  # 50 of 100
    verdict = check.evaluate(Evidence("d", CONTEXT, {}, {}, planted.keyed(check, CONTEXT, both)))
    assert verdict.status is Status.WARN and verdict.reason.startswith("L2:") and "L∞:" in verdict.figure
    assert verdict.details["L2 20 steps"] == 25.0


@pytest.mark.parametrize("broken, audited, status", [(0, 0, Status.PASS), (0, 100, Status.PASS), (1, 100, Status.PASS),
                                                     (3, 100, Status.PASS), (15, 100, Status.FAIL), (1, 10, Status.PASS),
                                                     (3, 10, Status.FAIL)])
def test_reference_audit_fails_only_on_a_significant_share(broken, audited, status):
    """One example at 100 images must not flip the verdict (a binomial test against the tolerated 2%)."""
    attacked = np.zeros(200, dtype=bool)
    attacked[:audited] = True
    correct = attacked.copy()
    correct[:broken] = False
    cell = dataclasses.replace(record(correct, attacked=attacked), attack_id="aa-standard")
    check = ReferenceAttack()
    evidence = Evidence("d", CONTEXT, {}, {}, planted.keyed(check, CONTEXT, {"linf: reference": cell,
                                                                           "l2: reference": record([1], attacked=[0])}))
    verdict = check.evaluate(evidence)
    assert verdict.status is status, verdict
    if audited:
        assert f"broke {broken} of {audited}" in verdict.figure


def test_requests_on_the_matrix_survivors_chain_after_its_cells(tmp_path, mnist, natural_model):
    save_file({k: v.contiguous() for k, v in natural_model.state_dict().items()}, str(tmp_path / "n.safetensors"))
    (tmp_path / "s.toml").write_text(WEAK.format(columns=STRONG_COLUMNS, examples=4))
    spec = spec_module.load(tmp_path / "s.toml")
    cells = plan(spec, mnist)
    matrix = [c.key for c in cells if c.check is None]
    reference = next(c for c in cells if c.check == "reference-attack")
    assert reference.after == tuple(matrix) and reference.sample == 4 and reference.examples == spec.eval_examples
    free = next(c for c in cells if c.check == "gradient-free")
    white = [c.key for c in cells if c.check is None and (c.attack is None or c.attack.family == "iterative")]
    assert free.after == tuple(white)


WEAK = """
[benchmark]
name = "audit"
dataset = "mnist5k"
eval_examples = 60
batch_size = 60
cascade = true

[eps]
linf = [0.1]

[defenses.natural]
factory = "tests.planted:natural"
weights = "n.safetensors"

{columns}

[checks.reference-attack]
examples = {examples}

[checks.gradient-free]
queries = 50
examples = 20
"""
WEAK_COLUMNS = '[attacks.timid]\nattack = "pgd-linf"\nsteps = 2\nstep_fraction = 0.05\nrandom_start = false\n'
STRONG_COLUMNS = ('[attacks.pgd]\nattack = "pgd-linf"\nsteps = 40\n\n'
                  '[attacks.apgd-t]\nattack = "ta-apgd-t"\ntargets = 3\nsteps = 50\n')


@pytest.mark.slow
def test_the_reference_audit_fails_a_board_whose_columns_are_weak(tmp_path, mnist, natural_model):
    """A planted board: the natural model attacked only by a timid PGD (2 steps of 0.05 eps) looks robust; AutoAttack
    on 10 of its survivors breaks most of them and the row fails. The same model under PGD-40 and APGD-T passes."""
    save_file({k: v.contiguous() for k, v in natural_model.state_dict().items()}, str(tmp_path / "n.safetensors"))
    verdicts = {}
    for name, columns in (("weak", WEAK_COLUMNS), ("strong", STRONG_COLUMNS)):
        (tmp_path / f"{name}.toml").write_text(WEAK.format(columns=columns, examples=10))
        spec = spec_module.load(tmp_path / f"{name}.toml")
        with ResultStore(tmp_path / f"{name}.sqlite") as store:
            assert run(spec, store=store, cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False,
                       data=mnist).failed == []
            board = aggregate.build(spec, store, mnist)
        verdicts[name] = board.verdicts["natural"]["reference-attack"]
        worst = board.summary.set_index("Defense").loc["natural", "Worst L∞ 0.1"]
        verdicts[name + " worst"] = worst
    assert verdicts["weak worst"] > verdicts["strong worst"] + 20  # the timid column overstates the model
    assert verdicts["weak"].status is Status.FAIL and "weaker than AutoAttack" in verdicts["weak"].reason
    assert verdicts["strong"].status is Status.PASS, verdicts["strong"]
    assert verdicts["weak"].details["L∞ Audited"] == 10


def test_convergence_indicators_flag_what_they_name():
    check = AttackConvergence(steps=12, window=4, min_examples=2)
    rising = np.tile(np.arange(12, dtype=float), (4, 1))  # best loss still climbing at the end
    flat = np.tile(np.r_[np.arange(6), np.full(6, 5.0)], (4, 1))
    base = {"clean_correct": np.ones(4), "loss_change": np.zeros(4), "library_correct": np.array([1, 1, 0, 0]),
            "library_fooled_on_path": np.zeros(4)}
    assert check.indicators({**base, "best_loss": rising})["incomplete optimization"] == (2, 2)
    assert check.indicators({**base, "best_loss": flat})["incomplete optimization"] == (0, 2)
    silent = {**base, "best_loss": flat, "library_fooled_on_path": np.array([1, 1, 1, 0])}
    assert check.indicators(silent)["silent success"] == (2, 4)  # example 2 was fooled and kept fooled
    shaky = {**base, "best_loss": flat, "loss_change": np.array([0.0, 0.9, 0.01, 0.5])}
    assert check.indicators(shaky)["unstable predictions"] == (2, 4)
    context = dataclasses.replace(CONTEXT, grid={Norm.LINF: (0.3,)})
    verdict = check.evaluate(Evidence("d", context, {}, {}, planted.keyed(
        check, context, {"linf: convergence": dataclasses.replace(record([1]), measurements=silent)})))
    assert verdict.status is Status.FAIL and "silent success" in verdict.reason
    few = AttackConvergence(steps=12, window=4)  # 2 of 2 survivors still rising: too few examples to judge
    probe = dataclasses.replace(record([1]), measurements={**base, "best_loss": rising})
    assert few.evaluate(Evidence("d", context, {}, {}, planted.keyed(few, context, {"linf: convergence": probe}))).status is Status.PASS


@pytest.mark.slow
def test_the_path_recorder_sees_apgd_and_a_fooled_point(natural_model, mnist):
    from attacks_ext.checks.attack_convergence import probe_attack_convergence

    x, y = mnist.x_test[:20], mnist.y_test[:20]
    out = probe_attack_convergence(natural_model, x, y, generator=torch.Generator().manual_seed(0), norm="linf",
                                   eps=0.3, library_steps=10, noise_draws=2, noise_share=0.01)
    assert out["best_loss"].shape[0] == 20 and out["best_loss"].shape[1] >= 10
    broken = out["clean_correct"] & ~out["library_correct"]
    assert broken.sum() > 10 and out["library_fooled_on_path"][broken].all()  # what it returned, it saw
    assert (np.diff(out["best_loss"], axis=1) >= 0).all()


class _RankedLogits(torch.nn.Module):
    """z_k = b_k + x_k on a 10-pixel input: the clean point ranks the wrong classes 1, 2, ..., 9 by their biases."""

    def forward(self, x):
        return torch.arange(5.0, -5.0, -1.0) + x.flatten(1)


@pytest.mark.parametrize("first_target, targets, expected", [(1, 2, {1, 2}), (5, 2, {5, 6}), (8, 5, {8, 9})])
def test_targeted_apgd_goes_through_the_wrong_classes_from_the_first_target_rank(monkeypatch, first_target, targets,
                                                                                 expected):
    """A second targeted column goes on to the targets the first did not try: with first_target k, APGD-T aims at
    the k-th highest wrong class of the clean input and the ones below it, as many as exist (none is robust-breaking
    here: eps 0.01 cannot move a logit by the 1.0 between them, so every target runs)."""
    import torchattacks
    from harness.registry import ATTACKS
    from attacks_ext.base import ExampleRandomness

    aimed = set()
    library_loss = torchattacks.APGDT.dlr_loss_targeted

    def recording(self, logits, y, y_target):
        aimed.update(y_target.tolist())
        return library_loss(self, logits, y, y_target)

    monkeypatch.setattr(torchattacks.APGDT, "dlr_loss_targeted", recording)
    x, y = torch.zeros(4, 1, 1, 10), torch.zeros(4, dtype=torch.long)
    attack = ATTACKS.get("ta-apgd-t-l2")(steps=5, targets=targets, first_target=first_target)
    x_adv = attack.run(_RankedLogits(), x, y, eps=0.01, rng=ExampleRandomness(0, torch.arange(4)))
    assert aimed == expected
    assert (_RankedLogits()(x_adv).argmax(1) == 0).all()


def test_a_first_target_past_the_wrong_classes_is_an_error_naming_the_limit():
    from harness.registry import ATTACKS
    from attacks_ext.base import ExampleRandomness

    attack = ATTACKS.get("ta-apgd-t")(steps=5, targets=3, first_target=10)
    with pytest.raises(ValueError, match="first_target is at most 9"):
        attack.run(_RankedLogits(), torch.zeros(2, 1, 1, 10), torch.zeros(2, dtype=torch.long), eps=0.3,
                   rng=ExampleRandomness(0, torch.arange(2)))


ONE_STEP_THEN_PGD = """
[benchmark]
name = "one-step-only"
dataset = "mnist5k"

[eps]
linf = [0.1, 0.3]

[defenses.natural]
recipe = "natural"

[attacks.fgsm]
attack = "fgsm"

[attacks.pgd]
attack = "pgd-linf"
eps = {pgd_eps}
"""


def test_a_threat_where_only_one_step_attacks_ran_is_named_no_worst_case(tmp_path):
    from harness.reports.leaderboard import _one_step_only_note

    path = tmp_path / "b.toml"
    path.write_text(ONE_STEP_THEN_PGD.format(pgd_eps="[0.1]"))
    note = "\n".join(_one_step_only_note(spec_module.load(path)))
    assert note.startswith("**Not a worst case at L∞ 0.3**: only one-step attacks (fgsm) ran there"), note
    path.write_text(ONE_STEP_THEN_PGD.format(pgd_eps="[0.1, 0.3]"))
    assert _one_step_only_note(spec_module.load(path)) == []
