"""Every board of a benchmark written at once: the leaderboard with its figures, the sanity board when the spec
has checks, the label-leak board when it pairs twins, and the findings board when it has [findings]."""
from __future__ import annotations

from pathlib import Path

from harness.data import Dataset
from harness.provenance import code_commit
from harness.reports.aggregate import board_file, build
from harness.reports.leaderboard import render_markdown
from harness.reports.findings import render_findings
from harness.reports.figures import figure_name, render_figure, render_training_figure, training_figure_name
from harness.reports.label_leak import (label_leak_frame, perturbation_probe_frame, render_label_leak_figure,
                                       render_label_leak_markdown, robust_features_section)
from harness.reports.sanity import render_sanity
from harness.spec import BenchmarkSpec
from harness.store import ResultStore
from harness.reports.markdown import collecting, write_json


def _write_board(path: Path, render, versions: dict) -> Path:
    """Write the markdown `render()` returns, and beside it `<board>.json` with the raw values of its tables."""
    with collecting() as frames:
        markdown = render()
    path.write_text(markdown)
    write_json(path, markdown, frames, versions=versions)
    return path


def write(spec: BenchmarkSpec, store: ResultStore, data: Dataset, out_dir: Path, *, command: str) -> list[Path]:
    """Render `<out_dir>/<name>.md` with its figures, and the label-leak board when the spec pairs twins, each
    with its `.json` of raw table values; returns the markdown paths."""
    board = build(spec, store, data)
    commit = ", ".join(board.commits) or code_commit()  # the commits the stored cells were computed at
    figure = Path("figures") / figure_name(spec)
    render_figure(board, out_dir / figure)
    training_figure = Path("figures") / training_figure_name(spec)
    render_training_figure(board, out_dir / training_figure)
    path = out_dir / f"{spec.name}.md"
    trained = any(log.get("epochs") for log in board.trainings.values())
    paths = [_write_board(path, lambda: render_markdown(board, command=command, figure=figure.as_posix(),
                                                       training_figure=training_figure.as_posix() if trained else None),
                         board.versions)]
    if spec.checks:
        sanity_path = out_dir / board_file(spec, "sanity")
        paths.append(_write_board(sanity_path, lambda: render_sanity(board, out_dir, command=command),
                                  board.versions))
    if spec.label_leak_pairs:
        frame = label_leak_frame(board)
        leak_figure = Path("figures") / f"{spec.name}-label-leaking.png"
        render_label_leak_figure(spec, frame, out_dir / leak_figure)
        leak_path = out_dir / board_file(spec, "label-leaking")
        paths.append(_write_board(leak_path, lambda: render_label_leak_markdown(
            spec, frame, command=command, figure=leak_figure.as_posix(), commit=commit,
            probe=perturbation_probe_frame(board) if spec.perturbation_probe else None,
            robust_features=robust_features_section(spec, board.robust_features)), board.versions))
    if spec.findings:
        paths.append(_write_board(out_dir / board_file(spec, "findings"), lambda: render_findings(
            board, out_dir, command=command, commit=commit), board.versions))
    return paths
