"""The boards' tables as data: every table a board renders is also kept with its raw values, and written beside
the board as `<board>.json` (load it with `pandas.DataFrame(table["rows"], columns=table["columns"])`). The
drift check compares these stored numbers, not the rounded markdown."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.statistics import Accuracy

MISSING = "—"  # what a table shows for a value not in the store yet
_collected: list[tuple[pd.DataFrame, str]] | None = None


def markdown_table(frame: pd.DataFrame, digits: int = 1, *, intervals: bool = True) -> str:
    """`frame` as a pipe table, floats to `digits` places, accuracies with their interval (or without, in wide
    tables: `intervals=False`); the raw frame is kept with its text while `collecting()`."""

    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        if isinstance(value, Accuracy):
            return value.text(digits) if intervals else f"{value.percent:.{digits}f}"
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    shown = frame.apply(lambda column: column.map(cell)) if len(frame) else frame
    text = shown.to_markdown(index=False, disable_numparse=True, stralign="left")
    if _collected is not None:
        _collected.append((frame.copy(), text))
    return text


@contextlib.contextmanager
def collecting():
    """Collect the (frame, text) pairs `markdown_table` renders inside the block."""
    global _collected
    previous, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = previous


def _plain(value):
    if isinstance(value, Accuracy):
        return value.as_json()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value if value is None or isinstance(value, (int, str, bool)) else str(value)


def board_tables(markdown: str, rendered: list[tuple[pd.DataFrame, str]]) -> list[dict]:
    """Each rendered frame, in the order the markdown shows it, with the heading of the section it sits under.
    Frames are found by their rendered text, so the order in which sections were computed does not matter."""
    placed, taken = [], set()
    for frame, text in rendered:
        start = markdown.find(text)
        while start in taken:
            start = markdown.find(text, start + 1)
        if start < 0:
            raise RuntimeError("a table was rendered but is not on the board")
        taken.add(start)
        headings = [line for line in markdown[:start].splitlines() if line.startswith("#")]
        placed.append((start, headings[-1].lstrip("#").strip() if headings else "", frame))
    lines = markdown.splitlines()
    shown = sum(1 for i, line in enumerate(lines) if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")))
    if shown != len(placed):
        raise RuntimeError(f"the board shows {shown} tables but {len(placed)} were rendered as tables: a table "
                           "written by hand would escape the drift check")
    return [{"section": heading, "columns": [str(c) for c in frame.columns],
             "rows": [[_plain(v) for v in row] for row in frame.itertuples(index=False, name=None)]}
            for _, heading, frame in sorted(placed, key=lambda item: item[0])]


def write_json(path: Path, markdown: str, frames: list[tuple[pd.DataFrame, str]], *, versions: dict | None = None) -> Path:
    """`<board>.json` beside `<board>.md`: its tables with their raw values, and the library versions and CPU
    numerics its cells were computed with (the drift check names a difference there as the likely cause)."""
    json_path = path.with_suffix(".json")
    stored = {"board": path.name, "versions": versions or {}, "tables": board_tables(markdown, frames)}
    json_path.write_text(json.dumps(stored, indent=1, ensure_ascii=False) + "\n")
    return json_path
