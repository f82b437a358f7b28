"""How a benchmark would scale over workers, from what a run measured: `python -m harness scaling <toml>`.

The work is a graph: each trained defense is a training task (after its ensemble sources), each stored cell a
task after its model's training (and its transfer source's), after the cells its cascade builds on and the
column it reuses. Task lengths are the stored seconds (training logs, cells). For P workers the makespan is that
of list scheduling, longest remaining path first (Graham's bound: within twice the optimum; it never beats the
lower bound max(total work / P, critical path)). The critical path is what no number of workers can shorten.
"""
from __future__ import annotations

import datetime
import heapq
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.data import Dataset
from harness.figures import pyplot
from harness.planning import plan
from harness.preparation import defense_keys
from harness.reports.markdown import markdown_table
from harness.spec import BenchmarkSpec
from harness.store import ResultStore

WORKERS = (1, 2, 4, 8, 16, 64, 256)


@dataclass
class Task:
    name: str
    seconds: float
    after: set[str] = field(default_factory=set)


def task_graph(spec: BenchmarkSpec, store: ResultStore, data: Dataset) -> tuple[dict[str, Task], list[str]]:
    """The tasks of a benchmark with their measured seconds, and what is missing from the store (counted as 0 s)."""
    keys = defense_keys(spec, data)
    by_name = spec.defenses_by_name
    tasks: dict[str, Task] = {}
    missing: list[str] = []
    for name, defense in by_name.items():
        stored = store.defense(keys[name])
        seconds = (stored or {}).get("training", {}).get("seconds")
        if defense.recipe is not None and seconds is None:
            missing.append(f"training of {name}")
        sources = defense.recipe.ensemble_sources if defense.recipe is not None else ()
        tasks.setdefault(f"train {name}", Task(f"train {name}", float(seconds or 0.0), {f"train {s}" for s in sources}))
    records = store.cells()
    for cell in plan(spec, data):
        if cell.key in tasks:
            continue  # a check's request that another one shares
        record = records.get(cell.key)
        if record is None:
            missing.append(cell.describe())
        after = {f"train {name}" for name in cell.models}  # its own model, a transfer source, [transfer]'s targets
        after |= set(cell.after) | ({cell.reuses} if cell.reuses else set())
        tasks[cell.key] = Task(cell.describe(), 0.0 if record is None else float(record.seconds), after)
    return tasks, missing


def _successors(tasks: dict[str, Task]) -> dict[str, list[str]]:
    successors: dict[str, list[str]] = {key: [] for key in tasks}
    for key, task in tasks.items():
        for before in task.after:
            successors[before].append(key)
    return successors


def _remaining(tasks: dict[str, Task]) -> dict[str, float]:
    """Each task's longest path to the end of the graph, its own seconds included (its 'bottom level')."""
    successors = _successors(tasks)
    level: dict[str, float] = {}
    for key in reversed(_topological(tasks)):
        level[key] = tasks[key].seconds + max((level[s] for s in successors[key]), default=0.0)
    return level


def _topological(tasks: dict[str, Task]) -> list[str]:
    order, done = [], set()
    for key in tasks:
        stack = [(key, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((before, False) for before in tasks[node].after if before not in done)
    return order


def makespan(tasks: dict[str, Task], workers: int) -> float:
    """List scheduling on `workers` identical workers, the longest remaining path first."""
    level = _remaining(tasks)
    waiting = {key: len(task.after) for key, task in tasks.items()}
    successors = _successors(tasks)
    ready = [(-level[key], key) for key, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, free = 0.0, workers
    while ready or running:
        while free and ready:
            _, key = heapq.heappop(ready)
            heapq.heappush(running, (now + tasks[key].seconds, key))
            free -= 1
        now, key = heapq.heappop(running)
        free += 1
        for after in successors[key]:
            waiting[after] -= 1
            if waiting[after] == 0:
                heapq.heappush(ready, (-level[after], after))
    return now


def critical_path(tasks: dict[str, Task]) -> list[str]:
    """The chain of tasks whose seconds add up to the longest path."""
    level = _remaining(tasks)
    successors = _successors(tasks)
    starts = [key for key, task in tasks.items() if not task.after]
    path = [max(starts, key=level.get)] if starts else []
    while path and successors[path[-1]]:
        path.append(max(successors[path[-1]], key=level.get))
    return path


def render(spec: BenchmarkSpec, store: ResultStore, data: Dataset, out: Path, *, command: str) -> Path:
    tasks, missing = task_graph(spec, store, data)
    total = sum(task.seconds for task in tasks.values())
    path = critical_path(tasks)
    longest = sum(tasks[key].seconds for key in path)
    rows = []
    for workers in WORKERS:
        span = makespan(tasks, workers)
        bound = max(total / workers, longest)
        rows.append({"Workers": workers, "Makespan (s)": span, "Speed-up": total / span if span else None,
                     "Efficiency": total / span / workers if span else None, "Lower bound (s)": bound})
    figure = out / "figures" / f"{spec.name}-scaling.png"
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 4.0))
    axis.plot(WORKERS, [r["Makespan (s)"] for r in rows], marker="o", label="list scheduling")
    axis.plot(WORKERS, [total / w for w in WORKERS], linestyle=":", label="total work / workers")
    axis.axhline(longest, color="grey", linestyle="--", label=f"critical path ({longest:.0f} s)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("workers")
    axis.set_ylabel("makespan (s)")
    axis.set_title(f"{spec.name}: {len(tasks)} tasks, {total:.0f} s of work", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    chain = " → ".join(f"{tasks[key].name} ({tasks[key].seconds:.1f} s)" for key in path)
    saturated = next((r["Workers"] for r in rows if r["Makespan (s)"] <= 1.05 * longest), None)
    first = tasks[path[0]] if path else None
    lines = [f"# Scaling: {spec.name}", "",
             f"Generated by `{command}` from the results store; {datetime.date.today().isoformat()}. Never edit by hand.", "",
             f"{len(tasks)} tasks ({sum(t.name.startswith('train ') for t in tasks.values())} trainings, the rest cells) "
             f"with the seconds this store measured: {total:.0f} s of work in all. Makespan: list scheduling on P "
             "identical workers, the task with the longest remaining path first, every dependency kept (ensemble "
             "sources before the ensemble, a model's training before its cells, a cascade's cells in order, a "
             "reused column before its reuse). Lower bound: max(work / P, critical path). Transfers and Ray's "
             "per-task overhead are not modelled.", "",
             markdown_table(pd.DataFrame(rows), digits=2), "",
             f"![makespan vs workers](figures/{figure.name})", "",
             f"**Critical path** ({longest:.1f} s, {len(path)} tasks): {chain}.", ""]
    if first is not None:
        lines += ["**What bounds it:** " + (f"from {saturated} workers on, the makespan is within 5% of the critical "
                                             "path, so more workers buy nothing. " if saturated else "")
                  + f"The path starts with {first.name} ({first.seconds:.0f} s, {100 * first.seconds / longest:.0f}% of "
                  f"it); the rest is one chain of {len(path) - 1} cells that must run in order. What would lift the "
                  "bound: data-parallel training of that model (several workers per training task) or a cached "
                  "checkpoint, and a shorter chain (fewer cascade columns at that eps, or splitting one long cell's "
                  "examples across workers).", ""]
    if missing:
        lines += [f"**Not measured:** {len(missing)} tasks are not in the store (counted as 0 s), e.g. {missing[0]}.", ""]
    target = out / f"{spec.name}-scaling.md"
    target.write_text("\n".join(lines))
    return target
