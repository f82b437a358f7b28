"""Benchmark specs: a TOML matrix loaded into frozen, validated objects.

Every error names the file and the TOML key that is wrong, and what is allowed there.

    [benchmark]   name, dataset, dataset_options, seed, eval_examples, batch_size, rank_by, cascade, eot_samples,
                  training_seeds, threads (torch's CPU threads per process: part of every checkpoint key)
    [eps]         linf = [...], l2 = [...]            the eps grid per norm, in [0, 1] input units
    [defenses.ID] recipe = "<DEFENSES id>" + recipe options        (trained in-house)
                  or factory = "pkg.module:function", weights = "file.safetensors", options = {...}
    [attacks.ID]  attack = "<ATTACKS id>" + the attack's options, optional eps = [...] (a subset of the grid),
                  optional source = "<defense>" (a transfer column: crafted on that defense's model),
                  optional standalone = true (in a cascade, runs on every example: the attack's own accuracy),
                  optional restart = k (k > 0: the same attack from new random draws; 0, the default, is the first)
    [checks.ID]   a sanity check by its CHECKS id + the check's options (`python -m harness list checks`)
    [label_leak]  pairs = [["<true-label column>", "<label-free twin column>"], ...], perturbation_probe = true,
                  robust_features = { source = "<defense>", ... } (Ilyas et al.'s D_rand / D_det, Goh's bound)
"""
from __future__ import annotations

import inspect
import math
import tomllib
from pathlib import Path

from defenses.recipes import build_recipe
from harness.registry import ATTACKS, CHECKS, DATASETS, MODELS, check_keywords
from harness.spec_types import (AttackSpec, BenchmarkSpec, CheckSpec, DefenseSpec, ExternalModel,  # noqa: F401
                                _context)
from harness.threat import Norm, check_eps


class SpecError(ValueError):
    """A benchmark file that cannot be run as written; the message names the key."""


def _fail(path: Path | str, key: str, message: str):
    raise SpecError(f"{path}: [{key}] {message}")


BENCHMARK_KEYS = {"name", "dataset", "dataset_options", "seed", "eval_examples", "batch_size", "rank_by", "cascade",
                  "eot_samples", "training_seeds", "threads"}
EXTERNAL_KEYS = {"factory", "weights", "options"}


def _check_keys(path, key: str, table: dict, allowed: set[str], required: set[str] = frozenset()):
    if not isinstance(table, dict):
        _fail(path, key, f"must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        _fail(path, key, f"unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(table))
    if missing:
        _fail(path, key, f"missing required key {', '.join(map(repr, missing))}")


def _check_options(path, key: str, entry_id: str, factory, options: dict) -> None:
    """Every option must be a keyword of the registered factory; the error lists the allowed ones."""
    try:
        check_keywords(factory, options, entry_id)
    except ValueError as error:
        _fail(path, key, str(error))


def _positive_int(path, key: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(path, key, f"must be a positive integer, got {value!r}")
    return value


def _eps_list(path, key: str, values, norm: Norm, diameter: float | None = None) -> tuple[float, ...]:
    """A sorted list of eps; at L2 none above `diameter`, the largest distance two inputs can be apart."""
    if not isinstance(values, list) or not values:
        _fail(path, key, f"must be a non-empty list of numbers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, key, f"eps must be numbers, got {value!r}")
        try:
            out.append(check_eps(value, norm))
        except (TypeError, ValueError) as error:
            _fail(path, key, str(error))
        if norm is Norm.L2 and diameter is not None and value > diameter:
            _fail(path, key, f"L2 eps={value:g} exceeds {diameter:g}, the largest L2 distance between two inputs of "
                             "this data set (every pixel from 0 to 1); eps is in [0, 1] input units")
    if len(set(out)) != len(out):
        _fail(path, key, f"repeats an eps: {values!r}")
    return tuple(sorted(out))


def _load_defense(path, name: str, table: dict) -> DefenseSpec:
    key = f"defenses.{name}"
    if not isinstance(table, dict):
        _fail(path, key, "must be a table")
    if "recipe" in table and "factory" in table:
        _fail(path, key, "give either recipe (trained here) or factory + weights (external model), not both")
    if "factory" in table or "weights" in table:
        _check_keys(path, key, table, EXTERNAL_KEYS, required={"factory", "weights"})
        factory = table["factory"]
        if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
            _fail(path, f"{key}.factory", f"must look like 'package.module:function', got {factory!r}")
        weights = Path(table["weights"]).expanduser()
        if not weights.is_absolute():
            weights = (Path(path).parent / weights).resolve()
        if weights.suffix != ".safetensors":
            _fail(path, f"{key}.weights", f"must be a .safetensors file (the harness never unpickles), got {weights.name!r}; "
                                          f"convert a .pt/.pth state dict with `python -m harness convert-weights "
                                          f"{weights.name} {weights.stem}.safetensors --factory {factory}`")
        options = table.get("options", {})
        if not isinstance(options, dict):
            _fail(path, f"{key}.options", "must be a table of keyword arguments for the factory")
        return DefenseSpec(name, external=ExternalModel(factory, weights, tuple(sorted(options.items()))))
    if "recipe" not in table:
        _fail(path, key, "needs recipe = '<recipe id>' or factory + weights for an external model")
    overrides = {k: v for k, v in table.items() if k not in ("recipe", "training_seeds")}
    try:
        recipe = build_recipe(table["recipe"], **overrides)
    except (KeyError, ValueError, TypeError) as error:
        _fail(path, key, str(error))
    return DefenseSpec(name, recipe=recipe)


def _training_seeds(path, key: str, value, seed: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value):
        _fail(path, key, f"must be a non-empty list of integers >= 0, e.g. [0, 1, 2]; got {value!r}")
    if len(set(value)) != len(value):
        _fail(path, key, f"lists a seed twice: {value!r}")
    if seed not in value:
        _fail(path, key, f"must include the benchmark's seed {seed} (the row's own model); got {value!r}")
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


def _check_ensemble_sources(path, defenses: tuple[DefenseSpec, ...]) -> None:
    """Ensemble sources must be other trained defenses of the same benchmark, with no cycle."""
    trained = {d.name: d for d in defenses if d.recipe is not None}
    for defense in trained.values():
        for source in defense.recipe.ensemble_sources:
            if source == defense.name or source not in trained:
                _fail(path, f"defenses.{defense.name}.ensemble_sources",
                      f"source {source!r} is not another trained defense of this benchmark; "
                      f"trained defenses: {', '.join(n for n in trained if n != defense.name) or '(none)'}")

    def visit(name: str, trail: tuple[str, ...]):
        if name in trail:
            _fail(path, f"defenses.{name}.ensemble_sources", f"sources form a cycle: {' -> '.join(trail + (name,))}")
        for source in trained[name].recipe.ensemble_sources:
            visit(source, trail + (name,))

    for name in trained:
        visit(name, ())


def _load_attack(path, label: str, table: dict, grid: dict[Norm, tuple[float, ...]],
                 defenses: tuple[DefenseSpec, ...] = ()) -> AttackSpec:
    key = f"attacks.{label}"
    if not isinstance(table, dict) or "attack" not in table:
        _fail(path, key, "needs attack = '<attack id>' (see `python -m harness list attacks`)")
    attack_id = table["attack"]
    try:
        factory = ATTACKS.get(attack_id)
    except KeyError as error:
        _fail(path, f"{key}.attack", str(error))
    options = {k: v for k, v in table.items() if k not in ("attack", "eps", "source", "standalone", "restart")}
    standalone = table.get("standalone", False)
    if not isinstance(standalone, bool):
        _fail(path, f"{key}.standalone", f"must be true or false, got {standalone!r}")
    restart = table.get("restart", 0)
    if not isinstance(restart, int) or isinstance(restart, bool) or restart < 0:
        _fail(path, f"{key}.restart", f"must be a non-negative integer (0 = the first draw), got {restart!r}")
    _check_options(path, key, attack_id, factory, options)
    try:
        factory(**options)  # built once so the attack checks its own options here, with the key in the message
    except (TypeError, ValueError) as error:
        _fail(path, key, str(error))
    source = table.get("source")
    if source is not None:
        names = [d.name for d in defenses]
        if source not in names:
            _fail(path, f"{key}.source", f"{source!r} is not a defense of this benchmark; defenses: {', '.join(names)}")
        family = ATTACKS.info(attack_id)["family"].value
        if family not in ("one-step", "iterative"):
            _fail(path, f"{key}.source", f"{attack_id} is {family}; a transfer attack needs the source's gradients")
    norm = ATTACKS.info(attack_id)["norm"]
    if norm not in grid:
        _fail(path, key, f"{attack_id} is a {norm.value} attack but [eps] has no {norm.value} grid")
    eps = _eps_list(path, f"{key}.eps", table["eps"], norm) if "eps" in table else grid[norm]
    off_grid = [e for e in eps if e not in grid[norm]]
    if off_grid:
        _fail(path, f"{key}.eps", f"{', '.join(f'{e:g}' for e in off_grid)} not on the [eps] {norm.value} grid "
                                  f"({', '.join(f'{e:g}' for e in grid[norm])}): a column's eps must be a subset of it")
    return AttackSpec(label, attack_id, tuple(sorted(options.items())), norm, eps, source, standalone, restart)


def _load_findings(path, table) -> bool:
    """[findings] dead_units = true|false: the findings board, and whether it measures dead penultimate units."""
    _check_keys(path, "findings", table, {"dead_units"})
    if not isinstance(table.get("dead_units", False), bool):
        _fail(path, "findings.dead_units", f"must be true or false, got {table['dead_units']!r}")
    return table.get("dead_units", False)


def _load_label_leak(path, table: dict, attacks: tuple[AttackSpec, ...]) -> tuple[tuple[str, str], ...]:
    """[label_leak] pairs = [["<true-label column>", "<label-free twin column>"], ...]"""
    _check_keys(path, "label_leak", table, {"pairs", "perturbation_probe", "robust_features"})
    if not isinstance(table.get("perturbation_probe", False), bool):
        _fail(path, "label_leak.perturbation_probe", f"must be true or false, got {table['perturbation_probe']!r}")
    pairs = table.get("pairs", [])
    by_label = {a.label: a for a in attacks}
    out = []
    for pair in pairs if isinstance(pairs, list) else [pairs]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            _fail(path, "label_leak.pairs", f"each pair is [true-label column, label-free column], got {pair!r}")
        for label in pair:
            if label not in by_label:
                _fail(path, "label_leak.pairs", f"{label!r} is not an [attacks] column; columns: {', '.join(by_label)}")
        true_label, free = (by_label[p] for p in pair)
        if not ATTACKS.info(true_label.attack_id)["uses_true_label"] or ATTACKS.info(free.attack_id)["uses_true_label"]:
            _fail(path, "label_leak.pairs", f"{pair!r}: the first attack must read the true label and the second must not")
        if true_label.norm is not free.norm or true_label.eps != free.eps:
            _fail(path, "label_leak.pairs", f"{pair!r}: the twins need the same norm and eps grid")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _load_robust_features(path, table, defenses: tuple[DefenseSpec, ...]) -> tuple[tuple[str, object], ...]:
    """[label_leak] robust_features = { source = "<defense>", <options of the robust-features probe> }"""
    from defenses.probes import robust_feature_settings

    key = "label_leak.robust_features"
    _check_keys(path, key, table, {"source"} | set(robust_feature_settings({})), required={"source"})
    names = [d.name for d in defenses]
    if table["source"] not in names:
        _fail(path, f"{key}.source", f"{table['source']!r} is not a defense of this benchmark; defenses: {', '.join(names)}")
    for name in ("train_examples", "steps", "epochs"):
        if name in table:
            _positive_int(path, f"{key}.{name}", table[name])
    for name, norm in (("eps", Norm.L2), ("radius", Norm.L2)):
        if name in table:
            try:
                check_eps(table[name], norm)
            except (TypeError, ValueError) as error:
                _fail(path, f"{key}.{name}", str(error))
    if "network" in table and table["network"] not in MODELS:
        _fail(path, f"{key}.network", f"unknown model {table['network']!r}; known: {', '.join(MODELS)}")
    return tuple(sorted(table.items()))


def _load_checks(path, table: dict, context) -> tuple[CheckSpec, ...]:
    """[checks.<check id>] tables, each holding that check's options."""
    if not isinstance(table, dict):
        _fail(path, "checks", "must hold one [checks.<check id>] table per check")
    out = []
    for check_id, options in table.items():
        key = f"checks.{check_id}"
        try:
            factory = CHECKS.get(check_id)
        except KeyError as error:
            _fail(path, key, str(error))
        if not isinstance(options, dict):
            _fail(path, key, "must be a table of the check's options (it may be empty)")
        _check_options(path, key, check_id, factory, options)
        try:
            check = factory(**options)
            requests = check.requests(context)
        except (KeyError, TypeError, ValueError) as error:
            _fail(path, key, str(error))
        for request in requests:
            if request.examples > context.eval_examples:
                _fail(path, key, f"asks for {request.examples} examples but [benchmark.eval_examples] is "
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
    _check_keys(path, "top level", raw, {"benchmark", "eps", "defenses", "attacks", "label_leak", "checks", "findings"},
                required={"benchmark", "eps", "defenses", "attacks"})
    bench = raw["benchmark"]
    _check_keys(path, "benchmark", bench, BENCHMARK_KEYS, required={"dataset"})
    dataset = bench["dataset"]
    if dataset not in DATASETS:
        _fail(path, "benchmark.dataset", f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    dataset_options = bench.get("dataset_options", {})
    if not isinstance(dataset_options, dict):
        _fail(path, "benchmark.dataset_options", "must be a table")
    allowed_options = set(inspect.signature(DATASETS.get(dataset)).parameters)
    unknown = sorted(set(dataset_options) - allowed_options)
    if unknown:
        _fail(path, "benchmark.dataset_options", f"unknown option {', '.join(map(repr, unknown))} for {dataset}; allowed: {', '.join(sorted(allowed_options)) or '(none)'}")
    seed = bench.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        _fail(path, "benchmark.seed", f"must be an integer >= 0, got {seed!r}")

    eps_table = raw["eps"]
    _check_keys(path, "eps", eps_table, {n.value for n in Norm})
    diameter = math.sqrt(math.prod(DATASETS.info(dataset)["input_shape"]))
    grid = {Norm(name): _eps_list(path, f"eps.{name}", values, Norm(name), diameter) for name, values in eps_table.items()}
    if not grid:
        _fail(path, "eps", "needs at least one grid, e.g. linf = [0.1, 0.3]")

    if not isinstance(raw["defenses"], dict) or not raw["defenses"]:
        _fail(path, "defenses", "needs at least one [defenses.NAME] table")
    defenses = tuple(_load_defense(path, name, table) for name, table in raw["defenses"].items())
    _check_ensemble_sources(path, defenses)
    replicas = _replicas(path, raw["defenses"], defenses, bench.get("training_seeds"), seed)
    if not isinstance(raw["attacks"], dict) or not raw["attacks"]:
        _fail(path, "attacks", "needs at least one [attacks.NAME] table")
    attacks = tuple(_load_attack(path, label, table, grid, defenses) for label, table in raw["attacks"].items())

    rank_norm, rank_eps = next(iter(grid.items()))[0], None
    if "rank_by" in bench:
        rank = bench["rank_by"]
        if not (isinstance(rank, list) and len(rank) == 2):
            _fail(path, "benchmark.rank_by", f"must be [norm, eps], e.g. ['linf', 0.3]; got {rank!r}")
        try:
            rank_norm = Norm.parse(rank[0])
        except ValueError as error:
            _fail(path, "benchmark.rank_by", str(error))
        rank_eps = rank[1]
        if rank_norm not in grid or rank_eps not in grid[rank_norm]:
            _fail(path, "benchmark.rank_by", f"{rank!r} is not a point of the [eps] grid")
    if rank_eps is None:
        rank_eps = max(grid[rank_norm])

    label_leak_pairs = _load_label_leak(path, raw.get("label_leak", {}), attacks)
    perturbation_probe = raw.get("label_leak", {}).get("perturbation_probe", False)
    robust_features = raw.get("label_leak", {}).get("robust_features")
    robust_features = () if robust_features is None else _load_robust_features(path, robust_features, defenses)
    dead_units = _load_findings(path, raw["findings"]) if "findings" in raw else False
    eval_examples = _positive_int(path, "benchmark.eval_examples", bench.get("eval_examples", 1000))
    cascade = bench.get("cascade", False)
    if not isinstance(cascade, bool):
        _fail(path, "benchmark.cascade", f"must be true or false, got {cascade!r}")
    checks = _load_checks(path, raw.get("checks", {}), _context(grid, (rank_norm, float(rank_eps)), eval_examples,
                                                                defenses, attacks, cascade))

    return BenchmarkSpec(
        label_leak_pairs=label_leak_pairs, checks=checks, cascade=cascade, perturbation_probe=perturbation_probe,
        robust_features=robust_features, findings="findings" in raw, dead_units=dead_units,
        name=bench.get("name", path.stem), path=path, dataset=dataset,
        dataset_options=tuple(sorted(dataset_options.items())), seed=seed,
        eval_examples=eval_examples,
        batch_size=_positive_int(path, "benchmark.batch_size", bench.get("batch_size", 250)),
        eot_samples=_positive_int(path, "benchmark.eot_samples", bench.get("eot_samples", 8)),
        threads=None if "threads" not in bench else _positive_int(path, "benchmark.threads", bench["threads"]),
        eps=tuple(grid.items()), defenses=defenses, attacks=attacks, rank_by=(rank_norm, float(rank_eps)),
        replicas=replicas,
    )
