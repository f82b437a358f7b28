"""Sanity checks that tell robustness from gradient masking (Carlini et al. 2019, "On Evaluating Adversarial
Robustness"; Shafahi et al.; Kurakin et al.; Li et al.; the label-leaking post).

A check names the extra evidence it needs: attack cells beyond the matrix (run on the first `examples`
test images) and probes (measurements of the model stored as per-example arrays). Its verdict is a pure
function of stored evidence: pass / warn / fail, the figure that decided it and a short reason. The
matrix plans, runs and stores the requested cells like any other cell; identical requests from two
checks share one cell.

One module per check, with its probe and its figure; the types they share are in `harness.check_types`.
Importing this package (the `checks` entry point) registers every built-in check and probe.
"""
from harness.check_types import (AttackRequest, Check, Column, Context, Evidence, ProbeRequest, Status,  # noqa: F401
                                  Verdict)
# importing each check registers it (and its probe)
from attacks_ext.checks.monotone_eps import MonotoneInEps  # noqa: F401
from attacks_ext.checks.iterative_beats_one_step import IterativeBeatsOneStep  # noqa: F401
from attacks_ext.checks.zero_gradients import ZeroGradients  # noqa: F401
from attacks_ext.checks.randomized_outputs import RandomizedOutputs  # noqa: F401
from attacks_ext.checks.probability_outputs import ProbabilityOutputs  # noqa: F401
from attacks_ext.checks.fgsm_direction_loss import FgsmDirectionLoss  # noqa: F401
from attacks_ext.checks.linearized_robustness import LinearizedRobustness  # noqa: F401
from attacks_ext.checks.gradient_norm_trace import GradientNormTrace  # noqa: F401
from attacks_ext.checks.loss_landscape import LossLandscape  # noqa: F401
from attacks_ext.checks.unbounded_eps import UnboundedEps  # noqa: F401
from attacks_ext.checks.restart_sweep import RestartSweep  # noqa: F401
from attacks_ext.checks.step_sweep import StepSweep  # noqa: F401
from attacks_ext.checks.gradient_free import GradientFreeVsWhiteBox  # noqa: F401
from attacks_ext.checks.transfer import TransferVsWhiteBox  # noqa: F401
from attacks_ext.checks.reference_attack import ReferenceAttack  # noqa: F401
from attacks_ext.checks.attack_convergence import AttackConvergence  # noqa: F401
from attacks_ext import feature_units  # noqa: F401  (the findings board's dead-unit probe)
