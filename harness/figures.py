"""The one way the harness draws: matplotlib on the file-only Agg backend, PNGs without a timestamp."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; CI and servers have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, *, dpi: int) -> None:
    """Write `fig` to `path` (folders created) and close it; no software/date metadata, so reruns diff cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    pyplot().close(fig)
