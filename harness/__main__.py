"""Command line: `python -m harness run|report|check|list|attack-cost|strength-per-cost|power|scaling`."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = "benchmarks/mnist-quick.toml"
LISTS = ("attacks", "defenses", "models", "datasets", "checks", "probes")
STRENGTH_JSON = REPO_ROOT / "leaderboards" / "strength-per-cost.json"  # committed: AutoAttack's rows take hours


def default_home() -> Path:
    return Path(os.environ.get("HARNESS_HOME", REPO_ROOT / ".harness"))


def _parser() -> argparse.ArgumentParser:
    # Long by design: every subcommand's flags in one place, in the order `--help` lists them.
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run every missing cell of a benchmark, then render its leaderboard"),
                       ("report", "render the leaderboard from the results store (computes nothing)"),
                       ("check", "regenerate a leaderboard from scratch and compare it with the committed one")):
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"benchmark TOML (default {DEFAULT_SPEC})")
        command.add_argument("--home", type=Path, default=None,
                             help="folder for the results store and checkpoint cache (default $HARNESS_HOME or ./.harness)")
        command.add_argument("--out", type=Path, default=REPO_ROOT / "leaderboards", help="leaderboard folder")
        command.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name in ("run", "check"):
            command.add_argument("--executor", choices=("sequential", "ray"), default="sequential",
                                 help="where cells and training run: this process (default) or Ray tasks")
            command.add_argument("--ray-address", default=None, metavar="ADDRESS",
                                 help="with --executor ray: 'auto' or ray://host:port of an existing cluster "
                                      "(default: a local instance sized to this machine)")
            command.add_argument("--threads", type=int, default=None,
                                 help="torch threads per task (and Ray CPUs per task); part of every checkpoint key "
                                      "(default: the benchmark's [benchmark] threads, else torch's own count, "
                                      "1 per Ray task)")
            command.add_argument("--gpus-per-task", type=float, default=0.0,
                                 help="with --executor ray: GPUs per task, fractions share one (default 0)")
            command.add_argument("--max-in-flight", type=int, default=None,
                                 help="with --executor ray: tasks submitted at once (default 2 x CPUs / threads)")
        if name == "run":
            command.add_argument("--start-over", action="store_true",
                                 help="replace a results file that holds no store (emptied or foreign) with a new one")
        if name == "check":
            command.add_argument("--tolerance", type=float, default=1.0, help="allowed drift in percentage points")
    listing = sub.add_parser("list", help="list registered entries", description="list registered entries")
    listing.add_argument("what", choices=LISTS)
    cost = sub.add_parser("attack-cost", help="render leaderboards/attack-cost.md from `tox -e bench`'s JSON",
                          description="render leaderboards/attack-cost.md from pytest-benchmark's saved JSON")
    cost.add_argument("json", nargs="?", type=Path, default=REPO_ROOT / ".benchmarks" / "attack-cost.json")
    cost.add_argument("--out", type=Path, default=REPO_ROOT / "leaderboards", help="leaderboard folder")
    cost.add_argument("--strength", type=Path, default=STRENGTH_JSON,
                      help="strength-per-cost JSON to include when it exists (default leaderboards/strength-per-cost.json)")
    cost.add_argument("--strength-only", action="store_true",
                      help="rewrite only the page's strength section from --strength, keeping its timing tables")
    text = "convert a .pt/.pth state dict to safetensors (read with torch.load(weights_only=True), never unpickled)"
    convert = sub.add_parser("convert-weights", help=text, description=text)
    convert.add_argument("source", type=Path, help="the .pt / .pth file")
    convert.add_argument("target", type=Path, help="the .safetensors file to write")
    convert.add_argument("--factory", help="package.module:function that builds the model: check every key and shape")
    convert.add_argument("--options", default="{}", help="the factory's keyword arguments as JSON (default {})")
    text = ("run a benchmark's worst-case cascade and AutoAttack side by side on defenses and threat models; "
            "write their strength and cost as JSON")
    strength = sub.add_parser("strength-per-cost", help=text, description=text)
    strength.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"benchmark TOML (default {DEFAULT_SPEC})")
    strength.add_argument("--case", action="append", default=None, metavar="DEFENSE:NORM:EPS",
                          help="a comparison, repeatable (default: the cases of harness.strength.CASES, listed in the README)")
    strength.add_argument("--json", type=Path, default=STRENGTH_JSON,
                          help="the comparisons' store (default leaderboards/strength-per-cost.json): kept, added to and "
                               "rewritten after each comparison; its AutoAttack rows are reused where they still match")
    strength.add_argument("--reuse", type=Path, default=None, metavar="JSON",
                          help="an earlier strength-per-cost JSON: take its AutoAttack rows where the weights, examples, "
                               "threat, attack options, seed, device and library versions all match, instead of "
                               "rerunning them (the rows say so)")
    strength.add_argument("--home", type=Path, default=None, help="checkpoint cache folder's parent (default $HARNESS_HOME or ./.harness)")
    strength.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    strength.add_argument("--no-progress", action="store_true", help="no progress bars")
    text = "how many test examples a comparison of two accuracies needs, and what a sample size separates"
    power = sub.add_parser("power", help=text, description=text)
    power.add_argument("--accuracy", type=float, required=True, help="the better accuracy, a share in (0, 1), e.g. 0.6")
    power.add_argument("--difference", type=float, required=True, help="the difference to detect, a share, e.g. 0.02")
    power.add_argument("--discordant", type=float, default=None,
                       help="share of examples on which the two models disagree, when both run on the same examples")
    power.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (default 0.05)")
    power.add_argument("--power", type=float, default=0.8, help="power (default 0.8)")
    text = "the makespan of a benchmark on 1 to 256 workers and its critical path, from the seconds its store measured"
    scaling = sub.add_parser("scaling", help=text, description=text)
    scaling.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"benchmark TOML (default {DEFAULT_SPEC})")
    scaling.add_argument("--home", type=Path, default=None, help="folder of the results store (default $HARNESS_HOME or ./.harness)")
    scaling.add_argument("--out", type=Path, default=REPO_ROOT / "leaderboards", help="leaderboard folder")
    return parser


def _scaling(args) -> int:
    from harness import spec as spec_module
    from harness.data import load_dataset
    from harness.reports.scaling import render
    from harness.store import ResultStore

    spec = spec_module.load(args.spec)
    _threads(spec)
    data = load_dataset(spec.dataset, **dict(spec.dataset_options))
    database = (args.home or default_home()) / "results.sqlite"
    if not database.is_file():
        raise FileNotFoundError(f"no results store at {database}: run `python -m harness run {args.spec}` first")
    with ResultStore(database) as store:
        path = render(spec, store, data, args.out, command=f"python -m harness scaling {shlex.quote(str(args.spec))}")
    print(f"harness: wrote {path}")
    return 0


def _power(args) -> int:
    from harness.statistics import examples_needed, smallest_separable

    for name, value in (("--alpha", args.alpha), ("--power", args.power)):
        if not 0 < value < 1:
            print(f"harness: error: {name} must lie in (0, 1), got {value}", file=sys.stderr)
            return 2
    try:
        unpaired = examples_needed(args.accuracy, args.difference, alpha=args.alpha, power=args.power)
        paired = None if args.discordant is None else examples_needed(
            args.accuracy, args.difference, alpha=args.alpha, power=args.power, discordant=args.discordant)
    except ValueError as error:
        print(f"harness: error: {error}", file=sys.stderr)
        return 2
    print(f"To tell {100 * args.accuracy:g}% from {100 * (args.accuracy - args.difference):g}% "
          f"(two-sided, alpha {args.alpha:g}, power {args.power:g}):")
    print(f"  independent samples: {unpaired:,} test examples per model")
    if paired is not None:
        print(f"  the same examples, {100 * args.discordant:g}% of them discordant (McNemar): {paired:,} examples")
    for examples in (100, 500, 1000, 10000):
        print(f"  {examples:>6,} examples per model separate about "
              f"{100 * smallest_separable(args.accuracy, examples, alpha=args.alpha, power=args.power):.1f} points "
              f"near {100 * args.accuracy:g}%")
    return 0


def _strength(args) -> int:
    from harness import spec as spec_module, strength
    from harness.preparation import resolve_device
    from harness.threat import Norm

    spec = spec_module.load(args.spec)
    cases = strength.CASES
    if args.case:
        cases = []
        for case in args.case:
            parts = case.split(":")
            if len(parts) != 3:
                raise ValueError(f"--case {case!r}: give DEFENSE:NORM:EPS, e.g. pgd-at:linf:0.3")
            cases.append((parts[0], Norm.parse(parts[1]), float(parts[2])))
    reuse = strength.load(args.reuse) if args.reuse is not None else []
    _threads(spec)  # the checkpoint keys record it: the board's own models, not retrained ones
    result = strength.compare_cases(spec, cases, path=args.json, cache_dir=(args.home or default_home()) / "checkpoints",
                                    device=resolve_device(args.device), progress=not args.no_progress, reuse=reuse)
    asked = {(spec.name, defense, norm.value, eps) for defense, norm, eps in cases}
    for comparison in (c for c in result["comparisons"] if strength.case_of(c) in asked):
        for row in comparison["rows"]:
            print(f"harness: {comparison['defense']} {comparison['norm']} {comparison['eps']:g}: {row['label']}: "
                  f"{row['robust']:.1f}% robust, {row['forward_evals'] + row['gradient_evals']} model evaluations, "
                  f"{row['seconds']:.1f} s" + (f" (reused from {row['reused_from']['date'][:10]})"
                                               if row.get("reused_from") else ""))
    print(f"harness: wrote {args.json} ({len(result['comparisons'])} comparisons)")
    return 0


def _list(what: str) -> int:
    from harness.registry import ATTACKS, CHECKS, DATASETS, DEFENSES, MODELS, PROBES

    registry = {"attacks": ATTACKS, "defenses": DEFENSES, "models": MODELS, "datasets": DATASETS, "checks": CHECKS,
                "probes": PROBES}[what]
    if not len(registry):
        print(f"(no {what} registered yet)")
    for name, entry in registry.items():  # metadata only: listing builds nothing
        doc = (entry.__doc__ or "").strip().splitlines()
        info = registry.info(name)
        extra = f"[from {info['module']}] "
        if what == "attacks":
            extra = (f"[{info['norm'].value}, {info['family'].value}, {info['library']}"
                     f"{', reads true label' if info['uses_true_label'] else ''}] ")
        print(f"{name:22s} {extra}{doc[0] if doc else ''}")
    return 0


def _run_and_render(args, home: Path, out: Path, *, compute: bool) -> list[Path]:
    from harness import spec as spec_module
    from harness.reports import boards
    from harness.data import load_dataset
    from harness.matrix import run
    from harness.preparation import resolve_device
    from harness.store import ResultStore

    spec = spec_module.load(args.spec)
    data = load_dataset(spec.dataset, **dict(spec.dataset_options))
    executor = _executor(args, spec) if compute else None
    if not compute:
        _threads(spec)
    with ResultStore(home / "results.sqlite", lock=compute, start_over=getattr(args, "start_over", False)) as store:
        if compute:
            started = time.perf_counter()
            try:
                summary = run(spec, store=store, cache_dir=home / "checkpoints", device=resolve_device(args.device),
                              progress=not args.no_progress, data=data, executor=executor)
            finally:
                if executor is not None:
                    executor.close()
            if executor is not None and executor.timings:
                print(f"harness: {executor.overhead_summary()}")
            print(f"harness: {spec.name}: {summary.planned} cells, {summary.computed} computed, "
                  f"{summary.skipped} already in the store, {len(summary.failed)} failed "
                  f"({time.perf_counter() - started:.1f} s)")
            if summary.failed:
                for cell, reason in summary.failed:
                    print(f"  FAILED {cell}: {reason}", file=sys.stderr)
                raise SystemExit(f"harness: {len(summary.failed)} cells failed; leaderboard not written. "
                                 "Finished cells are kept in the store; fix the cause and run again.")
        command = f"python -m harness run {shlex.quote(str(args.spec))}"
        paths = boards.write(spec, store, data, out, command=command)
    for path in paths:
        print(f"harness: wrote {path}")
    return paths


def _threads(spec, requested: int | None = None, *, ray: bool = False) -> int:
    """Set torch's CPU threads for this process and return them: --threads, else the benchmark's `threads`, else
    torch's own count (1 per Ray task). Every checkpoint key records the count, so every command that plans, trains
    or reads a benchmark's models sets it first (else a machine with more cores would look for other checkpoints)."""
    import torch

    threads = next(t for t in (requested, spec.threads, 1 if ray else torch.get_num_threads()) if t is not None)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def _executor(args, spec):
    """The executor the flags ask for (None: sequential), with torch's threads set (`_threads`)."""
    ray = args.executor == "ray"
    if not ray and (args.ray_address is not None or args.gpus_per_task or args.max_in_flight is not None):
        raise ValueError("--ray-address, --gpus-per-task and --max-in-flight need --executor ray")
    threads = _threads(spec, args.threads, ray=ray)
    if not ray:
        return None
    from harness.distributed import RayExecutor  # which sets the driver's threads to the tasks'

    executor = RayExecutor(address=args.ray_address, threads=threads, gpus=args.gpus_per_task,
                           max_in_flight=args.max_in_flight)
    executor.start()  # an unreachable address fails here, before anything is computed
    return executor


def _convert(args) -> int:
    import json

    from harness.convert import convert_weights

    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object, got {args.options!r}")
        notes = convert_weights(args.source, args.target, factory=args.factory, options=options)
    except (ValueError, FileNotFoundError) as error:  # json.JSONDecodeError is a ValueError
        print(f"harness: error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"harness: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from harness.registry import PluginError

    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PluginError as error:  # a plugin package that cannot be imported: name it, no traceback
        print(f"harness: error: {error}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    # Long by design: one place turns each command's bad input into an exit code and a message, never a traceback.
    if args.command == "list":
        return _list(args.what)
    if args.command == "convert-weights":
        return _convert(args)
    if args.command == "power":
        return _power(args)
    if args.command == "attack-cost":
        from harness.reports.attack_cost import render

        try:
            if args.strength_only:
                from harness.reports.attack_cost import render_strength

                path = render_strength(args.out, args.strength)
            else:
                path = render(args.json, args.out, command="tox -e bench", strength=args.strength)
        except (FileNotFoundError, ValueError) as error:
            print(f"harness: error: {error}", file=sys.stderr)
            return 2
        print(f"harness: wrote {path}")
        return 0
    from harness.spec import SpecError
    from harness.store import StoreError

    try:
        if args.command == "strength-per-cost":
            return _strength(args)
        if args.command == "scaling":
            return _scaling(args)
        if args.command in ("run", "report"):
            _run_and_render(args, args.home or default_home(), args.out, compute=args.command == "run")
            return 0
        from harness.reports import drift

        with tempfile.TemporaryDirectory(prefix="harness-check-") as scratch:
            scratch = Path(scratch)
            fresh = _run_and_render(args, args.home or scratch / "home", scratch / "leaderboards", compute=True)
            problems = []
            for path in fresh:
                committed = args.out / path.name
                if not committed.is_file():
                    problems.append(f"{committed}: no committed board (run `python -m harness run {args.spec}`)")
                    continue
                problems += [f"{committed.name}: {p}" for p in
                             drift.compare_files(committed, path, tolerance=args.tolerance)]
        if problems:
            print(f"harness check: committed boards drifted from the code ({len(problems)} differences beyond "
                  f"{args.tolerance} points):", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        names = ", ".join(p.name for p in fresh)
        print(f"harness check: {names} match a from-scratch regeneration within {args.tolerance} points")
        return 0
    except (SpecError, StoreError, FileNotFoundError, ValueError, KeyError) as error:
        print(f"harness: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # Ray missing or its cluster unreachable: the message names the flag
        if "--executor ray" not in str(error) and "--ray-address" not in str(error):
            raise
        print(f"harness: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
