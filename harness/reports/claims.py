"""The claims of the source papers, each a function of a board's stored results that returns a `Finding`: the
paper's setting and number, ours, and a verdict by the rule written beside it. Shafahi et al.'s and Goh's claims,
the dead-unit and linearization tables and the board itself are in `harness.reports.findings`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from attacks_ext.label_leak import perturbation_probe_rows
from harness.check_types import Status
from harness.planning import attacks_every_clean_example
from harness.registry import ATTACKS, Family
from harness.reports.aggregate import Leaderboard
from harness.reports.label_leak import label_leak_frame
from harness.spec import AttackSpec, DefenseSpec
from harness.statistics import ALPHA, mcnemar
from harness.threat import Norm

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"
NOT_MEASURED, NOT_RUN = "not measured here", "missing"  # a benchmark that lacks the setting; cells not in the store


@dataclass(frozen=True)
class Finding:
    """One row of the findings board."""

    claim: str
    source: str
    paper: str  # the paper's setting and number
    ours: str  # our setting and number, from the store
    verdict: str
    rule: str


def kind(defense: DefenseSpec) -> str:
    """What a recipe trains, read off its fields (not its name): natural, one-step, noise (Algorithm 1 with a random
    perturbation), pgd-linf, pgd-l2, trades, gn, ls-gn, lsq-gn; masked (a planted input quantization), other
    (ensembles, mixed norms, ATDA, ...), external."""
    r = defense.recipe
    if r is None:
        return "external"
    if r.input_levels:
        return "masked"
    if r.ensemble_sources or r.mixed_adversary or r.loss not in ("ce", "trades"):
        return "other"
    if r.loss == "trades":
        return "trades"
    if r.adversary is None:
        regularizer = "ls" if r.label_smoothing else "lsq" if r.logit_squeeze else None
        if r.gaussian_noise:
            return "gn" if regularizer is None else f"{regularizer}-gn"
        return regularizer or "natural"
    info = ATTACKS.info(r.adversary)
    if info["family"] is Family.NOISE:
        return "noise"
    return "one-step" if info["family"] is Family.ONE_STEP else f"pgd-{info['norm'].value}"


def _grade(holding: int, total: int) -> str:
    return NOT_RUN if total == 0 else REPRODUCED if holding == total else PARTLY if holding else NOT_REPRODUCED


def _names(board: Leaderboard, *kinds: str) -> list[str]:
    return [d.name for d in board.spec.defenses if kind(d) in kinds]


def _worst(board: Leaderboard, name: str, norm: Norm, eps: float) -> np.ndarray | None:
    return board.vectors.get(name, {}).get(f"Worst {norm.symbol} {eps:g}")


def _column(board: Leaderboard, name: str, family: Family, norm: Norm, eps: float) -> tuple[str, np.ndarray] | None:
    """The first white-box column of `family` at (norm, eps), in the board's order: (label, robust vector)."""
    for attack in board.spec.attacks:
        if attack.source is None and attack.norm is norm and eps in attack.eps and attack.family == family.value:
            record = board.outcomes.get((name, attack.label, eps))
            return None if record is None else (attack.label, record.robust_correct)
    return None


def own_accuracy_columns(spec, attack_ids: tuple[str, ...] | None = None) -> list[tuple[AttackSpec, float]]:
    """The white-box columns (of `attack_ids`) and eps at which they attacked every clean-correct example (marked
    standalone, or first in their cascade chain): their vectors are the attacks' own accuracies, where a cascade's
    other columns hold what the chain left."""
    return [(a, eps) for a in spec.attacks for eps in a.eps
            if a.source is None and (attack_ids is None or a.attack_id in attack_ids)
            and attacks_every_clean_example(spec, a, eps)]


def standalone_column(board: Leaderboard, name: str, attack_id: str, eps: float) -> tuple[str, np.ndarray | None] | None:
    """The first own-accuracy column of `attack_id` at `eps`: (label, robust vector; None while its cell is missing);
    None when the board has no such column."""
    for attack, at in own_accuracy_columns(board.spec, (attack_id,)):
        if at == eps:
            record = board.outcomes.get((name, attack.label, eps))
            return attack.label, None if record is None else record.robust_correct
    return None


def clean_percent(board: Leaderboard, name: str) -> float | None:
    clean = board.vectors.get(name, {}).get("Clean")
    return None if clean is None else _pct(clean)


def _model(board: Leaderboard, name: str) -> str:
    """The architecture a defense of the board trains (e.g. small-cnn), or 'external'."""
    recipe = board.spec.defenses_by_name[name].recipe
    return "external" if recipe is None else recipe.model


def _pct(vector: np.ndarray) -> float:
    return 100 * float(np.mean(vector))


def _checked(board: Leaderboard, check_id: str, claim: str, source: str, paper: str, meaning: str) -> Finding:
    """A claim that a sanity check measures: reproduced where the check passes on every real defense."""
    rule = f"reproduced when `{check_id}` passes on every defense (planted masking baselines aside), partly on some"
    if check_id not in board.checks:
        return Finding(claim, source, paper, f"`{check_id}` is not among this benchmark's checks", NOT_MEASURED, rule)
    names = [d.name for d in board.spec.defenses if kind(d) != "masked"]
    statuses = {n: board.verdicts[n][check_id].status for n in names}
    if any(s is None for s in statuses.values()):
        return Finding(claim, source, paper, "check cells missing from the store", NOT_RUN, rule)
    held = [n for n, s in statuses.items() if s is Status.PASS]
    others = ", ".join(f"{n} {s.label}" for n, s in statuses.items() if s is not Status.PASS)
    ours = f"{meaning} on {len(held)} of {len(names)} defenses" + (f" ({others})" if others else "")
    return Finding(claim, source, paper, ours, _grade(len(held), len(names)), rule)


def label_leaking(board: Leaderboard) -> Finding:
    claim, source = "One-step training on the true label leaks it", "Kurakin et al. (002) Sec. 4.1, Table 3; blog (000)"
    paper = ("ImageNet, FGSM-trained Inception v3: 86.2-88.7% on FGSM examples vs 76.6% clean; Goodfellow et al.'s "
             "MNIST model leaks 79 of 10,000 labels at eps 0.3; CIFAR-10 ResNet-110: 94.81% adversarial vs 92.12% clean")
    rule = ("reproduced: a one-step-trained defense classifies true-label one-step examples better than clean ones "
            "at some eps; partly: leaked > reverse somewhere without that; not reproduced: neither")
    names = _names(board, "one-step")
    if not board.spec.label_leak_pairs or not names:
        return Finding(claim, source, paper, "no twin pair or no one-step-trained defense", NOT_MEASURED, rule)
    frame = label_leak_frame(board)
    frame = frame[frame["Defense"].isin(names)]
    if "Leaked" not in frame or frame["Leaked"].isna().any():
        return Finding(claim, source, paper, "label-leak cells missing from the store", NOT_RUN, rule)
    gap = frame["True-label adv."] - frame["Clean"]
    top = frame.loc[gap.idxmax()]
    ours = (f"{len(names)} one-step-trained defenses, {len(frame)} (defense, eps) pairs: leaked {int(frame['Leaked'].sum())}, "
            f"reverse {int(frame['Reverse'].sum())}; closest to the signature: {top['Defense']} at {top['eps']}, "
            f"{top['True-label adv.']:.1f}% adversarial vs {top['Clean']:.1f}% clean")
    verdict = (REPRODUCED if (gap > 0).any() else PARTLY if (frame["Leaked"] > frame["Reverse"]).any() else NOT_REPRODUCED)
    return Finding(claim, source, paper, ours, verdict, rule)


def leak_bound(board: Leaderboard) -> Finding:
    claim, source = "Leaked + reverse never exceed the clean errors", "follows from Kurakin et al.'s definition (002 Sec. 4.1)"
    rule = "reproduced when it holds on every (defense, eps) pair (with FGSM-pred as the twin it cannot fail)"
    frame = label_leak_frame(board) if board.spec.label_leak_pairs else pd.DataFrame()
    if "Leaked" not in frame or frame["Leaked"].isna().any():
        return Finding(claim, source, "a bound, no number", "no label-leak cells", NOT_MEASURED if frame.empty else NOT_RUN, rule)
    holds = frame["Leaked"] + frame["Reverse"] <= frame["Bound: clean errors"]
    return Finding(claim, source, "a bound, no number", f"holds on {int(holds.sum())} of {len(frame)} pairs",
                   _grade(int(holds.sum()), len(frame)), rule)


def _probe_rows(board: Leaderboard) -> dict[str, list[dict]] | None:
    records = {d.name: board.perturbation.get(d.name) for d in board.spec.defenses if kind(d) != "masked"}
    if not board.spec.perturbation_probe or any(r is None for r in records.values()):
        return None
    return {name: perturbation_probe_rows(r.measurements) for name, r in records.items()}


def perturbation_carries_label(board: Leaderboard, gradient: str = "true") -> Finding:
    open_question = gradient != "true"
    claim = ("The least-likely-class gradient carries the label too (the post's open question, as a claim)"
             if open_question else "The sign-gradient perturbation alone predicts the true label")
    source = "blog (000), perturbation probe"
    paper = ("asked, not measured" if open_question else
             "MNIST, 3-layer MLP: a linear model on clip(sign(g) + 1, 0, 1) reaches ~96% (the post says 'validation error')")
    rule = (f"reproduced when a linear probe on the {gradient}-label perturbation predicts the true label at twice "
            "chance or more on every defense (planted masking aside), partly on some")
    rows = _probe_rows(board)
    if rows is None:
        return Finding(claim, source, paper, "no perturbation-probe cells", NOT_MEASURED if not board.spec.perturbation_probe
                       else NOT_RUN, rule)
    scores = {n: next(r for r in rs if r["Gradient"] == gradient) for n, rs in rows.items()}
    accuracies = [s["Probe → true label"] for s in scores.values()]
    held = sum(s["Probe → true label"] >= 2 * s["Chance"] for s in scores.values())
    chance = next(iter(scores.values()))["Chance"]
    ours = (f"{board.spec.eval_examples} test digits, {len(scores)} defenses: {min(accuracies):.1f}-{max(accuracies):.1f}% (chance {chance:.1f}%, "
            f"raw pixels {next(iter(scores.values()))['Raw pixels → true label']:.1f}%)")
    return Finding(claim, source, paper, ours, _grade(held, len(scores)), rule)


def one_step_training_fails_iterative(board: Leaderboard) -> Finding:
    claim = "One-step adversarial training does not confer robustness to iterative attacks"
    source = "Kurakin et al. (002) Sec. 4.2, Table 2"
    paper = "ImageNet, step-l.l.-trained Inception v3: iterative examples stay near the undefended model's accuracy"
    rule = (f"reproduced when, on every one-step-trained defense, the first iterative L∞ column leaves significantly "
            f"fewer examples than the first one-step column at the rank-by eps (one-sided exact McNemar, p < {ALPHA:g}); "
            "partly on some")
    norm, eps = board.spec.rank_by
    names = _names(board, "one-step")
    if norm is not Norm.LINF or not names:
        return Finding(claim, source, paper, "needs an L∞ rank-by eps and one-step-trained defenses", NOT_MEASURED, rule)
    pairs = {n: (_column(board, n, Family.ONE_STEP, norm, eps), _column(board, n, Family.ITERATIVE, norm, eps)) for n in names}
    if any(a is None or b is None for a, b in pairs.values()):
        return Finding(claim, source, paper, "one-step or iterative column missing", NOT_RUN, rule)
    held = sum(mcnemar(a[1], b[1], alternative="greater").p_value < ALPHA for a, b in pairs.values())
    (one_label, _), (iter_label, _) = next(iter(pairs.values()))
    ours = f"L∞ {eps:g}, {one_label} → {iter_label}: " + ", ".join(
        f"{n} {_pct(a[1]):.1f}% → {_pct(b[1]):.1f}%" for n, (a, b) in pairs.items())
    return Finding(claim, source, paper, ours, _grade(held, len(names)), rule)


def targeted_one_step_trains_best(board: Leaderboard) -> Finding:
    claim = "Step l.l. or step rnd. is the best one-step adversary for adversarial training"
    source = "Kurakin et al. (002) Sec. 4.4 / Appendix, Table 5"
    paper = ("ImageNet, FGSM evaluation at eps 2-16: step rnd. 73.0-76.5%, step l.l. 72.9-76.2%, fast entropy 54.8-62.8%, "
             "FGSM-pred 40.0-43.2% at ~76% clean (FGSM-trained 79-85%, inflated by label leaking)")
    rule = ("reproduced when a step-l.l.- or step-rnd.-trained defense is not significantly below any other one-step-"
            f"trained defense under the first one-step column at every L∞ eps (one-sided exact McNemar, p < {ALPHA:g}) "
            "with clean accuracy within 1 point of the best; partly at some eps")
    trained = {d.name: d.recipe.adversary for d in board.spec.defenses if kind(d) in ("one-step", "noise")
               and d.recipe.width == 1}  # Table 5's rows; a width sweep's models are Sec. 4.3's
    targeted = [n for n, adversary in trained.items() if adversary in ("step-ll", "step-rnd")]
    grid = dict(board.spec.eps).get(Norm.LINF, ())
    if not targeted or len(trained) < 2 or not grid:
        return Finding(claim, source, paper, "needs step-l.l./step-rnd.-trained and other one-step-trained defenses",
                       NOT_MEASURED, rule)
    clean = {n: board.vectors.get(n, {}).get("Clean") for n in trained}
    columns = {(n, e): _column(board, n, Family.ONE_STEP, Norm.LINF, e) for n in trained for e in grid}
    if any(c is None for c in clean.values()) or any(c is None for c in columns.values()):
        return Finding(claim, source, paper, "cells missing from the store", NOT_RUN, rule)
    best_clean = max(_pct(c) for c in clean.values())

    def best_at(e: float) -> bool:
        return any(_pct(clean[t]) >= best_clean - 1 and all(
            mcnemar(columns[(o, e)][1], columns[(t, e)][1], alternative="greater").p_value >= ALPHA
            for o in trained if o != t) for t in targeted)
    label = columns[(targeted[0], grid[0])][0]
    ours = "; ".join(f"{label} at L∞ {e:g}: " + ", ".join(f"{n} ({trained[n]}) {_pct(columns[(n, e)][1]):.1f}%"
                                                           for n in trained) for e in grid)
    ours += "; clean " + ", ".join(f"{n} {_pct(clean[n]):.1f}%" for n in trained)
    return Finding(claim, source, paper, ours, _grade(sum(best_at(e) for e in grid), len(grid)), rule)


def second_order_beats_pgd(board: Leaderboard) -> Finding:
    claim = "S-O finds what PGD misses on a model attacked in the norm it was not trained for"
    source = "Li et al. (004) Table 1"
    paper = ("MNIST, Madry's models: L2-trained, PGD-L∞ 92.8% vs S-O-L∞ 0.0%; L∞-trained, PGD-L2 0.4% vs S-O-L2 0.0% "
             "(the rows' norm symbols were lost in extraction; read in the table's order)")
    rule = (f"reproduced when S-O leaves significantly fewer examples than PGD (one-sided exact McNemar, p < {ALPHA:g}) "
            "on the L∞-trained model under L2 and on the L2-trained model under L∞; partly: one of the two")
    pairs = [(names[0], norm) for names, norm in ((_names(board, "pgd-linf"), Norm.L2), (_names(board, "pgd-l2"), Norm.LINF))
             if names]
    if len(pairs) < 2:
        return Finding(claim, source, paper, "needs L∞- and L2-trained defenses", NOT_MEASURED, rule)
    grid = dict(board.spec.eps)
    at = {norm: max(grid[norm]) for norm in (Norm.LINF, Norm.L2) if grid.get(norm)}
    columns = {(name, norm): [standalone_column(board, name, f"{method}-{norm.value}", at[norm]) if norm in at else None
                              for method in ("pgd", "so")] for name, norm in pairs}
    if all(c is not None for pair in columns.values() for c in pair):  # a cross-norm table's columns: every example
        if any(c[1] is None for pair in columns.values() for c in pair):
            return Finding(claim, source, paper, "cells missing from the store", NOT_RUN, rule)
        vectors = {key: (pgd[1], so[1]) for key, (pgd, so) in columns.items()}
        where = f"{board.spec.eval_examples} test digits, columns {', '.join(c[0] for pair in columns.values() for c in pair)}"
    else:  # the gradient-norm-trace check's PGD and S-O on its own examples
        check = board.checks.get("gradient-norm-trace")
        if check is None:
            return Finding(claim, source, paper, "needs PGD and S-O columns at both norms or the gradient-norm-trace check",
                           NOT_MEASURED, rule)
        vectors = {}
        for name, norm in pairs:
            traces = {n: m for n, _, m in check.traces(board.evidence["gradient-norm-trace"][name])}
            if norm not in traces:
                return Finding(claim, source, paper, f"{name}'s {norm.symbol} trace is missing from the store", NOT_RUN, rule)
            vectors[(name, norm)] = tuple(np.asarray(traces[norm][k], bool) for k in ("pgd_correct", "so_correct"))
        where = f"{len(next(iter(vectors.values()))[0])} test digits, rank-by eps per norm"
    parts, held = [], 0
    for (name, norm), (pgd, so) in vectors.items():
        test = mcnemar(pgd, so, alternative="greater")
        held += test.p_value < ALPHA
        parts.append(f"{name} at {norm.symbol}: PGD {_pct(pgd):.1f}% vs S-O {_pct(so):.1f}% (p = {test.p_value:.2g})")
    return Finding(claim, source, paper, f"{where}: " + "; ".join(parts), _grade(held, 2), rule)


def linf_training_fails_at_l2(board: Leaderboard) -> Finding:
    claim = "L∞ adversarial training collapses under L2 attacks"
    source = "Li et al. (004) Table 1"
    paper = "MNIST, Madry's L∞ model under L2: 0.4% (PGD), 0.0% (S-O); the L2 bound was lost in extraction"
    rule = ("reproduced when the L∞ PGD-trained model's worst case at the largest L2 eps is not significantly above "
            f"the natural model's (exact McNemar, p < {ALPHA:g}); partly: significantly below the L2-trained model's only")
    l2 = dict(board.spec.eps).get(Norm.L2, ())
    linf, l2_trained, natural = _names(board, "pgd-linf"), _names(board, "pgd-l2"), _names(board, "natural")
    if not l2 or not linf or not l2_trained or not natural:
        return Finding(claim, source, paper, "needs an L2 grid and L∞-trained, L2-trained and natural defenses", NOT_MEASURED, rule)
    eps = max(l2)
    v = {n: _worst(board, n, Norm.L2, eps) for n in (linf[0], l2_trained[0], natural[0])}
    if any(x is None for x in v.values()):
        return Finding(claim, source, paper, "cells missing from the store", NOT_RUN, rule)
    above_natural = mcnemar(v[linf[0]], v[natural[0]], alternative="greater").p_value < ALPHA
    below_l2 = mcnemar(v[l2_trained[0]], v[linf[0]], alternative="greater").p_value < ALPHA
    ours = f"worst case at L2 {eps:g} (our choice): " + ", ".join(f"{n} {_pct(x):.1f}%" for n, x in v.items())
    return Finding(claim, source, paper, ours,
                   REPRODUCED if not above_natural else PARTLY if below_l2 else NOT_REPRODUCED, rule)


# Claims of the source papers that need models or attacks this benchmark does not train or run (issue 18's
# papers benchmark); the board lists them so that a missing row reads as missing, never as a pass.
CROSS_NORM_SOURCE, CAPACITY_SOURCE = "Li et al. (004) Table 1", "Kurakin et al. (002) Sec. 4.3"
TRANSFER_SOURCE = "Kurakin et al. (002) Tables 4, 6, Fig. 2"
NOT_ON_THIS_BENCHMARK = (
    ("The cross-norm table: six training methods x PGD/S-O at L∞ and L2", CROSS_NORM_SOURCE,
     "Madry L∞/L2, TRADES, ensemble, ATDA, mixed: see the table", "ensemble-at, mixed-norm-at and ATDA models and an "
     "S-O-L∞ column are not on this benchmark: see mnist-li-findings.md (benchmarks/mnist-li.toml)"),
    ("One-step examples transfer more than iterative ones; transfer rises with eps", TRANSFER_SOURCE,
     "ImageNet, Inception v3 A/B/C/D", "no transfer matrix between independently trained models on this benchmark: see "
     "mnist-kurakin-findings.md (benchmarks/mnist-kurakin.toml)"),
    ("Adversarially trained models get more robust with width; natural ones have an optimum", CAPACITY_SOURCE,
     "ImageNet, width rho 0.5-2", "no width sweep on this benchmark: see mnist-kurakin-findings.md "
     "(benchmarks/mnist-kurakin.toml)"),
)


def not_measured(*, measured: frozenset[str] = frozenset()) -> list[Finding]:
    """The claims this benchmark cannot test, but for those whose source's table the board has (`measured`)."""
    return [Finding(claim, source, paper, why, NOT_MEASURED, "—") for claim, source, paper, why in NOT_ON_THIS_BENCHMARK
            if source not in measured]
