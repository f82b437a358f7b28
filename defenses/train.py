"""The one training loop, and the checkpoint cache in front of it.

Checkpoints are safetensors files keyed by a hash of (recipe, data set, seed, training code); a JSON
sidecar holds the file's sha256 and the training log. A file that fails to load or verify is reported
and retrained, never used.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.counting import EvaluationCounter
from harness.data import Dataset
from harness.models import build_model, correct_predictions
from attacks_ext.pgd import project
from defenses.recipes import OverfitGuard, Recipe, SqueezeForm
from harness.registry import ATTACKS, MODELS
from harness.threat import Norm

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("harness", "defenses", "attacks_ext")
# The modules every recipe's training runs through; a recipe adds its model's and its adversaries' modules.
TRAINING_ROOTS = ("defenses.train", "defenses.recipes", "harness.models", "harness.data", "harness.counting")


def _module_file(module: str) -> Path | None:
    """The source file of one of our modules (a package's __init__ only registers entries: never followed)."""
    if module.split(".")[0] not in OUR_PACKAGES:
        return None
    path = REPO_ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imported_modules(file: Path) -> set[str]:
    """Our modules that `file` imports (at top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    return {name for name in found if name.split(".")[0] in OUR_PACKAGES}


def training_code_version(roots: tuple[str, ...] = ()) -> str:
    """A hash of the source that decides what a recipe trains into: the training modules, `roots` (the modules
    of its model and adversaries) and every module of ours they import, transitively. Adding an attack, a
    check or a report module changes nothing here, so no cached checkpoint is lost to it."""
    seen: dict[str, Path] = {}
    todo = list(TRAINING_ROOTS + tuple(roots))
    while todo:
        module = todo.pop()
        file = _module_file(module)
        if module in seen or file is None:
            continue
        seen[module] = file
        todo.extend(_imported_modules(file))
    digest = hashlib.sha256()
    for module, file in sorted(seen.items()):
        digest.update(module.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def recipe_code_roots(recipe: Recipe) -> tuple[str, ...]:
    """The modules that define the recipe's model and adversaries (registered factories)."""
    factories = [MODELS.get(recipe.model)] + [ATTACKS.get(a) for a in (recipe.adversary, recipe.mixed_adversary) if a]
    return tuple(sorted({factory.__module__ for factory in factories}))


@dataclass
class TrainingLog:
    """Per-epoch metrics and the total cost of one training run."""

    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    forward_passes: int = 0  # examples sent through the trained model, adversary included
    backward_passes: int = 0  # examples whose gradient flowed back through it, adversary included
    source_passes: int = 0  # examples sent through fixed ensemble sources (forward + backward)
    guard: dict | None = None  # what the overfitting guard saw, when it fired

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def draw_eps(recipe: Recipe, eps: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """Per-example eps: fixed, or N(0, sigma) with the negative half discarded and truncated to [0, eps]
    (Kurakin et al. 2017), sampled exactly by inverting the half-normal CDF."""
    if recipe.eps_sigma is None:
        return torch.full((count,), float(eps))
    top = math.erf(eps / (recipe.eps_sigma * math.sqrt(2)))  # P(|N(0, sigma)| <= eps)
    u = torch.rand(count, generator=generator, dtype=torch.float64) * top
    return (torch.special.ndtri((1 + u) / 2) * recipe.eps_sigma).clamp(0, eps).float()


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-example cross-entropy against y_hot - alpha * (y_hot - 1/C) (Shafahi et al., label smoothing)."""
    log_p = F.log_softmax(logits, dim=1)
    if alpha == 0:
        return -log_p.gather(1, y[:, None]).squeeze(1)
    target = F.one_hot(y, logits.shape[1]).to(log_p.dtype)
    target = target - alpha * (target - 1.0 / logits.shape[1])
    return -(target * log_p).sum(1)


def squeeze_term(logits: torch.Tensor, form: SqueezeForm) -> torch.Tensor:
    """The logit-squeezing penalty (before beta): the Frobenius norm of the minibatch logit matrix, or the
    mean of the per-example logit norms."""
    if form == SqueezeForm.PER_EXAMPLE_MEAN:
        return logits.norm(dim=1).mean()
    return logits.norm()


def kurakin_loss(per_example: torch.Tensor, k: int, adversarial_weight: float) -> torch.Tensor:
    """(sum_clean L + lambda * sum_adv L) / ((m - k) + lambda * k), the first k examples adversarial
    (Kurakin et al. 2017, Algorithm 1)."""
    m = len(per_example)
    adversarial, clean = per_example[:k].sum(), per_example[k:].sum()
    return (clean + adversarial_weight * adversarial) / ((m - k) + adversarial_weight * k)


def recipe_loss(recipe: Recipe, logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The recipe's loss on one minibatch whose first k examples are adversarial (TRADES' KL term aside):
    Kurakin's weighted smoothed cross-entropy plus the logit-squeezing term in the recipe's form."""
    loss = kurakin_loss(smoothed_cross_entropy(logits, y, recipe.label_smoothing), k, recipe.adversarial_weight)
    if recipe.logit_squeeze_form == SqueezeForm.BATCH_FROBENIUS_SUM_CE:
        loss = loss * len(y)  # Madry et al.'s MNIST code sums the cross-entropy over the minibatch
    if recipe.logit_squeeze > 0:
        loss = loss + recipe.logit_squeeze * squeeze_term(logits, recipe.logit_squeeze_form)
    return loss


def trades_kl(logits_clean: torch.Tensor, logits_adversarial: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term: KL(f(x) || f(x')) averaged over the minibatch (Zhang et al. 2019)."""
    return F.kl_div(F.log_softmax(logits_adversarial, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


# ATDA (Song et al., "Improving the Generalization of Adversarial Training with Domain Adaptation", ICLR 2019, Sec. 3),
# with the constants of the authors' code: lambda 1/3 on the three terms (Recipe.atda_weight), centers moving at 0.1.
ATDA_CENTER_RATE = 0.1


def atda_alignment(logits_clean: torch.Tensor, logits_adversarial: torch.Tensor) -> torch.Tensor:
    """ATDA's unsupervised domain adaptation (Sec. 3.2) between the clean and the adversarial logits: CORAL, the mean
    absolute difference of their k x k second-moment matrices about the mean (the authors' code leaves out 1/(n-1)),
    plus mean matching, the mean absolute difference of their mean logit vectors."""
    def scatter(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.mean(0, keepdim=True)
        return centred.T @ centred

    coral = (scatter(logits_clean) - scatter(logits_adversarial)).abs().mean()
    return coral + (logits_clean.mean(0) - logits_adversarial.mean(0)).abs().mean()


def atda_margin(logits: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """ATDA's supervised domain adaptation (Sec. 3.3): softplus(|z - c_y|_1 - |z - c_n|_1) averaged over every example
    and every class n other than its own, with c the class centers in logit space."""
    distances = (logits[:, None, :] - centers[None]).abs().sum(2)
    others = F.one_hot(y, centers.shape[0]) == 0
    return F.softplus(distances.gather(1, y[:, None]) - distances)[others].mean()


def move_centers(centers: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, rate: float = ATDA_CENTER_RATE) -> None:
    """The center update of ATDA (Sec. 3.3, center-loss style), in place: c_j -= rate * sum_{y_i = j} (c_j - z_i) / (1 + n_j)."""
    counts = torch.bincount(y, minlength=centers.shape[0]).to(centers.dtype)[:, None]
    sums = torch.zeros_like(centers).index_add_(0, y, logits.detach().to(centers.dtype))
    centers -= rate * (counts * centers - sums) / (1 + counts)


def trades_adversary(model: nn.Module, x: torch.Tensor, *, eps: float, steps: int, generator: torch.Generator) -> torch.Tensor:
    """TRADES' inner maximization: signed ascent on KL(f(x) || f(x')) in the Linf ball, from x + 0.001 N(0, I)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits_clean = model(x)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=generator).to(x.device)).clamp(0, 1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = trades_kl(logits_clean, model(x_adv))
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = project(x_adv.detach() + step * grad.sign(), x, eps, Norm.LINF)
    model.train(was_training)
    return x_adv.detach()


MONITOR_EXAMPLES = 1000  # training images whose clean accuracy the log records after every epoch


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of `model` on (x, y) in eval mode (batch-norm statistics untouched); the mode is restored."""
    was_training = model.training
    model.eval()
    correct = correct_predictions(model, x, y)
    model.train(was_training)
    return int(correct.sum()) / max(len(x), 1)


def build_recipe_model(recipe: Recipe, data: Dataset) -> nn.Module:
    """The untrained model a recipe names, shaped for `data`."""
    return build_model(recipe.model, num_classes=data.num_classes, in_channels=data.input_shape[0], width=recipe.width,
                       activation=recipe.activation, activation_beta=recipe.activation_beta, input_levels=recipe.input_levels)


def train(recipe: Recipe, data: Dataset, *, seed: int, device: torch.device | str = "cpu", progress: bool = True,
          sources: dict[str, nn.Module] | None = None) -> tuple[nn.Module, TrainingLog]:
    """Train `recipe` on `data.x_train` from scratch; returns the model in eval mode and its log.

    `sources` are the fixed models named by `recipe.ensemble_sources` (ensemble adversarial training).
    """
    # Long by design: the one training loop; its order of operations (craft, noise, loss, step, guard) reads top to bottom.
    device = torch.device(device)
    sources = sources or {}
    missing = [name for name in recipe.ensemble_sources if name not in sources]
    if missing:
        raise ValueError(f"recipe {recipe.name!r}: ensemble source(s) {', '.join(missing)} not provided")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = build_recipe_model(recipe, data)
    model.to(device)
    counted = EvaluationCounter(model)
    crafting = [counted] + [EvaluationCounter(sources[name].to(device).eval()) for name in recipe.ensemble_sources]
    adversaries = [ATTACKS.get(recipe.adversary)(**dict(recipe.adversary_options))] if recipe.adversary else []
    if recipe.loss == "atda":
        atda_fgsm, centers = ATTACKS.get("fgsm")(), torch.zeros(data.num_classes, data.num_classes, device=device)
    if recipe.mixed_adversary:
        adversaries.append(ATTACKS.get(recipe.mixed_adversary)(**dict(recipe.adversary_options)))
    if recipe.optimizer == "adam":
        # fused: its square root is the vector unit's exact one; the default Adam's goes through MKL's vector math,
        # whose last bits depend on the processor, and training turns those bits into a different model
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + 1)  # adversary randomness, eps draws, noise
    x_all, y_all = data.x_train, data.y_train
    guard = recipe.overfit_guard is not OverfitGuard.OFF
    if guard:  # held out so the guard measures generalization, not memorization
        x_guard, y_guard = x_all[-recipe.guard_examples:].to(device), y_all[-recipe.guard_examples:].to(device)
        x_all, y_all = x_all[: -recipe.guard_examples], y_all[: -recipe.guard_examples]
        guard_attack = ATTACKS.get("pgd-l2" if adversaries and adversaries[0].norm is Norm.L2 else "pgd-linf")(steps=10)
        best_guard, best_state = -1.0, None
    # Clean accuracy is measured once per epoch on these fixed training images (the raw model, not counted as
    # training cost); a clean pass beside every adversarial or noisy batch cost more than a tenth of training.
    x_monitor, y_monitor = x_all[:MONITOR_EXAMPLES].to(device), y_all[:MONITOR_EXAMPLES].to(device)
    log = TrainingLog()
    start = time.perf_counter()
    step = 0
    epochs = tqdm(range(recipe.epochs), desc=f"train {recipe.name}", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        eps = recipe.eps_at(epoch)
        order = torch.randperm(len(x_all), generator=shuffle)
        totals = dict(loss=0.0, adversarial=0.0, adversarial_seen=0, seen=0)
        model.train()
        for begin in range(0, len(order), recipe.batch_size):
            index = order[begin : begin + recipe.batch_size]
            x, y = x_all[index].to(device), y_all[index].to(device)
            m, k = len(y), 0
            x_in = x
            optimizer.zero_grad(set_to_none=True)  # before crafting: the attack then has no parameter grads to save
            if adversaries and step >= recipe.delay_steps and eps > 0:
                k = int(round(recipe.adversarial_fraction * m))
                if k:
                    attack = adversaries[step % len(adversaries)]
                    if attack is adversaries[0]:
                        batch_eps = draw_eps(recipe, eps, k, draws)
                    else:
                        batch_eps = torch.full((k,), recipe.eps_at(epoch, recipe.mixed_eps))
                    source = crafting[step % len(crafting)]
                    x_adv = attack(source, x[:k], y[:k], eps=batch_eps, generator=draws)
                    x_in = torch.cat([x_adv, x[k:]])
            if recipe.gaussian_noise > 0:
                noise = torch.randn(x_in.shape, generator=draws).to(device)
                x_in = (x_in + recipe.gaussian_noise * noise).clamp(0, 1)
            logits = counted(x_in)
            loss = recipe_loss(recipe, logits, y, k)
            adversarial_logits, adversarial_labels = logits[:k], y[:k]
            if recipe.loss == "trades" and eps > 0 and step >= recipe.delay_steps:
                x_adv = trades_adversary(counted, x, eps=eps, steps=recipe.trades_steps, generator=draws)
                adversarial_logits, adversarial_labels = counted(x_adv), y
                loss = loss + recipe.trades_beta * trades_kl(logits, adversarial_logits)
            if recipe.loss == "atda" and eps > 0 and step >= recipe.delay_steps:
                x_adv = atda_fgsm(counted, x, y, eps=draw_eps(recipe, eps, m, draws), generator=draws)
                adversarial_logits, adversarial_labels = counted(x_adv), y
                both, labels = torch.cat([logits, adversarial_logits]), torch.cat([y, y])
                loss = loss + recipe_loss(recipe, adversarial_logits, y, 0) + recipe.atda_weight * (
                    atda_alignment(logits, adversarial_logits) + atda_margin(both, labels, centers))
                move_centers(centers, both, labels)
            loss.backward()
            optimizer.step()
            step += 1
            with torch.no_grad():  # bookkeeping from the logits the step computed anyway
                totals["adversarial"] += float((adversarial_logits.argmax(1) == adversarial_labels).sum())
                totals["adversarial_seen"] += len(adversarial_labels)
            totals["loss"] += float(loss.detach()) * m
            totals["seen"] += m
        record = {"epoch": epoch + 1, "eps": eps, "loss": totals["loss"] / totals["seen"],
                  "clean_accuracy": _accuracy(model, x_monitor, y_monitor),
                  "adversary_accuracy": totals["adversarial"] / totals["adversarial_seen"] if totals["adversarial_seen"] else None,
                  "seconds": time.perf_counter() - start}
        if guard:
            x_attacked = guard_attack(model, x_guard, y_guard, eps=recipe.eps, generator=torch.Generator().manual_seed(seed))
            record["guard_pgd_accuracy"] = _accuracy(model, x_attacked, y_guard)
            if record["guard_pgd_accuracy"] > best_guard:
                best_guard, best_epoch = record["guard_pgd_accuracy"], epoch + 1
                best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            elif best_guard >= 0.2 and record["guard_pgd_accuracy"] < 0.5 * best_guard and log.guard is None:
                log.guard = {"epoch": epoch + 1, "pgd_accuracy": record["guard_pgd_accuracy"], "best_epoch": best_epoch,
                             "best_pgd_accuracy": best_guard, "action": recipe.overfit_guard.value}
        log.epochs.append(record)
        epochs.set_postfix(loss=f"{record['loss']:.3f}", clean=f"{record['clean_accuracy']:.3f}")
        if guard and log.guard is not None and recipe.overfit_guard is OverfitGuard.STOP:
            model.load_state_dict(best_state)  # catastrophic overfitting: keep the last good weights
            break
    optimizer.zero_grad(set_to_none=True)  # a checkpointed model carries no stale gradients
    log.seconds = time.perf_counter() - start
    log.forward_passes, log.backward_passes = counted.forward_evals, counted.gradient_evals
    log.source_passes = sum(c.forward_evals + c.gradient_evals for c in crafting[1:])
    return model.eval(), log
