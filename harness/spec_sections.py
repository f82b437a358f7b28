"""The optional sections of a benchmark TOML: [label_leak], [findings] and [transfer]; `harness.spec.load` calls
them."""
from __future__ import annotations

from harness.registry import ATTACKS, MODELS
from harness.spec_errors import check_keys, eps_list, fail, positive_int
from harness.spec_types import AttackSpec, DefenseSpec, TransferSpec
from harness.threat import Norm, check_eps


def load_findings(path, table) -> bool:
    """[findings] dead_units = true|false: the findings board, and whether it measures dead penultimate units."""
    check_keys(path, "findings", table, {"dead_units"})
    if not isinstance(table.get("dead_units", False), bool):
        fail(path, "findings.dead_units", f"must be true or false, got {table['dead_units']!r}")
    return table.get("dead_units", False)


def load_label_leak(path, table: dict, attacks: tuple[AttackSpec, ...]) -> tuple[tuple[str, str], ...]:
    """[label_leak] pairs = [["<true-label column>", "<label-free twin column>"], ...]"""
    check_keys(path, "label_leak", table, {"pairs", "perturbation_probe", "robust_features"})
    if not isinstance(table.get("perturbation_probe", False), bool):
        fail(path, "label_leak.perturbation_probe", f"must be true or false, got {table['perturbation_probe']!r}")
    pairs = table.get("pairs", [])
    by_label = {a.label: a for a in attacks}
    out = []
    for pair in pairs if isinstance(pairs, list) else [pairs]:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            fail(path, "label_leak.pairs", f"each pair is [true-label column, label-free column], got {pair!r}")
        for label in pair:
            if label not in by_label:
                fail(path, "label_leak.pairs", f"{label!r} is not an [attacks] column; columns: {', '.join(by_label)}")
        true_label, free = (by_label[p] for p in pair)
        if not ATTACKS.info(true_label.attack_id)["uses_true_label"] or ATTACKS.info(free.attack_id)["uses_true_label"]:
            fail(path, "label_leak.pairs",
                 f"{pair!r}: the first attack must read the true label and the second must not")
        if true_label.norm is not free.norm or true_label.eps != free.eps:
            fail(path, "label_leak.pairs", f"{pair!r}: the twins need the same norm and eps grid")
        out.append((pair[0], pair[1]))
    return tuple(out)


def load_robust_features(path, table, defenses: tuple[DefenseSpec, ...]) -> tuple[tuple[str, object], ...]:
    """[label_leak] robust_features = { source = "<defense>", <options of the robust-features probe> }"""
    from defenses.probes import robust_feature_settings

    key = "label_leak.robust_features"
    check_keys(path, key, table, {"source"} | set(robust_feature_settings({})), required={"source"})
    names = [d.name for d in defenses]
    if table["source"] not in names:
        fail(path, f"{key}.source",
             f"{table['source']!r} is not a defense of this benchmark; defenses: {', '.join(names)}")
    for name in ("train_examples", "steps", "epochs"):
        if name in table:
            positive_int(path, f"{key}.{name}", table[name])
    for name, norm in (("eps", Norm.L2), ("radius", Norm.L2)):
        if name in table:
            try:
                check_eps(table[name], norm)
            except (TypeError, ValueError) as error:
                fail(path, f"{key}.{name}", str(error))
    if "network" in table and table["network"] not in MODELS:
        fail(path, f"{key}.network", f"unknown model {table['network']!r}; known: {', '.join(MODELS)}")
    return tuple(sorted(table.items()))


def load_transfer(path, table, models: tuple[DefenseSpec, ...], diameter: float) -> TransferSpec:
    """[transfer] models = ["<defense>", ...] (two or more: each crafts, every one classifies), attacks =
    ["<attack id>", ...] (one-step or iterative, one norm, default options), eps = [...] (the matrices), optional
    sweep = [...] (the first model's examples at more eps, for transfer rate against eps)."""
    check_keys(path, "transfer", table, {"models", "attacks", "eps", "sweep"}, required={"models", "attacks", "eps"})
    names = [d.name for d in models]
    listed = table["models"]
    if not isinstance(listed, list) or len(listed) < 2 or not all(isinstance(n, str) for n in listed):
        fail(path, "transfer.models",
             f"must list two or more defenses (each one a source and a target), got {listed!r}")
    for name in listed:
        if name not in names:
            fail(path, "transfer.models", f"{name!r} is not a defense of this benchmark; defenses: {', '.join(names)}")
    if len(set(listed)) != len(listed):
        fail(path, "transfer.models", f"names a model twice: {listed!r}")
    ids = table["attacks"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        fail(path, "transfer.attacks", f"must be a non-empty list of distinct attack ids, got {ids!r}")
    for attack_id in ids:
        try:
            ATTACKS.get(attack_id)
        except KeyError as error:
            fail(path, "transfer.attacks", str(error))
        family = ATTACKS.info(attack_id)["family"].value
        if family not in ("one-step", "iterative"):
            fail(path, "transfer.attacks", f"{attack_id} is {family}; crafting on a source model needs its gradients "
                                           "(one-step or iterative attacks)")
    norms = {ATTACKS.info(i)["norm"] for i in ids}
    if len(norms) > 1:
        fail(path, "transfer.attacks", f"mixes {' and '.join(sorted(n.value for n in norms))} attacks; eps is in one "
                                       "norm's units, so the attacks must share it")
    norm = norms.pop()
    eps = eps_list(path, "transfer.eps", table["eps"], norm, diameter)
    sweep = eps_list(path, "transfer.sweep", table["sweep"], norm, diameter) if "sweep" in table else ()
    if len(sweep) == 1:
        fail(path, "transfer.sweep", f"needs two or more eps (a curve), got {table['sweep']!r}")
    every = tuple(sorted(set(eps) | set(sweep)))
    return TransferSpec(tuple(listed), tuple(AttackSpec(f"transfer {i}", i, (), norm, every) for i in ids), eps, sweep)
