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

MISSING = "—"  # what a table shows for a value not in the store yet
_collected: list[pd.DataFrame] | None = None


def markdown_table(frame: pd.DataFrame, digits: int = 1) -> str:
    """`frame` as a pipe table, floats to `digits` places; the raw frame is kept while `collecting()`."""
    if _collected is not None:
        _collected.append(frame.copy())

    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        if isinstance(value, (float, np.floating)):
            return f"{value:.{digits}f}"
        return str(value)

    shown = frame.apply(lambda column: column.map(cell)) if len(frame) else frame
    return shown.to_markdown(index=False, disable_numparse=True, stralign="left")


@contextlib.contextmanager
def collecting():
    """Collect the frames `markdown_table` renders inside the block, in order."""
    global _collected
    previous, _collected = _collected, []
    try:
        yield _collected
    finally:
        _collected = previous


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value if value is None or isinstance(value, (int, str, bool)) else str(value)


def board_tables(markdown: str, frames: list[pd.DataFrame]) -> list[dict]:
    """Each collected frame with the heading of the section the markdown shows it under."""
    headings, heading, in_table = [], "", False
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        starts = line.startswith("|") and not in_table
        in_table = line.startswith("|")
        if starts:
            headings.append(heading)
    if len(headings) != len(frames):
        raise RuntimeError(f"the board shows {len(headings)} tables but {len(frames)} were rendered as tables: a "
                           "table written by hand would escape the drift check")
    return [{"section": h, "columns": [str(c) for c in frame.columns],
             "rows": [[_plain(v) for v in row] for row in frame.itertuples(index=False, name=None)]}
            for h, frame in zip(headings, frames)]


def write_json(path: Path, markdown: str, frames: list[pd.DataFrame]) -> Path:
    """`<board>.json` beside `<board>.md`: its tables with their raw values."""
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps({"board": path.name, "tables": board_tables(markdown, frames)}, indent=1,
                                    ensure_ascii=False) + "\n")
    return json_path
