"""The reference audit: AutoAttack standard at its original budgets on a sample of the examples the board's
worst case left standing, per norm at its rank-by eps. It is what catches an attack set that is weaker than
AutoAttack on some column (the L2 column of an L-inf-trained model, a defense the cascade was not tuned on)."""
from __future__ import annotations

import numpy as np
from scipy import stats

from attacks_ext.checks.per_norm import PerNormCheck, _per_norm
from harness.check_types import rank_eps
from attacks_ext.autoattack_standard import original_autoattack_installed
from harness.check_types import AttackRequest, Status, Verdict, _count, _missing, _number
from harness.registry import ATTACKS, CHECKS
from harness.threat import Norm, check_eps

REFERENCE = {Norm.LINF: ("aa-standard", "autoattack-standard"), Norm.L2: ("aa-standard-l2", "autoattack-standard-l2")}


@CHECKS.register("reference-attack")
class ReferenceAttack(PerNormCheck):
    """Reference audit: AutoAttack standard at its original budgets (the authors' code when `pyautoattack` is
    installed, torchattacks' parts composed at the same budgets otherwise; the detail table names which) on a
    sample of the examples the board's worst case left standing, per norm at its rank-by eps. It fails the row
    when AutoAttack breaks at least `min_broken` of them and a share significantly above `tolerated_share`
    (one-sided exact binomial test at level `alpha`), so a single lucky example does not flip it: the board's attack set was weaker than
    AutoAttack there, and its worst case overstates the defense. `defenses` limits the audit to the rows named
    (the others read n/a): AutoAttack's full budgets cost about 1 s per audited survivor on a 2-core CPU (10 s at
    10, 100-130 s at 100 per defense and norm on MNIST's small CNN)."""

    id, title = "reference-attack", "Reference audit (AutoAttack)"

    def __init__(self, *, examples: int = 100, norms: list | tuple | None = None, eps: dict | None = None,
                 tolerated_share: float = 2.0, alpha: float = 0.05, min_broken: int = 2, implementation: str = "auto",
                 defenses: list | tuple | None = None):
        self.examples, self.min_broken = _count(examples, "examples"), _count(min_broken, "min_broken")
        if defenses is not None and (not isinstance(defenses, (list, tuple)) or not defenses
                                     or not all(isinstance(d, str) for d in defenses)):
            raise ValueError(f"defenses must be a non-empty list of defense names, got {defenses!r}")
        self.defenses = None if defenses is None else tuple(defenses)
        if implementation not in ("auto", "original", "torchattacks"):
            raise ValueError(f"implementation must be 'auto', 'original' or 'torchattacks', got {implementation!r}")
        use_original = implementation == "original" or (implementation == "auto" and original_autoattack_installed())
        self.attacks = {norm: pair[0 if use_original else 1] for norm, pair in REFERENCE.items()}
        if use_original:
            ATTACKS.get(self.attacks[Norm.LINF])()  # a clear error now when the original code is missing
        self._setup(norms, None)
        self.eps_option = _per_norm(eps, "eps", lambda v, norm: float(check_eps(v, norm)), self.norms) or {}
        self.tolerated = _number(tolerated_share, "tolerated_share (% of examples)")
        self.alpha = _number(alpha, "alpha", inclusive=False)
        if not self.alpha < 1:
            raise ValueError(f"alpha must be below 1, got {alpha!r}")

    def audits(self, defense: str) -> bool:
        return self.defenses is None or defense in self.defenses

    def requests_for(self, context, defense: str):
        return self.requests(context) if self.audits(defense) else ()

    def requests(self, context):
        unknown = [d for d in self.defenses or () if context.defenses and d not in context.defenses]
        if unknown:
            raise ValueError(f"defenses {unknown} are not defenses of this benchmark; defenses: {', '.join(context.defenses)}")
        return super().requests(context)

    def evaluate(self, evidence):
        if not self.audits(evidence.defense):
            return Verdict(self.id, Status.NOT_APPLICABLE, "not audited on this board",
                           f"the check's defenses option names {', '.join(self.defenses)} only (AutoAttack's full "
                           "budgets are costly); run it with no defenses option to audit every row")
        return super().evaluate(evidence)

    def _requests_at(self, context, norm):
        eps = self.eps_option.get(norm, rank_eps(context, norm))
        # On every evaluation example's survivors of the whole matrix at (norm, eps), the first `examples` of them.
        return (AttackRequest(self.name(norm, "reference"), self.attacks[norm], (), eps, context.eval_examples,
                              survivors_of="matrix", sample=self.examples),)

    def _evaluate_at(self, evidence, norm):
        (record,) = self._records_at(evidence, norm)
        if record is None:
            return _missing(self.id, "reference cell")
        attacked = np.asarray(record.measurements.get("attacked", record.clean_correct), dtype=bool)
        audited, broken = int(attacked.sum()), int((attacked & ~record.adv_correct).sum())
        eps, attack = record.eps, record.attack_id
        details = {"Audited": audited, "Broken": broken}
        if audited == 0:
            return self._verdict(Status.PASS, f"no example left standing at eps {eps:g}: nothing to audit",
                                 "the worst case is 0%; AutoAttack cannot lower it", **details)
        share = 100 * broken / audited
        p_value = float(stats.binomtest(broken, audited, self.tolerated / 100, alternative="greater").pvalue)
        figure = (f"{attack} broke {broken} of {audited} examples the board left standing at eps {eps:g} "
                  f"({share:.1f}%; p = {p_value:.2g} against {self.tolerated:g}%)")
        details.update({"Broken (%)": share, "p-value": f"{p_value:.2g}"})
        if broken >= self.min_broken and share > self.tolerated and p_value < self.alpha:
            return self._verdict(Status.FAIL, figure,
                                 f"AutoAttack breaks {share:.1f}% of the board's survivors, significantly more than "
                                 f"{self.tolerated:g}% (binomial test, p < {self.alpha:g}): the board's attacks are "
                                 "weaker than AutoAttack here and its worst case overstates this defense", **details)
        reason = ("AutoAttack breaks none of the board's survivors" if not broken else
                  f"AutoAttack breaks {broken} of {audited}: fewer than {self.min_broken} examples" if broken < self.min_broken
                  else f"AutoAttack breaks {broken} of {audited}, not significantly more than {self.tolerated:g}% "
                       f"(p = {p_value:.2g} ≥ {self.alpha:g})")
        return self._verdict(Status.PASS, figure, reason, **details)
