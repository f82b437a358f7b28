"""The main board's figures: worst-case accuracy against eps, and the training curves."""
from __future__ import annotations

from pathlib import Path

from harness.figures import pyplot, save_figure
from harness.reports.aggregate import Leaderboard
from harness.spec import BenchmarkSpec


def figure_name(spec: BenchmarkSpec) -> str:
    return f"{spec.name}-accuracy-vs-eps.png"


def render_figure(board: Leaderboard, path: Path) -> None:
    plt = pyplot()

    norms = [norm for norm, _ in board.spec.eps]
    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.8), squeeze=False)
    for axis, norm in zip(axes[0], norms):
        for defense, curves in board.curves.items():
            points = curves.get(norm, [])
            if points:
                eps, accuracy = zip(*points)
                axis.plot(eps, accuracy, marker="o", label=defense)
        axis.set_xlabel(f"eps ({norm.symbol}, [0, 1] input units)")
        axis.set_ylabel("worst-case robust accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.set_title(f"{board.spec.name}: {norm.symbol} threat model")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def training_figure_name(spec: BenchmarkSpec) -> str:
    return f"{spec.name}-training.png"


def render_training_figure(board: Leaderboard, path: Path) -> None:
    """One panel per trained defense: loss and clean / training-adversary / guard accuracy per epoch."""
    plt = pyplot()

    logs = {name: log for name, log in board.trainings.items() if log.get("epochs")}
    if not logs:
        return
    columns = min(5, len(logs))
    rows = -(-len(logs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.flat[len(logs):]:
        axis.axis("off")
    for axis, (name, log) in zip(axes.flat, logs.items()):
        epochs = [e["epoch"] for e in log["epochs"]]
        axis.plot(epochs, [e["clean_accuracy"] for e in log["epochs"]], label="clean acc. (1,000 training images)")
        adversary = [e.get("adversary_accuracy") for e in log["epochs"]]
        if any(a is not None for a in adversary):
            axis.plot(epochs, [float("nan") if a is None else a for a in adversary], label="adversary acc.")
        guard = [e.get("guard_pgd_accuracy") for e in log["epochs"]]
        if any(g is not None for g in guard):
            axis.plot(epochs, [float("nan") if g is None else g for g in guard], label="guard PGD acc.")
        axis.set_ylim(0, 1.02)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        loss_axis = axis.twinx()
        loss_axis.plot(epochs, [e["loss"] for e in log["epochs"]], color="gray", linestyle="--", label="loss")
        loss_axis.tick_params(labelsize=7, colors="gray")
        axis.tick_params(labelsize=7)
    handles = [h for axis in axes.flat[: len(logs)] for h in axis.get_legend_handles_labels()[0]]
    labels = [label for axis in axes.flat[: len(logs)] for label in axis.get_legend_handles_labels()[1]]
    unique = dict(zip(labels, handles))
    unique["loss (right axis)"] = plt.Line2D([], [], color="gray", linestyle="--")
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8)
    fig.suptitle(f"{board.spec.name}: training curves", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, path, dpi=100)
