"""The drift check: a committed board's stored numbers (`<board>.json`, written beside the markdown) compared
with a from-scratch regeneration's, value by value; this is how CI proves the committed boards match the code."""
from __future__ import annotations

import json
import re
from pathlib import Path

NUMBERS_IN_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
KEY_HEADERS = {"Defense", "Twins", "eps", "Check", "Column", "Gradient", "Data set", "Claim"}  # leading columns that name a row


def _same_text(committed: str, fresh: str, tolerance: float) -> bool:
    """Text cells match when their words agree and the numbers inside them agree within `tolerance`."""
    if committed == fresh:
        return True
    words_old, words_new = NUMBERS_IN_TEXT.split(committed), NUMBERS_IN_TEXT.split(fresh)
    numbers_old, numbers_new = NUMBERS_IN_TEXT.findall(committed), NUMBERS_IN_TEXT.findall(fresh)
    return words_old == words_new and len(numbers_old) == len(numbers_new) and all(
        abs(float(a) - float(b)) <= tolerance for a, b in zip(numbers_old, numbers_new))


def cells(board: dict) -> dict[tuple[str, str, str], object]:
    """{(section, row key, column): value} for every table of a board's JSON; a row's key is its leading values
    under naming headers (Defense, Twins, eps, Check, Column, ...), at least the first one."""
    out = {}
    for table in board["tables"]:
        columns = table["columns"]
        leading = max(1, next((i for i, name in enumerate(columns) if name not in KEY_HEADERS), len(columns)))
        for row in table["rows"]:
            key = " | ".join(str(v) for v in row[:leading])
            for column, value in zip(columns[leading:], row[leading:]):
                out[(table["section"], key, column)] = value
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(committed: dict, regenerated: dict, *, tolerance: float = 1.0) -> list[str]:
    """Differences beyond `tolerance` (percentage points) between two boards' stored tables, cost sections
    (timings) aside."""
    old, new = cells(committed), cells(regenerated)
    problems = []
    for key, value in old.items():
        heading, row, column = key
        if "cost" in heading.lower():
            continue
        if key not in new:
            problems.append(f"[{heading}] row {row!r} column {column!r} is missing from the regenerated board")
            continue
        fresh = new[key]
        if isinstance(value, dict) and isinstance(fresh, dict) and "percent" in value and "percent" in fresh:
            value, fresh = value["percent"], fresh["percent"]  # an accuracy with its interval: the value decides
        if _number(value) and _number(fresh):
            if abs(float(value) - float(fresh)) > tolerance:
                problems.append(f"[{heading}] {row} / {column}: committed {value:g}, regenerated {fresh:g}")
        elif type(value) is not type(fresh) or (isinstance(value, str) and not _same_text(value, fresh, tolerance)) or (
                not isinstance(value, str) and value != fresh):
            problems.append(f"[{heading}] {row} / {column}: committed {value!r}, regenerated {fresh!r}")
    for key in new.keys() - old.keys():
        if "cost" not in key[0].lower():
            problems.append(f"[{key[0]}] row {key[1]!r} column {key[2]!r} is new: the committed board lacks it")
    return problems


def compare_files(committed_board: Path, regenerated_board: Path, *, tolerance: float) -> list[str]:
    """Compare the `.json` beside two `.md` boards; a committed board without one is a problem to fix by
    regenerating it (`python -m harness run`)."""
    committed, fresh = committed_board.with_suffix(".json"), regenerated_board.with_suffix(".json")
    if not committed.is_file():
        return [f"{committed}: no stored numbers beside the committed board; regenerate it with `python -m harness run`"]
    old, new = json.loads(committed.read_text()), json.loads(fresh.read_text())
    problems = compare(old, new, tolerance=tolerance)
    return ([f"computed with {cause}" for cause in provenance_differences(old, new)] if problems else []) + problems


def provenance_differences(committed: dict, regenerated: dict) -> list[str]:
    """Library versions and CPU numerics that differ between two boards: when numbers drift, the likely cause
    (trained weights are bit-identical only with the same versions and numerics)."""
    old, new = committed.get("versions", {}), regenerated.get("versions", {})
    return [f"{name} {old.get(name, 'unrecorded')!s} on the committed board, {new.get(name, 'unrecorded')!s} here"
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
