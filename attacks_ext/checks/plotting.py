"""Figure helpers shared by the checks' `plot` methods."""
from __future__ import annotations

from harness.figures import pyplot, save_figure


def _save(fig, path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _label(axis, *, xlabel: str, ylabel: str, title: str, drawn: bool, log_y: bool = False) -> None:
    """Axis labels, grid, title and (when anything was drawn) the legend of one check-figure panel."""
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=10)
    if drawn:
        axis.legend(fontsize=7, ncol=2)


def _finish(fig, axis, path, *, xlabel: str, ylabel: str, title: str, drawn: bool, log_y: bool = False) -> bool:
    """Label, legend and save a one-panel check figure; returns whether anything was drawn."""
    _label(axis, xlabel=xlabel, ylabel=ylabel, title=title, drawn=drawn, log_y=log_y)
    _save(fig, path)
    return drawn


def _line_styles(count: int):
    """Distinct (colour, line style) pairs for more defenses than one colour cycle has."""
    colors = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return [(colors[i % len(colors)], ("-", "--", ":")[i // len(colors) % 3]) for i in range(count)]
