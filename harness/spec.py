"""Benchmark specs: a TOML matrix loaded into frozen, validated objects.

Every error names the file and the TOML key that is wrong, and what is allowed there.

    [benchmark]   name, dataset, dataset_options, seed, eval_examples, batch_size, rank_by, cascade, eot_samples,
                  training_seeds, threads (torch's CPU threads per process: part of every checkpoint key)
    [eps]         linf = [...], l2 = [...]            the eps grid per norm, in [0, 1] input units
    [defenses.ID] recipe = "<DEFENSES id>" + recipe options        (trained in-house)
                  or factory = "pkg.module:function", weights = "file.safetensors", options = {...};
                  optional seed = s (this model's training seed), row = false (a [transfer] model only: no row)
    [attacks.ID]  attack = "<ATTACKS id>" + the attack's options, optional eps = [...] (a subset of the grid),
                  optional source = "<defense>" (a transfer column: crafted on that defense's model),
                  optional standalone = true (in a cascade, runs on every example: the attack's own accuracy),
                  optional restart = k (k > 0: the same attack from new random draws; 0, the default, is the first)
    [checks.ID]   a sanity check by its CHECKS id + the check's options (`python -m harness list checks`)
    [label_leak]  pairs = [["<true-label column>", "<label-free twin column>"], ...], perturbation_probe = true,
                  robust_features = { source = "<defense>", ... } (Ilyas et al.'s D_rand / D_det, Goh's bound)
    [findings]    dead_units = true (the findings board; Shafahi et al.'s dead feature units)
    [transfer]    models = [...], attacks = [...], eps = [...], optional sweep = [...] (Kurakin et al.'s transfer
                  matrices: each attack crafted once on each model, classified by every model)
"""
from __future__ import annotations

import inspect
import math
import tomllib
from pathlib import Path

from defenses.recipes import build_recipe
from harness.registry import ATTACKS, CHECKS, DATASETS
from harness.spec_types import (AttackSpec, BenchmarkSpec, CheckSpec, DefenseSpec, ExternalModel,  # noqa: F401
                                _context)
from harness.spec_errors import SpecError, check_keys, check_options, eps_list, fail, positive_int  # noqa: F401
from harness.spec_sections import load_findings, load_label_leak, load_robust_features, load_transfer
from harness.threat import Norm

BENCHMARK_KEYS = {"name", "dataset", "dataset_options", "seed", "eval_examples", "batch_size", "rank_by", "cascade",
                  "eot_samples", "training_seeds", "threads"}
EXTERNAL_KEYS = {"factory", "weights", "options"}



def _load_defense(path, name: str, table: dict) -> DefenseSpec:
    key = f"defenses.{name}"
    if not isinstance(table, dict):
        fail(path, key, "must be a table")
    if not isinstance(table.get("row", True), bool):
        fail(path, f"{key}.row", f"must be true or false, got {table['row']!r}")
    table = {k: v for k, v in table.items() if k != "row"}  # read by `load`: false trains a model for [transfer] only
    if "recipe" in table and "factory" in table:
        fail(path, key, "give either recipe (trained here) or factory + weights (external model), not both")
    if "factory" in table or "weights" in table:
        check_keys(path, key, table, EXTERNAL_KEYS, required={"factory", "weights"})
        factory = table["factory"]
        if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
            fail(path, f"{key}.factory", f"must look like 'package.module:function', got {factory!r}")
        weights = Path(table["weights"]).expanduser()
        if not weights.is_absolute():
            weights = (Path(path).parent / weights).resolve()
        if weights.suffix != ".safetensors":
            fail(path, f"{key}.weights", f"must be a .safetensors file (the harness never unpickles), got {weights.name!r}; "
                                          f"convert a .pt/.pth state dict with `python -m harness convert-weights "
                                          f"{weights.name} {weights.stem}.safetensors --factory {factory}`")
        options = table.get("options", {})
        if not isinstance(options, dict):
            fail(path, f"{key}.options", "must be a table of keyword arguments for the factory")
        return DefenseSpec(name, external=ExternalModel(factory, weights, tuple(sorted(options.items()))))
    if "recipe" not in table:
        fail(path, key, "needs recipe = '<recipe id>' or factory + weights for an external model")
    seed = table.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        fail(path, f"{key}.seed", f"must be an integer >= 0 (this model's training seed), got {seed!r}")
    overrides = {k: v for k, v in table.items() if k not in ("recipe", "training_seeds", "seed")}
    try:
        recipe = build_recipe(table["recipe"], **overrides)
    except (KeyError, ValueError, TypeError) as error:
        fail(path, key, str(error))
    return DefenseSpec(name, recipe=recipe, seed=seed)


def _training_seeds(path, key: str, value, seed: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value):
        fail(path, key, f"must be a non-empty list of integers >= 0, e.g. [0, 1, 2]; got {value!r}")
    if len(set(value)) != len(value):
        fail(path, key, f"lists a seed twice: {value!r}")
    if seed not in value:
        fail(path, key, f"must include the benchmark's seed {seed} (the row's own model); got {value!r}")
    return tuple(value)


def _replicas(path, raw_defenses: dict, defenses: tuple[DefenseSpec, ...], seeds, seed: int) -> tuple[DefenseSpec, ...]:
    """`<name>@seed<s>` for every trained defense and every listed seed but the benchmark's: [benchmark]
    training_seeds applies to every trained defense, a defense's own training_seeds overrides it."""
    default = () if seeds is None else _training_seeds(path, "benchmark.training_seeds", seeds, seed)
    replicas = []
    for defense in defenses:
        own = raw_defenses[defense.name].get("training_seeds")
        listed = default if own is None else _training_seeds(path, f"defenses.{defense.name}.training_seeds", own, seed)
        if defense.recipe is None:  # an external model has no training seed (its table rejects the key)
            continue
        replicas += [DefenseSpec(f"{defense.name}@seed{s}", recipe=defense.recipe, seed=s, replica_of=defense.name)
                     for s in listed if s != seed]
    return tuple(replicas)


def _check_seeds(path, raw_defenses: dict, defenses: tuple[DefenseSpec, ...], rows: set[str], benchmark_seeds) -> None:
    """A defense's own `seed` fixes one model; `training_seeds` trains replicas of a row at several: not both, and
    no replicas for a model without a row ([benchmark] training_seeds applies to the rows only)."""
    for defense in defenses:
        table = raw_defenses[defense.name]
        seeds = table.get("training_seeds", benchmark_seeds if defense.name in rows else None)
        if defense.seed is not None and seeds is not None:
            fail(path, f"defenses.{defense.name}.seed", "seed trains this one model at one seed, training_seeds (here "
                                                         "or in [benchmark]) trains replicas at several: give one")
        if defense.name not in rows and "training_seeds" in table:
            fail(path, f"defenses.{defense.name}.training_seeds",
                 "replicas belong to a row; this defense has row = false")


def _check_ensemble_sources(path, defenses: tuple[DefenseSpec, ...]) -> None:
    """Ensemble sources must be other trained defenses of the same benchmark, with no cycle."""
    trained = {d.name: d for d in defenses if d.recipe is not None}
    for defense in trained.values():
        for source in defense.recipe.ensemble_sources:
            if source == defense.name or source not in trained:
                fail(path, f"defenses.{defense.name}.ensemble_sources",
                      f"source {source!r} is not another trained defense of this benchmark; "
                      f"trained defenses: {', '.join(n for n in trained if n != defense.name) or '(none)'}")

    def visit(name: str, trail: tuple[str, ...]):
        if name in trail:
            fail(path, f"defenses.{name}.ensemble_sources", f"sources form a cycle: {' -> '.join(trail + (name,))}")
        for source in trained[name].recipe.ensemble_sources:
            visit(source, trail + (name,))

    for name in trained:
        visit(name, ())


def _load_attack(path, label: str, table: dict, grid: dict[Norm, tuple[float, ...]],
                 defenses: tuple[DefenseSpec, ...] = ()) -> AttackSpec:
    key = f"attacks.{label}"
    if not isinstance(table, dict) or "attack" not in table:
        fail(path, key, "needs attack = '<attack id>' (see `python -m harness list attacks`)")
    attack_id = table["attack"]
    try:
        factory = ATTACKS.get(attack_id)
    except KeyError as error:
        fail(path, f"{key}.attack", str(error))
    options = {k: v for k, v in table.items() if k not in ("attack", "eps", "source", "standalone", "restart")}
    standalone = table.get("standalone", False)
    if not isinstance(standalone, bool):
        fail(path, f"{key}.standalone", f"must be true or false, got {standalone!r}")
    restart = table.get("restart", 0)
    if not isinstance(restart, int) or isinstance(restart, bool) or restart < 0:
        fail(path, f"{key}.restart", f"must be a non-negative integer (0 = the first draw), got {restart!r}")
    check_options(path, key, attack_id, factory, options)
    try:
        factory(**options)  # built once so the attack checks its own options here, with the key in the message
    except (TypeError, ValueError) as error:
        fail(path, key, str(error))
    source = table.get("source")
    if source is not None:
        names = [d.name for d in defenses]
        if source not in names:
            fail(path, f"{key}.source", f"{source!r} is not a defense of this benchmark; defenses: {', '.join(names)}")
        family = ATTACKS.info(attack_id)["family"].value
        if family not in ("one-step", "iterative"):
            fail(path, f"{key}.source", f"{attack_id} is {family}; a transfer attack needs the source's gradients")
    norm = ATTACKS.info(attack_id)["norm"]
    if norm not in grid:
        fail(path, key, f"{attack_id} is a {norm.value} attack but [eps] has no {norm.value} grid")
    eps = eps_list(path, f"{key}.eps", table["eps"], norm) if "eps" in table else grid[norm]
    off_grid = [e for e in eps if e not in grid[norm]]
    if off_grid:
        fail(path, f"{key}.eps", f"{', '.join(f'{e:g}' for e in off_grid)} not on the [eps] {norm.value} grid "
                                  f"({', '.join(f'{e:g}' for e in grid[norm])}): a column's eps must be a subset of it")
    return AttackSpec(label, attack_id, tuple(sorted(options.items())), norm, eps, source, standalone, restart)


def _load_checks(path, table: dict, context) -> tuple[CheckSpec, ...]:
    """[checks.<check id>] tables, each holding that check's options."""
    if not isinstance(table, dict):
        fail(path, "checks", "must hold one [checks.<check id>] table per check")
    out = []
    for check_id, options in table.items():
        key = f"checks.{check_id}"
        try:
            factory = CHECKS.get(check_id)
        except KeyError as error:
            fail(path, key, str(error))
        if not isinstance(options, dict):
            fail(path, key, "must be a table of the check's options (it may be empty)")
        check_options(path, key, check_id, factory, options)
        try:
            check = factory(**options)
            requests = check.requests(context)
        except (KeyError, TypeError, ValueError) as error:
            fail(path, key, str(error))
        for request in requests:
            if request.examples > context.eval_examples:
                fail(path, key, f"asks for {request.examples} examples but [benchmark.eval_examples] is "
                                 f"{context.eval_examples}; lower its examples option")
        out.append(CheckSpec(check_id, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))))
    return tuple(out)


def load(path: str | Path) -> BenchmarkSpec:
    """Parse and validate a benchmark TOML file."""
    # Long by design: the TOML's tables validated in file order, each error naming its key.
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such benchmark file") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None
    check_keys(path, "top level", raw, {"benchmark", "eps", "defenses", "attacks", "label_leak", "checks", "findings",
                                        "transfer"},
                required={"benchmark", "eps", "defenses", "attacks"})
    bench = raw["benchmark"]
    check_keys(path, "benchmark", bench, BENCHMARK_KEYS, required={"dataset"})
    dataset = bench["dataset"]
    if dataset not in DATASETS:
        fail(path, "benchmark.dataset", f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    dataset_options = bench.get("dataset_options", {})
    if not isinstance(dataset_options, dict):
        fail(path, "benchmark.dataset_options", "must be a table")
    allowed_options = set(inspect.signature(DATASETS.get(dataset)).parameters)
    unknown = sorted(set(dataset_options) - allowed_options)
    if unknown:
        fail(path, "benchmark.dataset_options", f"unknown option {', '.join(map(repr, unknown))} for {dataset}; allowed: {', '.join(sorted(allowed_options)) or '(none)'}")
    seed = bench.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        fail(path, "benchmark.seed", f"must be an integer >= 0, got {seed!r}")

    eps_table = raw["eps"]
    check_keys(path, "eps", eps_table, {n.value for n in Norm})
    diameter = math.sqrt(math.prod(DATASETS.info(dataset)["input_shape"]))
    grid = {Norm(name): eps_list(path, f"eps.{name}", values, Norm(name), diameter) for name, values in eps_table.items()}
    if not grid:
        fail(path, "eps", "needs at least one grid, e.g. linf = [0.1, 0.3]")

    if not isinstance(raw["defenses"], dict) or not raw["defenses"]:
        fail(path, "defenses", "needs at least one [defenses.NAME] table")
    loaded = tuple(_load_defense(path, name, table) for name, table in raw["defenses"].items())
    _check_ensemble_sources(path, loaded)
    rows = {name for name, table in raw["defenses"].items() if table.get("row", True)}
    defenses = tuple(d for d in loaded if d.name in rows)
    extra_models = tuple(d for d in loaded if d not in defenses)
    if not defenses:
        fail(path, "defenses", "every defense has row = false; a board needs at least one row")
    _check_seeds(path, raw["defenses"], loaded, rows, bench.get("training_seeds"))
    replicas = _replicas(path, raw["defenses"], defenses, bench.get("training_seeds"), seed)
    transfer = None if "transfer" not in raw else load_transfer(path, raw["transfer"], loaded, diameter)
    for model in extra_models:
        if transfer is None or model.name not in transfer.models:
            fail(path, f"defenses.{model.name}.row", "row = false trains a model for the [transfer] matrices only, "
                                                     "but [transfer] models does not name it")
    if not isinstance(raw["attacks"], dict) or not raw["attacks"]:
        fail(path, "attacks", "needs at least one [attacks.NAME] table")
    attacks = tuple(_load_attack(path, label, table, grid, defenses) for label, table in raw["attacks"].items())

    rank_norm, rank_eps = next(iter(grid.items()))[0], None
    if "rank_by" in bench:
        rank = bench["rank_by"]
        if not (isinstance(rank, list) and len(rank) == 2):
            fail(path, "benchmark.rank_by", f"must be [norm, eps], e.g. ['linf', 0.3]; got {rank!r}")
        try:
            rank_norm = Norm.parse(rank[0])
        except ValueError as error:
            fail(path, "benchmark.rank_by", str(error))
        rank_eps = rank[1]
        if rank_norm not in grid or rank_eps not in grid[rank_norm]:
            fail(path, "benchmark.rank_by", f"{rank!r} is not a point of the [eps] grid")
    if rank_eps is None:
        rank_eps = max(grid[rank_norm])

    label_leak_pairs = load_label_leak(path, raw.get("label_leak", {}), attacks)
    perturbation_probe = raw.get("label_leak", {}).get("perturbation_probe", False)
    robust_features = raw.get("label_leak", {}).get("robust_features")
    robust_features = () if robust_features is None else load_robust_features(path, robust_features, defenses)
    dead_units = load_findings(path, raw["findings"]) if "findings" in raw else False
    eval_examples = positive_int(path, "benchmark.eval_examples", bench.get("eval_examples", 1000))
    cascade = bench.get("cascade", False)
    if not isinstance(cascade, bool):
        fail(path, "benchmark.cascade", f"must be true or false, got {cascade!r}")
    checks = _load_checks(path, raw.get("checks", {}), _context(grid, (rank_norm, float(rank_eps)), eval_examples,
                                                                defenses, attacks, cascade))

    return BenchmarkSpec(
        label_leak_pairs=label_leak_pairs, checks=checks, cascade=cascade, perturbation_probe=perturbation_probe,
        robust_features=robust_features, findings="findings" in raw, dead_units=dead_units,
        name=bench.get("name", path.stem), path=path, dataset=dataset,
        dataset_options=tuple(sorted(dataset_options.items())), seed=seed,
        eval_examples=eval_examples,
        batch_size=positive_int(path, "benchmark.batch_size", bench.get("batch_size", 250)),
        eot_samples=positive_int(path, "benchmark.eot_samples", bench.get("eot_samples", 8)),
        threads=None if "threads" not in bench else positive_int(path, "benchmark.threads", bench["threads"]),
        eps=tuple(grid.items()), defenses=defenses, attacks=attacks, rank_by=(rank_norm, float(rank_eps)),
        replicas=replicas, transfer=transfer, extra_models=extra_models,
    )
