"""The benchmark loader's error type and the validators every TOML table uses: each error names the file, the key
and what is allowed there."""
from __future__ import annotations

from pathlib import Path

from harness.registry import check_keywords
from harness.threat import Norm, check_eps


class SpecError(ValueError):
    """A benchmark file that cannot be run as written; the message names the key."""


def fail(path: Path | str, key: str, message: str):
    raise SpecError(f"{path}: [{key}] {message}")


def check_keys(path, key: str, table: dict, allowed: set[str], required: set[str] = frozenset()):
    if not isinstance(table, dict):
        fail(path, key, f"must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        fail(path, key, f"unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(table))
    if missing:
        fail(path, key, f"missing required key {', '.join(map(repr, missing))}")


def check_options(path, key: str, entry_id: str, factory, options: dict) -> None:
    """Every option must be a keyword of the registered factory; the error lists the allowed ones."""
    try:
        check_keywords(factory, options, entry_id)
    except ValueError as error:
        fail(path, key, str(error))


def positive_int(path, key: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(path, key, f"must be a positive integer, got {value!r}")
    return value


def eps_list(path, key: str, values, norm: Norm, diameter: float | None = None) -> tuple[float, ...]:
    """A sorted list of eps; at L2 none above `diameter`, the largest distance two inputs can be apart."""
    if not isinstance(values, list) or not values:
        fail(path, key, f"must be a non-empty list of numbers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(path, key, f"eps must be numbers, got {value!r}")
        try:
            out.append(check_eps(value, norm))
        except (TypeError, ValueError) as error:
            fail(path, key, str(error))
        if norm is Norm.L2 and diameter is not None and value > diameter:
            fail(path, key, f"L2 eps={value:g} exceeds {diameter:g}, the largest L2 distance between two inputs of "
                             "this data set (every pixel from 0 to 1); eps is in [0, 1] input units")
    if len(set(out)) != len(out):
        fail(path, key, f"repeats an eps: {values!r}")
    return tuple(sorted(out))
