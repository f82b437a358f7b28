"""leaderboards/attack-cost.md from pytest-benchmark's saved JSON (`tox -e bench`)."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import pandas as pd

from harness.reports.markdown import markdown_table
from harness.threat import Norm

REPO_ROOT = Path(__file__).resolve().parent.parent
# The inputs tests/bench times the floor's forward + backward at, as attack-cost.md names them.
FLOOR_INPUTS = {"clean": "clean digits (the floor)", "linf-ball": "a random point of the Linf 0.3 ball (PGD's start)",
                "gaussian": "x + N(0, 0.1^2) (S-O's draws)"}


def library_of(name: str) -> str:
    """The library that computes a registered attack: adapters name theirs; our own attacks name none."""
    from harness.registry import ATTACKS

    return ATTACKS.info(name)["library"]


def _library(info: dict) -> str | None:
    """The library behind a benchmarked attack: the registry's answer where the attack is registered, else
    what the benchmark recorded."""
    from harness.registry import ATTACKS

    name = info.get("attack")
    return library_of(name) if name not in (None, "floor") and name in ATTACKS else info.get("library")


def _shown(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (the header must not name a machine's folders)."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return Path(path).name


def load_benchmarks(path: Path) -> tuple[pd.DataFrame, dict]:
    """One row per benchmark: attack, batch, median seconds, evaluation counts; plus the machine info."""
    raw = json.loads(Path(path).read_text())
    rows = []
    for bench in raw.get("benchmarks", []):
        info = bench.get("extra_info", {})
        options = info.get("options") or {}
        budget = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
        rows.append({"attack": info.get("attack") + (f" ({budget})" if budget else ""), "batch": info.get("batch"),
                     "name": info.get("attack"), "bare": bool(info.get("bare")), "library": _library(info),
                     "family": info.get("family"), "median_s": bench["stats"]["median"],
                     "forward_evals": info.get("forward_evals"), "gradient_evals": info.get("gradient_evals"),
                     "floor_ratio": info.get("floor_ratio", float("nan")), "inputs": info.get("inputs", "clean"),
                     "adapter_ratio": info.get("adapter_ratio", float("nan")),
                     "clean_ratio": info.get("clean_ratio", float("nan"))})
    if not rows:
        raise ValueError(f"{path}: no benchmarks in it; run `tox -e bench` first")
    return pd.DataFrame(rows), raw.get("machine_info", {})


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Time per 1,000 examples, model evaluations per example and the ratio to the floor, per attack and batch."""
    attacks = frame[(frame.attack != "floor") & ~frame.bare].copy()
    if attacks.empty or not (frame.attack == "floor").any():
        raise ValueError("the benchmark JSON lacks the floor or the attacks; run the whole tests/bench suite")
    attacks["ms per 1k examples"] = 1e6 * attacks.median_s / attacks.batch
    attacks["fwd / example"] = attacks.forward_evals / attacks.batch
    attacks["grad / example"] = attacks.gradient_evals / attacks.batch
    # Measured by the benchmark itself, round by round against k forward+backward passes (tests/bench).
    attacks = attacks.rename(columns={"floor_ratio": "floor ratio"})
    table = attacks.pivot_table(index=["family", "attack", "library"], columns="batch",
                                values=["ms per 1k examples", "floor ratio"], aggfunc="first")
    table.columns = [f"{value} (batch {batch})" for value, batch in table.columns]
    counts = attacks[attacks.batch == attacks.batch.max()].set_index(["family", "attack", "library"])[["fwd / example", "grad / example"]]
    table = table.join(counts).reset_index()
    ordered = ["family", "attack", "library", "fwd / example", "grad / example"]
    ordered += [c for c in table.columns if c.startswith("floor ratio")] + [c for c in table.columns if c.startswith("ms per")]
    return table[ordered].sort_values(["family", "attack"]).reset_index(drop=True)


def floor_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per batch, the forward + backward medians (ms) at each input, and each non-clean input's paired ratio to
    the clean digits where the benchmark measured it."""
    floors = frame[frame.attack == "floor"]
    order = [inputs for inputs in FLOOR_INPUTS if inputs in set(floors.inputs)]
    table = pd.DataFrame({"batch": sorted(floors.batch.unique())})
    for inputs in order:
        rows = floors[floors.inputs == inputs].set_index("batch")
        table[FLOOR_INPUTS[inputs]] = [1e3 * rows.median_s.get(batch, float("nan")) for batch in table.batch]
        if inputs != "clean" and rows.clean_ratio.notna().any():
            table[f"{inputs} x clean"] = [rows.clean_ratio.get(batch, float("nan")) for batch in table.batch]
    return table


def overhead_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per adapter with a bare-call benchmark: its time over the library's own call, per batch."""
    bare = frame[frame.bare]
    if bare.empty:
        return pd.DataFrame()
    table = bare.pivot_table(index=["name", "library"], columns="batch", values="adapter_ratio", aggfunc="first")
    table.columns = [f"adapter / library call (batch {batch})" for batch in table.columns]
    return table.reset_index().rename(columns={"name": "attack"})


def _evaluations(row: dict) -> int:
    return row["forward_evals"] + row["gradient_evals"]


def _reference(rows: list[dict]) -> dict | None:
    """AutoAttack's row: the original code where it ran, else torchattacks' parts at the original budgets."""
    return next((row for prefix in ("aa-standard", "autoattack-standard") for row in rows
                 if row["attack"].startswith(prefix)), None)


def _ours(result: dict) -> dict:
    from harness.strength import OURS

    return next(row for row in result["rows"] if row["label"] == OURS)


def _threat(result: dict) -> str:
    return f"{Norm.parse(result['norm']).symbol} {result['eps']:g}"


def _gradients_failed(result: dict) -> bool:
    """A column that takes no gradient of the defended model (Square) broke examples that every gradient column
    before it had left: the signature of masked gradients, where ours pays the gradient-free column's full budget."""
    columns = _ours(result).get("columns", [])  # absent from comparisons recorded before the breakdown
    return any(column["gradient_evals"] == 0 and column["broken_first"] > 0 for column in columns)


def _share(rows: list[dict]) -> float:
    return sum(row["ours evals"] for row in rows) / max(sum(row["AA evals"] for row in rows), 1)


def strength_summary(comparisons: list[dict]) -> list[str]:
    """One row per compared (defense, threat): ours against AutoAttack, examples each broke that the other missed,
    model evaluations; then the totals against the targets."""
    rows, masked_flags, met = [], [], 0
    benchmarks = list(dict.fromkeys(result["benchmark"] for result in comparisons))
    for result in comparisons:
        ours, reference = _ours(result), _reference(result["rows"])
        if reference is None:
            continue
        gap = round((ours["robust"] - reference["robust"]) * result["examples"] / 100)
        met += gap <= 1
        port = next((row for row in result["rows"] if row["attack"].startswith("autoattack-standard")
                     and row is not reference), None)
        rows.append({
            "defense": result["defense"] + (f" ({result['benchmark']})" if len(benchmarks) > 1 else ""),
            "threat": _threat(result),
            "ours (%)": ours["robust"], "AutoAttack (%)": reference["robust"],
            "torchattacks port (%)": "-" if port is None else f"{port['robust']:.1f}",
            "ours − AA (examples)": gap, "AA broke, ours missed": reference["broken_only_by_this"],
            "ours broke, AA missed": reference["missed_by_this"],
            "ours evals": _evaluations(ours), "AA evals": _evaluations(reference),
            "ours / AA evals": _evaluations(ours) / max(_evaluations(reference), 1),
        })
        masked_flags.append(_gradients_failed(result))
    if not rows:
        return []
    ours_total, reference_total = sum(row["ours evals"] for row in rows), sum(row["AA evals"] for row in rows)
    ratio = ours_total / max(reference_total, 1)
    by_threat: dict[str, list[dict]] = {}  # in the order first seen
    for row in rows:
        by_threat.setdefault(row["threat"], []).append(row)
    masked = [row for row, flag in zip(rows, masked_flags) if flag]
    sound = [row for row, flag in zip(rows, masked_flags) if not flag]
    named = ", ".join(row["defense"] + " " + row["threat"] for row in masked)
    apart = [] if not masked or not sound else [
        f"Apart: on the {len(masked)} comparison{'s' if len(masked) > 1 else ''} where a column that takes no gradient "
        "of the model broke examples every gradient column had left (masked gradients, so ours pays Square's full "
        f"budget: {named}) ours spent **{_share(masked):.3f}** of AutoAttack's evaluations; on the other "
        f"{len(sound)}, **{_share(sound):.3f}**.", ""]
    commits = list(dict.fromkeys(result["commit"] for result in comparisons))
    dates = sorted(result["date"][:10] for result in comparisons)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return [
        STRENGTH_HEADING,
        "",
        f"Generated by `python -m harness strength-per-cost` ({', '.join(benchmarks)}, "
        f"{comparisons[0]['examples']} evaluation images, commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(commits)}, {span}). **ours** = the benchmark's own columns at that (norm, eps), run as the "
        "matrix runs them (cascade, per-example early stop), worst case per example. **AutoAttack** = its standard "
        "set at the original budgets (APGD-CE 100, APGD-T 9 x 100, FAB-T 9 x 100, Square 5,000) on the clean-correct "
        "examples, from the authors' code (pyautoattack) where installed; **torchattacks port** = the same set built "
        "from torchattacks' parts" + (" (a comparison that ran without it shows -)" if any(
            row["torchattacks port (%)"] == "-" for row in rows) else "") + ". Model evaluations = examples sent "
        "forward + input gradients, counted by one wrapper around the model for every row, the clean pass included.",
        "",
        markdown_table(pd.DataFrame(rows), digits=2),
        "",
        f"Ours is within one example of AutoAttack or stronger on **{met} of {len(rows)}** comparisons (target: all), "
        f"for **{ratio:.3f}** of its model evaluations in total ({ours_total:,} against {reference_total:,}; "
        f"target: at most 0.05, {'met' if ratio <= 0.05 else 'NOT met'}). The total depends on which threats are "
        "compared, since AutoAttack's Square spends 5,000 queries on every example that stays robust; by threat: "
        + "; ".join(f"{threat} {_share(same):.3f} "
                    f"({len(same)} comparison{'s' if len(same) > 1 else ''})" for threat, same in by_threat.items()) + ".",
        "",
        *apart,
        *spending_lines(comparisons),
    ]


def spending_lines(comparisons: list[dict]) -> list[str]:
    """Where ours spends, per threat and column: the column's model evaluations summed over the comparisons that
    run it, as a share of AutoAttack's evaluations on those same comparisons, and the examples it broke first."""
    totals: dict[str, dict[str, dict]] = {}  # threat -> column -> sums, each in the order first seen
    for result in comparisons:
        ours, reference = _ours(result), _reference(result["rows"])
        if reference is None or "columns" not in ours:  # a comparison from before the breakdown was recorded
            continue
        for column in ours["columns"]:
            entry = totals.setdefault(_threat(result), {}).setdefault(
                column["label"], {"comparisons": 0, "ours": 0, "AA": 0, "broken": 0})
            entry["comparisons"] += 1
            entry["ours"] += _evaluations(column)
            entry["AA"] += _evaluations(reference)
            entry["broken"] += column["broken_first"]
    if not totals:
        return []
    table = pd.DataFrame([{"threat": threat, "column": label, "comparisons": entry["comparisons"],
                           "its evals / AA evals": entry["ours"] / max(entry["AA"], 1),
                           "broken first (examples)": entry["broken"]}
                          for threat, columns in totals.items() for label, entry in columns.items()])
    return [
        "**Where ours spends**: each column of ours (in the order it runs; `clean` is the pass that picks the "
        "attacked examples) with its model evaluations summed over the comparisons that run it, as a share of "
        "AutoAttack's evaluations on those same comparisons, and the examples it broke that no column before it had.",
        "",
        markdown_table(table, digits=3),
        "",
    ]


def strength_section(result: dict) -> list[str]:
    """One comparison in full (every row) as markdown lines."""
    table = pd.DataFrame([{
        "attack": row["label"] + (f" (run {row['reused_from']['date'][:10]}, commit {row['reused_from']['commit']})"
                                  if row.get("reused_from") else ""),
        "robust (%)": row["robust"], "model evaluations": _evaluations(row),
        "per example": _evaluations(row) / result["examples"],
        "forward": row["forward_evals"], "gradient": row["gradient_evals"], "wall (s)": row["seconds"],
        "broke what ours missed": "-" if row.get("broken_only_by_this") is None else row["broken_only_by_this"],
        "missed what ours broke": "-" if row.get("missed_by_this") is None else row["missed_by_this"],
    } for row in result["rows"]])
    return [
        f"### `{result['defense']}`, {_threat(result)} ({result['benchmark']})",
        "",
        f"Clean {result['clean']:.1f}% on {result['examples']} images; ours = {', '.join(result['ours_columns'])}; "
        f"{result['device']}.",
        "",
        markdown_table(table, digits=1),
        "",
    ]


def render(path: Path, out: Path, *, command: str, strength: Path | None = None) -> Path:
    # Long by design: the attack-cost page's sections in reading order.
    frame, machine = load_benchmarks(path)
    table = cost_table(frame)
    floors = floor_table(frame)
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "unknown CPU"
    lines = [
        "# Attack cost",
        "",
        f"Generated by `{command}` from `{_shown(path)}`; {datetime.date.today().isoformat()}; {cpu}, "
        f"{machine.get('python_implementation', '')} {machine.get('python_version', '')}. Never edit by hand.",
        "",
        "Every registered attack on a fixed naturally trained small CNN and the first 1, 16 and 256 mnist5k test "
        "digits (Linf eps 0.3, L2 eps 2.0), at the registry's default budget unless the attack's name lists "
        "another. **floor ratio** = the attack's time / (input gradients per example x the time of one forward + "
        "backward of the same batch), the median over benchmark rounds of each round's ratio, with the "
        "forward + backward timed right before that round (a ratio of two medians taken minutes apart measured "
        "this machine's drift, up to a quarter): 1.0 means the attack costs exactly its gradient evaluations and "
        "nothing else. Model evaluations are exact counts from one call; times per 1k examples are medians of "
        "pytest-benchmark rounds on this machine.",
        "",
        "## Per attack",
        "",
        markdown_table(table, digits=2),
        "",
        "## The floor",
        "",
        "One forward + backward of the batch (ms, the median of its own benchmark): at the clean digits, the floor "
        "of every ratio above, and at the points attacks visit. These medians come from separate benchmarks and "
        "carry the machine's drift between them"
        + ("; **x clean** is the paired ratio (each round against the clean digits timed right before it), which "
           "does not." if any(column.endswith(" x clean") for column in floors.columns) else
           " (this run predates the paired comparison with the clean digits)."),
        "",
        markdown_table(floors, digits=3),
        "",
    ]
    overhead = overhead_table(frame)
    if not overhead.empty:
        lines += [
            "## Adapter overhead",
            "",
            "Time of the attack through our adapter over the time of the library's own call with the same settings "
            "on the same batch (`test_bare_library_call`: the call as a user would write it, each round right after "
            "one call through the adapter; the median over rounds of the pair's ratio). The "
            "adapter adds eval mode, RNG isolation, restoring the model's modes and parameter gradients, and for ART "
            "a classifier wrapper per call. Target: at most 1.10.",
            "",
            markdown_table(overhead, digits=2),
            "",
        ]
    if strength is not None and Path(strength).is_file():
        lines += strength_lines(strength)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "attack-cost.md"
    target.write_text("\n".join(lines))
    return target


STRENGTH_HEADING = "## Strength per cost against AutoAttack"


def strength_lines(strength: Path) -> list[str]:
    from harness.strength import load

    comparisons = load(strength)
    lines = strength_summary(comparisons)
    for result in comparisons:
        lines += strength_section(result)
    return lines


def render_strength(out: Path, strength: Path) -> Path:
    """Replace only the strength section of an existing attack-cost page (the timings are a separate, 30-minute
    measurement whose own header keeps its date): everything from the strength heading on is rewritten."""
    target = out / "attack-cost.md"
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist: render the whole page first (tox -e bench)")
    if not Path(strength).is_file():
        raise FileNotFoundError(f"no strength-per-cost JSON at {strength}")
    page = target.read_text()
    timings = page.split(STRENGTH_HEADING)[0].rstrip("\n")
    target.write_text("\n".join([timings, "", *strength_lines(strength)]))
    return target
