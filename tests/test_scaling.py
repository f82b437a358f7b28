"""The scaling model: list scheduling and the critical path on graphs worked out by hand, and the page it renders
from a real run's store."""
import itertools

import torch

from harness import spec as spec_module
from harness.matrix import run
from harness.planning import plan
from harness.reports.scaling import Task, critical_path, makespan, render, task_graph
from harness.store import ResultStore
from tests.test_matrix import SPEC


def graph(**edges) -> dict:
    """name=(seconds, 'after1 after2')"""
    return {name: Task(name, seconds, set(after.split())) for name, (seconds, after) in edges.items()}


def brute_force(tasks: dict, workers: int) -> float:
    """The optimum over every priority order (tiny graphs only): list scheduling is one of them."""
    from harness.reports import scaling

    best = float("inf")
    for order in itertools.permutations(tasks):
        rank = {key: i for i, key in enumerate(order)}
        original = scaling._remaining
        scaling._remaining = lambda t: {key: -rank[key] for key in t}  # noqa: E731
        try:
            best = min(best, makespan(tasks, workers))
        finally:
            scaling._remaining = original
    return best


def test_makespan_and_critical_path_by_hand():
    # train (10) -> a (3) -> b (2); train -> c (6); d (4) alone. Work 25; critical path train, c = 16.
    tasks = graph(train=(10, ""), a=(3, "train"), b=(2, "a"), c=(6, "train"), d=(4, ""))
    assert makespan(tasks, 1) == 25
    assert makespan(tasks, 2) == 16  # d beside train; then c beside a, b
    assert makespan(tasks, 64) == 16
    assert critical_path(tasks) == ["train", "c"]
    for workers in (1, 2, 3):
        assert makespan(tasks, workers) >= max(25 / workers, 16)
        assert makespan(tasks, workers) <= 2 * brute_force(tasks, workers)  # Graham's bound


def test_longest_remaining_path_goes_first():
    # y (1) -> z (9) beside a (5) and b (5) on 2 workers: y first (its path is 10 s) gives 10; a and b first (as
    # their names or the order they were listed would have it) would give 15.
    tasks = graph(a=(5, ""), b=(5, ""), y=(1, ""), z=(9, "y"))
    assert makespan(tasks, 2) == 10
    assert critical_path(tasks) == ["y", "z"]


def test_scaling_page_from_a_real_store(tmp_path, mnist):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    spec = spec_module.load(path)
    with ResultStore(tmp_path / "r.sqlite") as store:
        run(spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False, data=mnist)
        tasks, missing = task_graph(spec, store, mnist)
        page = render(spec, store, mnist, tmp_path / "out", command="test").read_text()
    assert missing == [] and len(tasks) == 1 + len({c.key for c in plan(spec, mnist)})
    assert all(task.after for key, task in tasks.items() if not key.startswith("train "))  # every cell after its training
    assert "| 256 " in page and "**Critical path**" in page and "train natural" in page
    assert (tmp_path / "out" / "figures" / "tiny-scaling.png").stat().st_size > 1000
