"""Planning: the cells a benchmark needs (clean, attack, check, label-leak probe and [transfer] cells), each keyed by
what decides its outcome, in cascade order (the chain's order is in `matrix`'s docstring)."""
from __future__ import annotations

from harness.cells import DEAD_UNITS, FINDINGS, LABEL_LEAK, PERTURBATION_PROBE, ROBUST_FEATURES, Cell, _cell
from harness.check_types import AttackRequest, ProbeRequest
from harness.data import Dataset
from harness.preparation import defense_keys
from harness.registry import ATTACKS
from harness.spec import AttackSpec, BenchmarkSpec


FAMILY_ORDER = ("one-step", "iterative", "noise", "gradient-free", "transfer")
WHITE_BOX = ("one-step", "iterative")  # families that follow the target model's own gradients


def cascade_order(spec: BenchmarkSpec) -> list[AttackSpec]:
    """The columns in the order a cascade runs them: the label-leak twins first (they run on every example:
    Kurakin's count needs clean-misclassified examples too), then white-box columns (one-step, iterative),
    then noise, gradient-free and transfer ones, each group in TOML order. White-box columns run before the
    others so that the sanity checks can tell what only the gradient-free or transfer attacks broke."""
    return sorted(spec.attacks, key=lambda a: (a.label not in spec.label_leak_columns, FAMILY_ORDER.index(a.family)))


def runs_on_every_example(spec: BenchmarkSpec, attack: AttackSpec) -> bool:
    """Outside a cascade every column does; in one, the label-leak twins and columns marked `standalone` (a
    paper's table of each attack's own accuracy) do, and the chain's later columns attack their survivors."""
    return not spec.cascade or attack.label in spec.label_leak_columns or attack.standalone


def attacks_every_clean_example(spec: BenchmarkSpec, attack: AttackSpec, eps: float) -> bool:
    """Whether the column's cell at `eps` attacks every clean-correct example, so that its robust vector is the
    attack's own accuracy: it runs on every example, or it is the first column of its (norm, eps) chain, after
    which only the clean evaluation comes."""
    if runs_on_every_example(spec, attack):
        return True
    first = next(a for a in cascade_order(spec) if a.norm is attack.norm and eps in a.eps)
    return first.label == attack.label


def _same_draws(attack: AttackSpec, eps: float) -> tuple:
    """What decides an attack cell's seed and outcome per example, apart from the examples it runs on."""
    return attack.attack_id, tuple(sorted(attack.options)), attack.norm.value, eps, attack.restart


def plan(spec: BenchmarkSpec, data: Dataset) -> list[Cell]:
    """Every cell of the matrix, then every cell its sanity checks ask for. Two checks asking for the same
    evidence get cells with the same key; `run` computes each key once. In a cascade a cell comes after the
    cells it depends on.

    A check's attack request that repeats a matrix column (same attack, options and eps, no restart, crafted
    on the target) reuses that column's cell: each example's draws come from (cell seed, example index) and
    the seeds are equal, so the column's outcome on every example it attacked is the request's outcome there,
    and the request only attacks the clean-correct examples the column skipped (a cascade's fallen ones)."""
    # Long by design: the cascade's order is easiest to check when every kind of cell is planned in one place.
    cells = []
    keys = defense_keys(spec, data)
    context = spec.check_context()
    checks = [(check_spec.check_id, check_spec.build()) for check_spec in spec.checks]
    for defense in spec.defenses + spec.replicas:  # [transfer]'s own models get its cells only, below
        model_key = keys[defense.name]
        replica = defense.replica_of is not None  # a training-seed replica: clean and the rank-by threat's chain only
        clean = _cell(spec, data, defense.name, model_key, None, 0.0)
        cells.append(clean)
        chains: dict[tuple[str, float], list[str]] = {}
        white_box: dict[tuple[str, float], list[str]] = {}  # the clean cell and the white-box columns
        columns: dict[tuple, Cell] = {}
        for attack in cascade_order(spec) if spec.cascade else spec.attacks:
            for eps in attack.eps:
                if replica and (attack.norm, eps) != spec.rank_by:
                    continue
                chain = chains.setdefault((attack.norm.value, eps), [clean.key])
                after = () if runs_on_every_example(spec, attack) else tuple(chain)
                source = None if attack.source is None else (attack.source, keys[attack.source])
                cell = _cell(spec, data, defense.name, model_key, attack, eps, source=source, after=after,
                             restart=attack.restart)
                cells.append(cell)
                chain.append(cell.key)
                if attack.family in WHITE_BOX:
                    white_box.setdefault((attack.norm.value, eps), [clean.key]).append(cell.key)
                if source is None:
                    columns.setdefault(_same_draws(attack, eps), cell)
        if replica:
            continue
        if spec.perturbation_probe:  # on every evaluation example, 5-fold cross-validated
            probe = ProbeRequest(PERTURBATION_PROBE, "perturbation-labels", (("folds", 5),), spec.eval_examples)
            cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=probe, check=LABEL_LEAK,
                               request=probe.name))
        if spec.dead_units:  # the findings board's penultimate units, summed over every evaluation example
            probe = ProbeRequest(DEAD_UNITS, "penultimate-units", (), spec.eval_examples)
            cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=probe, check=FINDINGS,
                               request=probe.name))
        options = dict(spec.robust_features)
        if options.pop("source", None) == defense.name:  # D_rand / D_det crafted on this model, tested on every example
            probe = ProbeRequest(ROBUST_FEATURES, "robust-features", tuple(sorted(options.items())), spec.eval_examples)
            cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=probe, check=LABEL_LEAK,
                               request=probe.name))
        for check_id, check in checks:
            named: dict[AttackRequest, str] = {}  # this check's requests -> cell keys, for requests that come after others
            for request in check.requests_for(context, defense.name):
                common = dict(examples=request.examples, check=check_id, request=request.name)
                if isinstance(request, ProbeRequest):
                    cells.append(_cell(spec, data, defense.name, model_key, None, 0.0, probe=request, **common))
                    continue
                attack_spec = AttackSpec(f"{check_id}: {request.name}", request.attack_id, tuple(sorted(request.options)),
                                         ATTACKS.get(request.attack_id)(**dict(request.options)).norm, (request.eps,))
                source = None if request.source is None else (request.source, keys[request.source])
                after = tuple(named[earlier] for earlier in request.after)
                if request.survivors_of is not None:
                    survivors = {"matrix": chains, "white-box": white_box}[request.survivors_of]
                    after += tuple(survivors.get((attack_spec.norm.value, request.eps), [clean.key]))
                column = (None if request.restart or source is not None or after
                          else columns.get(_same_draws(attack_spec, request.eps)))
                cells.append(_cell(spec, data, defense.name, model_key, attack_spec, request.eps, restart=request.restart,
                                   source=source, reuses=None if column is None else column.key, after=after,
                                   sample=request.sample, **common))
                named[request] = cells[-1].key
    if spec.transfer is not None:  # Kurakin et al.'s matrices: each attack crafted once per model and eps, all classify
        targets = tuple((name, keys[name]) for name in spec.transfer.models)
        for source in spec.transfer.models:
            for attack in spec.transfer.attacks:
                cells += [_cell(spec, data, source, keys[source], attack, eps, check=FINDINGS, request=attack.label,
                                targets=targets) for eps in spec.transfer.eps_for(source)]
    return cells
