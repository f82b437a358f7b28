"""The matrix end to end on a small spec: store, resume, threat enforcement, external models, report."""
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.reports import drift
from harness import spec as spec_module
from harness.reports import aggregate, leaderboard
from harness.evaluation import SequentialExecutor
from harness.matrix import run
from harness.planning import plan
from harness.spec import AttackSpec
from harness.store import ResultStore

REPO = Path(__file__).resolve().parent.parent

SPEC = """
[benchmark]
name = "tiny"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25

[eps]
linf = [0.1, 0.3]
l2 = [1.5]

[defenses.natural]
recipe = "natural"
epochs = 1

[attacks.fgsm]
attack = "ta-fgsm"

[attacks.pgd]
attack = "pgd-linf"
steps = 5

[attacks.pgd-l2]
attack = "pgd-l2"
steps = 5
"""


@pytest.fixture()
def tiny_spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return spec_module.load(path)


class InterruptAfter(SequentialExecutor):
    """Simulates a run killed after `limit` cells (Ctrl-C between two cells)."""

    def __init__(self, limit):
        self.limit = limit

    def map(self, function, cells):
        for count, item in enumerate(super().map(function, cells)):
            if count == self.limit:
                raise KeyboardInterrupt
            yield item


def vectors(store):
    return {key: (r.clean_correct.tolist(), r.adv_correct.tolist()) for key, r in store.cells().items()}


@pytest.mark.slow
def test_run_resume_and_determinism(tiny_spec, tmp_path, mnist):
    planned = len(plan(tiny_spec, mnist))
    assert planned == 1 + 2 + 2 + 1  # clean + fgsm x2 + pgd x2 + pgd-l2 x1

    with ResultStore(tmp_path / "interrupted.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"),
                executor=InterruptAfter(3), progress=False, data=mnist)
        assert store.count() == 3
        resumed = run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert (resumed.computed, resumed.skipped, resumed.failed) == (planned - 3, 3, [])
        assert store.count() == planned
        again = run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert (again.computed, again.skipped) == (0, planned)
        interrupted = vectors(store)

    with ResultStore(tmp_path / "straight.sqlite") as store:
        run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt2", device=torch.device("cpu"), progress=False, data=mnist)
        assert vectors(store) == interrupted  # same seed, same numbers, whether interrupted or not
        record = next(r for r in store.cells().values() if r.attack == "pgd" and r.eps == 0.3)
        # PGD-5 on 60 examples costs 300 gradients run to the end; on a natural model at eps 0.3 early stop
        # drops most examples within the first steps, and the forward that checks them is the gradient's own
        assert record.forward_evals == record.gradient_evals < 5 * 60
        assert record.seed > 0 and record.versions["torch"] == torch.__version__ and record.git_commit
        # PGD at 0.3 breaks a natural model: most clean-correct examples fall
        assert record.robust_correct.sum() < 0.5 * record.clean_correct.sum()


class OutOfBudget:
    name, norm, family = "broken", None, "iterative"

    def __call__(self, model, x, y, *, eps, generator, stop_when_fooled=False):
        return (x + 2 * eps).clamp(0, 1)


@pytest.mark.slow
def test_threat_model_violation_fails_the_cell_loudly(tiny_spec, tmp_path, mnist, monkeypatch, capsys):
    monkeypatch.setattr(AttackSpec, "build", lambda self: OutOfBudget())
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert summary.computed == 1 and len(summary.failed) == 5  # only the clean cell survives
        assert all("ThreatModelViolation" in reason for _, reason in summary.failed)
        assert store.count() == 1
    assert "FAILED" in capsys.readouterr().err


def test_worst_case_is_the_per_example_and(tiny_spec, tmp_path, mnist):
    """Report aggregates come from stored vectors: fill the store by hand and check every number."""
    rng = np.random.default_rng(0)
    cells = plan(tiny_spec, mnist)
    from harness.store import CellRecord

    outcomes = {}
    with ResultStore(tmp_path / "s.sqlite") as store:
        clean = rng.random(60) < 0.9
        for cell in cells:
            adv = clean.copy() if cell.attack is None else rng.random(60) < 0.6
            outcomes[(cell.label, cell.eps)] = adv
            store.write_cell(CellRecord(cell.key, "tiny", cell.defense, cell.defense_key, cell.label, "x", {}, cell.norm,
                                        cell.eps, clean, adv, 1.0, 10, 10, cell.seed, {}, "abc", "cpu", "now"))
        board = aggregate.build(tiny_spec, store, mnist)
    row = board.summary.iloc[0]
    assert row["Clean"] == pytest.approx(100 * clean.mean())
    worst = clean & outcomes[("fgsm", 0.3)] & outcomes[("pgd", 0.3)]
    assert row["Worst L∞ 0.3"] == pytest.approx(100 * worst.mean())
    assert row["Worst L2 1.5"] == pytest.approx(100 * (clean & outcomes[("pgd-l2", 1.5)]).mean())
    detail = board.details[next(iter(board.details))].iloc[0]
    assert detail["pgd @ L∞ 0.1"] == pytest.approx(100 * (clean & outcomes[("pgd", 0.1)]).mean())
    assert board.missing == []


def test_store_refuses_a_duplicate_cell(tmp_path):
    from harness.store import CellRecord

    record = CellRecord("k", "b", "d", "dk", "a", "a", {}, "linf", 0.1, np.ones(3, bool), np.zeros(3, bool),
                        1.0, 1, 1, 1, {}, "c", "cpu", "t")
    with ResultStore(tmp_path / "s.sqlite") as store:
        store.write_cell(record)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed: cells.key"):
            store.write_cell(record)
        assert store.count() == 1
        stored = store.cells()["k"]
        assert stored.clean_correct.tolist() == [True] * 3 and stored.adv_correct.tolist() == [False] * 3


@pytest.mark.slow
def test_external_model_goes_through_the_same_matrix(tmp_path, mnist, monkeypatch, natural_model):
    package = tmp_path / "user_models"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from harness.models import small_cnn\n\ndef build(width=1.0):\n    return small_cnn(width=width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file({k: v.contiguous() for k, v in natural_model.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    path = tmp_path / "ext.toml"
    path.write_text(SPEC.replace('[defenses.natural]\nrecipe = "natural"\nepochs = 1',
                                 '[defenses.mine]\nfactory = "user_models:build"\nweights = "mine.safetensors"\noptions = { width = 1.0 }'))
    spec = spec_module.load(path)
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run(spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        assert summary.failed == [] and summary.computed == 6
        board = aggregate.build(spec, store, mnist)
        markdown = leaderboard.render_markdown(board, command="test", figure="f.png")
    row = board.summary.iloc[0]
    assert row["Defense"] == "mine" and row["Source"] == "external"
    assert row["Clean"] > 90
    assert "| mine " in markdown and "user_models:build + mine.safetensors" in markdown


def _board(worst_a=70.0, seconds=10.0, rows_b=True):
    ranking = [["a", 97.0, worst_a]] + ([["b", 95.0, 0.0]] if rows_b else [])
    return {"tables": [{"section": "Ranking", "columns": ["Defense", "Clean", "Worst L∞ 0.3"], "rows": ranking},
                       {"section": "Measured cost", "columns": ["Defense", "Eval s"], "rows": [["a", seconds]]}]}


def test_compare_flags_drift_and_missing_rows():
    assert drift.compare(_board(), _board()) == []
    assert drift.compare(_board(), _board(worst_a=70.9, seconds=99.0)) == []  # within 1 point; costs are timings
    assert drift.compare(_board(), _board(worst_a=68.5)) == ["[Ranking] a / Worst L∞ 0.3: committed 70, regenerated 68.5"]
    assert any("missing" in p for p in drift.compare(_board(), _board(rows_b=False)))
    assert any("is new" in p for p in drift.compare(_board(rows_b=False), _board()))


def test_boards_store_their_tables_beside_the_markdown(tiny_spec, tmp_path, mnist):
    """`<board>.json` holds every table of the board with raw values (what the drift check reads), and matches the
    markdown it sits beside."""
    import json

    from harness.reports import boards
    with ResultStore(tmp_path / "s.sqlite") as store:
        run(tiny_spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        (path,) = boards.write(tiny_spec, store, mnist, tmp_path / "out", command="test")
    stored = json.loads(path.with_suffix(".json").read_text())
    markdown = path.read_text()
    assert len(stored["tables"]) == markdown.count("\n|:") and stored["tables"][0]["section"] == "Ranking"
    ranking = stored["tables"][0]
    row = dict(zip(ranking["columns"], ranking["rows"][0]))
    assert row["Defense"] == "natural" and set(row["Clean"]) >= {"percent", "low", "high", "correct", "total"}
    assert f"| {row['Clean']['percent']:.1f} [{row['Clean']['low']:.1f}, {row['Clean']['high']:.1f}] " in markdown
    assert drift.compare_files(path, path, tolerance=1.0) == []


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_lists_registries():
    result = run_cli("list", "attacks")
    assert result.returncode == 0 and "pgd-linf" in result.stdout and "art-pgd-linf" in result.stdout
    assert "small-cnn" in run_cli("list", "models").stdout


def test_cli_reports_spec_errors_with_the_key(tmp_path):
    (tmp_path / "bad.toml").write_text(SPEC.replace('attack = "pgd-linf"', 'attack = "pgd-inf"'))
    result = run_cli("report", str(tmp_path / "bad.toml"), "--home", str(tmp_path))
    assert result.returncode == 2
    assert "[attacks.pgd.attack] unknown attack 'pgd-inf'" in result.stderr


def test_board_tables_follow_the_markdown_not_the_render_order():
    """A section computed before the one above it (the label-leak board renders its robust-feature table first)
    is still stored under its own heading."""
    import pandas as pd

    from harness.reports.markdown import board_tables, collecting, markdown_table

    with collecting() as rendered:
        later = markdown_table(pd.DataFrame({"Data set": ["D_rand"], "Accuracy": [12.5]}))
        markdown = ("# Board\n\n## Ranking\n\n" + markdown_table(pd.DataFrame({"Defense": ["a"], "Clean": [97.0]}))
                    + "\n\n## Robust features\n\n" + later + "\n")
    tables = board_tables(markdown, rendered)
    assert [(t["section"], t["rows"]) for t in tables] == [("Ranking", [["a", 97.0]]), ("Robust features", [["D_rand", 12.5]])]
    with pytest.raises(RuntimeError, match="written by hand"):
        board_tables(markdown + "\n## Extra\n\n| a |\n|:--|\n| 1 |\n", rendered)


def test_training_seed_replicas_get_their_own_checkpoints_and_only_the_rank_by_cells(tmp_path, mnist):
    from harness.planning import plan
    from harness.preparation import defense_keys

    path = tmp_path / "seeds.toml"
    path.write_text(SEEDS_SPEC)
    loaded = spec_module.load(path)
    keys = defense_keys(loaded, mnist)
    assert len({keys["natural"], keys["natural@seed1"], keys["natural@seed2"]}) == 3
    cells = plan(loaded, mnist)
    replica = [(c.label, c.eps) for c in cells if c.defense == "natural@seed1"]
    assert replica == [("clean", 0.0), ("pgd", 0.3)]  # not eps 0.1, no check cells
    assert {(c.label, c.eps) for c in cells if c.defense == "natural"} >= {("pgd", 0.1), ("pgd", 0.3)}


SEEDS_SPEC = """
[benchmark]
name = "seeds"
dataset = "mnist5k"
eval_examples = 20
rank_by = ["linf", 0.3]
cascade = true
[eps]
linf = [0.1, 0.3]
[defenses.natural]
recipe = "natural"
epochs = 1
training_seeds = [0, 1, 2]
[attacks.pgd]
attack = "pgd-linf"
steps = 5
[checks.restart-sweep]
restarts = 2
steps = 5
examples = 10
"""
