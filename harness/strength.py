"""Strength per cost: a benchmark's own worst-case cascade against AutoAttack on defenses and threat models.

On the benchmark's evaluation images and one (norm, eps), `compare` runs
- **ours**: the benchmark's columns at that (norm, eps), exactly as the matrix runs them (same cells, seeds,
  cascade and early stop), their worst case per example;
- each **contender** (by default AutoAttack's standard set at its original budgets: the original code where
  `pyautoattack` is installed, and torchattacks' parts composed the same way) on the examples the model
  classifies correctly, which is AutoAttack's own protocol;
and records robust accuracy, model evaluations (the clean pass included for every row) and wall time.
`python -m harness strength-per-cost` writes the JSON; `python -m harness attack-cost` renders it.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from defenses.checkpoints import weights_digest
from harness.data import Dataset, load_dataset
from harness.cells import _cell
from harness.evaluation import CellOutcome, CellRunner, evaluate_cell
from harness.planning import plan
from harness.preparation import prepare_defenses
from harness.provenance import code_commit, library_versions
from harness.spec import AttackSpec, BenchmarkSpec
from harness.threat import Norm

# (label, attack id, options) per norm: what the comparison runs against our cascade by default. The original
# AutoAttack is the reference where it is installed; torchattacks' parts at the same budgets are the second row.
PORT = {
    Norm.LINF: ("AutoAttack standard, torchattacks' parts at the original budgets", "autoattack-standard", ()),
    Norm.L2: ("AutoAttack standard, torchattacks' parts at the original budgets", "autoattack-standard-l2", ()),
}
ORIGINAL = {
    Norm.LINF: ("AutoAttack standard, original code (pyautoattack)", "aa-standard", ()),
    Norm.L2: ("AutoAttack standard, original code (pyautoattack)", "aa-standard-l2", ()),
}
# The cases attack-cost.md compares by default: (defense, norm, eps). The six, then the L2 cells where
# AutoAttack was 2-4 examples ahead of the chain before its last three L2 columns (natural, ls-gn, lsq-gn, fgsm-at,
# step-ll-at) and TRADES, whose L2 column leans on S-O; then the L2 defenses no column was tuned on (fgsm-at-full, gn,
# step-rnd-at) and the board's other L-inf eps, where the top target alone left ls-gn 4 examples above AutoAttack;
# trades' seed replicas; last the planted masked model at each threat, where only Square breaks anything.
CASES = (("pgd-at", Norm.LINF, 0.3), ("trades", Norm.LINF, 0.3), ("ls-gn", Norm.LINF, 0.3), ("fgsm-at-full", Norm.LINF, 0.3),
         ("pgd-at", Norm.L2, 2.0), ("pgd-at-l2", Norm.L2, 2.0), ("natural", Norm.L2, 2.0), ("ls-gn", Norm.L2, 2.0),
         ("lsq-gn", Norm.L2, 2.0), ("fgsm-at", Norm.L2, 2.0), ("step-ll-at", Norm.L2, 2.0), ("trades", Norm.L2, 2.0),
         ("fgsm-at-full", Norm.L2, 2.0), ("gn", Norm.L2, 2.0), ("step-rnd-at", Norm.L2, 2.0), ("natural", Norm.LINF, 0.1),
         ("ls-gn", Norm.LINF, 0.1), ("gn", Norm.LINF, 0.1), ("step-ll-at", Norm.LINF, 0.1), ("lsq-gn", Norm.LINF, 0.1),
         ("step-rnd-at", Norm.LINF, 0.1), ("fgsm-at", Norm.LINF, 0.1), ("trades", Norm.LINF, 0.1),
         ("fgsm-at-full", Norm.LINF, 0.1), ("pgd-at-l2", Norm.LINF, 0.1), ("pgd-at", Norm.LINF, 0.1),
         ("trades@seed1", Norm.LINF, 0.3), ("trades@seed2", Norm.LINF, 0.3),
         ("binarized", Norm.L2, 2.0), ("binarized", Norm.LINF, 0.3), ("binarized", Norm.LINF, 0.1))


def default_contenders(norm: Norm) -> tuple:
    from attacks_ext.autoattack_standard import original_autoattack_installed

    return ((ORIGINAL[norm],) if original_autoattack_installed() else ()) + (PORT[norm],)


OURS = "ours: the benchmark's worst-case cascade"


def compare(spec: BenchmarkSpec, *, defense: str, norm: Norm, eps: float, cache_dir: Path, device: torch.device,
            contenders: tuple | None = None, progress: bool = True, data: Dataset | None = None,
            reuse: list[dict] = ()) -> dict:
    """Run our cascade and every contender on `defense` at (norm, eps); the comparison as a JSON-ready dict.

    A contender row of an earlier comparison in `reuse` is taken instead of rerunning the contender when it
    attacked the same checkpoint, examples and (norm, eps) with the same attack, options, seed, device and
    library versions (see `reusable_row`): AutoAttack's result does not depend on our cascade, and it is the
    expensive half of a comparison. The row keeps its own date and commit under "reused_from"."""
    # Long by design: ours and each contender are timed and counted the same way, side by side in one function.
    data = data if data is not None else load_dataset(spec.dataset, **dict(spec.dataset_options))
    names = [d.name for d in spec.defenses + spec.replicas]  # a training-seed replica's worst case is on the board too
    if defense not in names:
        raise ValueError(f"defense {defense!r} is not in {spec.path}; its defenses: {', '.join(names)}")
    if defense in {d.name for d in spec.replicas} and (norm, eps) != spec.rank_by:
        raise ValueError(f"{defense!r} is a training-seed replica: it runs only the rank-by threat "
                         f"({spec.rank_by[0].value} eps {spec.rank_by[1]:g}), not {norm.value} eps {eps:g}")
    chain = [cell for cell in plan(spec, data) if cell.defense == defense and cell.check is None
             and (cell.attack is None or (cell.attack.norm is norm and cell.eps == eps))]
    clean, columns = chain[0], chain[1:]
    if not columns:
        grid = sorted({(a.norm.value, e) for a in spec.attacks for e in a.eps})
        raise ValueError(f"{spec.path} has no column at {norm.value} eps {eps:g}; its grid: {grid}")
    needed = dict.fromkeys(n for cell in chain for n in cell.models)
    prepared = prepare_defenses(spec, needed, data, cache_dir=cache_dir, device=device, progress=progress)
    done: dict[str, CellOutcome] = {}
    runner = CellRunner(spec, data, prepared, device, finished=lambda keys: {k: done[k] for k in keys if k in done})
    for name in needed:
        runner.model(name)  # loaded before the clock starts

    started = time.perf_counter()
    for cell in chain:
        done[cell.key] = runner(cell)
    ours_seconds = time.perf_counter() - started
    clean_correct = done[clean.key].clean_correct
    ours = np.logical_and.reduce([done[cell.key].robust_correct for cell in chain])
    rows = [_row(OURS, "+".join(dict.fromkeys(c.attack.label for c in columns)), ours, ours_seconds,
                 sum(done[c.key].forward_evals for c in chain), sum(done[c.key].gradient_evals for c in chain))]
    rows[0]["columns"] = _by_column(chain, done)

    model = runner.model(defense)
    weights = weights_digest(prepared[defense].weights)
    for label, attack_id, options in contenders if contenders is not None else default_contenders(norm):
        attack = AttackSpec(label, attack_id, tuple(sorted(options)), norm, (eps,))
        if attack.build().norm is not norm:
            raise ValueError(f"contender {attack_id!r} is not a {norm.value} attack")
        identity = {"weights": weights, "norm": norm.value, "eps": eps, "examples": int(len(clean_correct)),
                    "seed": spec.seed, "device": str(device), "threads": torch.get_num_threads(),
                    "versions": library_versions()}
        earlier = reusable_row(reuse, identity, attack_id, attack.options)
        if earlier is not None:
            rows.append(earlier)
            continue
        cell = _cell(spec, data, defense, clean.defense_key, attack, eps)
        started = time.perf_counter()
        outcome = evaluate_cell(cell, model, runner.x, runner.y, batch_size=spec.batch_size, device=device,
                                attacked=clean_correct)
        seconds = time.perf_counter() - started
        # The clean pass that chose the attacked examples is part of the contender's cost, as it is of ours.
        rows.append(_row(label, attack_id, outcome.robust_correct, seconds + done[clean.key].seconds,
                         outcome.forward_evals + done[clean.key].forward_evals, outcome.gradient_evals, attack.options))
    for row in rows:
        vector = np.asarray(row["robust_vector"], dtype=bool)
        row["broken_only_by_this"] = int((~vector & ours).sum()) if row["label"] != OURS else None
        row["missed_by_this"] = int((vector & ~ours).sum()) if row["label"] != OURS else None
    return {
        "benchmark": spec.name, "spec": str(spec.path), "defense": defense, "defense_key": clean.defense_key,
        "weights": weights, "threads": torch.get_num_threads(),
        "norm": norm.value, "eps": eps, "examples": int(len(ours)), "clean": 100 * float(clean_correct.mean()),
        "ours_columns": [c.attack.label for c in columns], "device": str(device), "versions": library_versions(),
        "commit": code_commit(), "seed": spec.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
    }


def _by_column(chain: list, done: dict[str, CellOutcome]) -> list[dict]:
    """Where ours spends, in the order the chain runs: each column's model evaluations and the examples it broke
    that no column before it had (the clean pass first, as "clean", breaking none)."""
    columns, standing = [], done[chain[0].key].clean_correct.copy()
    for cell in chain:
        outcome = done[cell.key]
        broken = standing & ~outcome.robust_correct
        standing &= outcome.robust_correct
        columns.append({"label": "clean" if cell.attack is None else cell.attack.label,
                        "forward_evals": int(outcome.forward_evals), "gradient_evals": int(outcome.gradient_evals),
                        "broken_first": int(broken.sum())})
    return columns


def reusable_row(reuse: list[dict], identity: dict, attack_id: str, options: tuple) -> dict | None:
    """The contender row of an earlier comparison with this identity (the model's weights, norm, eps, examples,
    seed, device, torch's threads, library versions), attack and options, marked as reused; None when there is none. The weights'
    digest, not the checkpoint key: a code change that re-keys every checkpoint but trains the same bits leaves
    AutoAttack's result as it was."""
    wanted = [list(option) for option in options]
    for comparison in reuse:
        if any(comparison.get(field) != value for field, value in identity.items()):
            continue
        for row in comparison["rows"]:
            if row["label"] != OURS and row["attack"] == attack_id and row.get("options") == wanted:
                source = row.get("reused_from") or {"date": comparison["date"], "commit": comparison["commit"]}
                return {**row, "reused_from": source}
    return None


def compare_cases(spec: BenchmarkSpec, cases, *, path: Path | None = None, reuse: list[dict] = (), **options) -> dict:
    """`compare` for each (defense, norm, eps) of `cases`, in one result: {"comparisons": [...]}.

    With `path`, the JSON there is a store that the run adds to: its comparisons are kept (several benchmarks'
    comparisons share one page), a comparison of the same benchmark, defense and threat is replaced in place, its
    contender rows are reused where they still match (`reusable_row`), and the file is rewritten after every
    comparison. AutoAttack's rows take hours on a CPU: an interrupted run keeps what it finished, and a rerun after a
    change to our columns recomputes only ours."""
    stored = load(path) if path is not None and Path(path).is_file() else []
    reuse = [*reuse, *stored]
    for defense, norm, eps in cases:
        comparison = compare(spec, defense=defense, norm=norm, eps=eps, reuse=reuse, **options)
        index = next((i for i, earlier in enumerate(stored) if case_of(earlier) == case_of(comparison)), len(stored))
        stored[index:index + 1] = [comparison]  # replaces the same case in place, or appends
        if path is not None:
            write({"comparisons": stored}, path)
    return {"comparisons": stored}


def case_of(comparison: dict) -> tuple:
    """What a comparison compares: (benchmark, defense, norm, eps)."""
    return comparison.get("benchmark"), comparison["defense"], comparison["norm"], comparison["eps"]


def _row(label: str, attack: str, robust: np.ndarray, seconds: float, forward: int, gradient: int,
         options: tuple = ()) -> dict:
    return {"label": label, "attack": attack, "options": [list(option) for option in options],
            "robust": 100 * float(robust.mean()), "seconds": seconds, "forward_evals": int(forward),
            "gradient_evals": int(gradient), "robust_vector": [bool(v) for v in robust]}


def write(result: dict, path: Path) -> Path:
    """Whole or not at all: the file is a store of hours of AutoAttack runs, and an interrupted write must not
    truncate it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)
    return path


def load(path: Path) -> list[dict]:
    """The comparisons in a strength-per-cost JSON (one, or several under "comparisons")."""
    try:
        result = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a strength-per-cost result (not JSON: {error})") from None
    comparisons = result.get("comparisons", [result]) if isinstance(result, dict) else []
    for comparison in comparisons or [{}]:
        missing = {"defense", "norm", "eps", "examples", "rows"} - set(comparison)
        if missing:
            raise ValueError(f"{path}: not a strength-per-cost result (missing {', '.join(sorted(missing))})")
    return comparisons
