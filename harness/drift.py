"""The drift check: two rendered boards compared number by number, which is how CI proves the committed boards
match the code."""
from __future__ import annotations

import re

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
NUMBERS_IN_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
KEY_HEADERS = {"Defense", "Twins", "eps", "Check", "Column", "Gradient", "Data set"}  # leading columns that name a row


def _same_text(committed: str, fresh: str, tolerance: float) -> bool:
    """Text cells match when their words agree and the numbers inside them agree within `tolerance`."""
    if committed == fresh:
        return True
    words_old, words_new = NUMBERS_IN_TEXT.split(committed), NUMBERS_IN_TEXT.split(fresh)
    numbers_old, numbers_new = NUMBERS_IN_TEXT.findall(committed), NUMBERS_IN_TEXT.findall(fresh)
    return words_old == words_new and len(numbers_old) == len(numbers_new) and all(
        abs(float(a) - float(b)) <= tolerance for a, b in zip(numbers_old, numbers_new))


def parse_tables(markdown: str) -> dict[tuple[str, str, str], str]:
    """{(section heading, row key, column header): cell text} for every pipe table; a row's key is its
    leading cells under naming headers (Defense, Twins, eps, Check, Column), at least the first cell."""
    cells, heading, header = {}, "", None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if header is None:
            header = parts
        elif not all(set(part) <= set(":-") for part in parts):
            leading = next((i for i, name in enumerate(header) if name not in KEY_HEADERS), len(header))
            leading = max(1, leading)
            row = " | ".join(parts[:leading])
            for column, value in zip(header[leading:], parts[leading:]):
                cells[(heading, row, column)] = value
    return cells


def compare(committed: str, regenerated: str, *, tolerance: float = 1.0) -> list[str]:
    """Differences beyond `tolerance` (percentage points) between two leaderboards, ignoring cost sections."""
    old, new = parse_tables(committed), parse_tables(regenerated)
    problems = []
    for key, value in old.items():
        heading, row, column = key
        if "cost" in heading.lower():
            continue
        if key not in new:
            problems.append(f"[{heading}] row {row!r} column {column!r} is missing from the regenerated leaderboard")
            continue
        fresh = new[key]
        if NUMBER.match(value) and NUMBER.match(fresh):
            if abs(float(value) - float(fresh)) > tolerance:
                problems.append(f"[{heading}] {row} / {column}: committed {value}, regenerated {fresh}")
        elif not _same_text(value, fresh, tolerance):
            problems.append(f"[{heading}] {row} / {column}: committed {value!r}, regenerated {fresh!r}")
    for key in new.keys() - old.keys():
        if "cost" not in key[0].lower():
            problems.append(f"[{key[0]}] row {key[1]!r} column {key[2]!r} is new: the committed leaderboard lacks it")
    return problems
