"""Clean accuracy, PGD robustness curves, AutoAttack, transfer attack, gradient-masking checks.

Every attack runs with the model in eval mode on raw [0, 1] images (normalisation is inside the
model), in batches, on whatever device the model is on. Robust accuracy is counted over all
evaluated images: an image the model already misclassifies is not attacked (the clean image lies
in its own eps-ball, so it counts as broken), which saves work and changes no number. For the same
reason PGD stops on an image at the first iterate that fools the model: on the default models that
cut the PGD checks' time 1.3-6x and never raised a robust accuracy.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Optional

import numpy as np
import torch

from . import attacks
from .config import EvaluateConfig, ThreatConfig

LINF_GRID = [0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3]
L2_GRID_MULTIPLES = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]  # times the nominal L2 eps
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def _device(net) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def predict(net, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    net.eval()
    dev = _device(net)
    return torch.cat([net(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def accuracy(net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    return (predict(net, x, batch_size) == y).float().mean().item() if len(y) else float("nan")


def stage_checks(net, x: torch.Tensor, y: torch.Tensor, threat: ThreatConfig, pgd_images: Optional[int] = None,
                 seed: Optional[int] = None, device: str = "cpu") -> dict:
    """A training stage's check of the model it trained: clean accuracy on every image, PGD accuracy
    (threat.eval_steps at the nominal eps) on the first `pgd_images` (all for None)."""
    net = net.to(device)
    n = len(y) if pgd_images is None else pgd_images
    return {"clean_acc": accuracy(net, x, y), "pgd_acc": pgd_accuracy(net, x[:n], y[:n], threat, seed=seed)}


def evaluate_with_clean_accuracy(net, x_all: torch.Tensor, y_all: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                 threat: ThreatConfig, cfg: EvaluateConfig, n_classes: int, source=None,
                                 source_logits: bool = False, run_autoattack: bool = False,
                                 desc: Optional[str] = None, device: str = "cpu") -> tuple[float, dict]:
    """The evaluate stage's work on one model, on `device`: clean accuracy on every test image (x_all)
    and `evaluate_model` on the evaluation subset (x, y)."""
    net = net.to(device).eval()
    source = source.to(device).eval() if source is not None else None
    return accuracy(net, x_all, y_all, cfg.batch_size), evaluate_model(
        net, x, y, threat, cfg, n_classes, source=source, source_logits=source_logits,
        run_autoattack=run_autoattack, desc=desc)


def pgd_correct(net, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int, norm: str,
                restarts: int = 1, batch_size: int = 500) -> torch.Tensor:
    """Per image: is it still classified correctly under PGD (random start, worst of `restarts`)? An
    image counts as broken at the first iterate that fools the model (attacks.pgd_until_fooled)."""
    net.eval()
    correct = predict(net, x, batch_size) == y
    if eps == 0:
        return correct
    dev = _device(net)
    todo = correct.nonzero().flatten()
    for i in range(0, len(todo), batch_size):
        idx = todo[i:i + batch_size]
        xb, yb = x[idx].to(dev), y[idx].to(dev)
        x_adv = attacks.pgd_until_fooled(net, xb, yb, eps, step_size, steps, norm, restarts=restarts)
        with torch.no_grad():
            correct[idx] = (net(x_adv).argmax(1) == yb).cpu()
    return correct


def pgd_accuracy(net, x: torch.Tensor, y: torch.Tensor, threat: ThreatConfig, eps: float | None = None,
                 steps: int | None = None, restarts: int | None = None, batch_size: int = 500,
                 seed: int | None = None) -> float:
    """Accuracy under PGD (random start, `restarts` restarts, worst case per example). With `seed`, the
    random starts come from a generator seeded with it (the caller's is left as it was): the same
    model then gets the same number, as a stage's metric must when `dvc repro -f` runs it again."""
    eps = threat.eps if eps is None else eps
    step = threat.step_size * eps / threat.eps  # the step scales with eps: eps/4 at the nominal one
    with attacks.own_random_stream(x.device, seed) if seed is not None else contextlib.nullcontext():
        correct = pgd_correct(net, x, y, eps, step, steps or threat.eval_steps, threat.norm,
                              restarts or threat.restarts, batch_size)
    return correct.float().mean().item() if len(y) else float("nan")


# ----------------------------------------------------------------------------- what is evaluated
def eps_grid(threat: ThreatConfig, grid: Optional[list[float]] = None) -> list[float]:
    """The curve's eps values: the given grid or the norm's default, always with 0 and the nominal eps."""
    if grid is None:
        grid = LINF_GRID if threat.norm == "Linf" else [m * threat.eps for m in L2_GRID_MULTIPLES]
    return sorted({round(float(e), 10) for e in [*grid, 0.0, threat.eps]})


def eval_indices(y: torch.Tensor, n: Optional[int], seed: int) -> torch.Tensor:
    """A seeded subset of n test images spread evenly over the classes (all of them for n=None), so
    a test table sorted by class still gives every class its share."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picks, k = [], 0
    while len(picks) < n:  # round robin over classes: balanced, and a prefix of the list is balanced too
        for idx in per_class:
            if k < len(idx) and len(picks) < n:
                picks.append(idx[k])
        k += 1
    return torch.as_tensor(np.array(picks), dtype=torch.long)


def labels_match(data_cfg) -> bool:
    """Do the source and target tasks share their label space (same dataset, same classes, same order)?
    Only then does a logits attack on the source model mean anything on the target model."""
    same_data = data_cfg.target_dataset in (None, data_cfg.dataset)
    return same_data and list(data_cfg.source_classes) == list(data_cfg.target_classes)


def autoattack_selection(ranking: dict[str, float], top: int, named: list[str]) -> list[str]:
    """The models AutoAttack runs on: the best `top` by PGD accuracy and every model in `named`.

    `ranking` maps every transferred model to its PGD accuracy from the transfer stage (the only
    number all models have before any evaluate stage runs); ties go to the name, so the choice is
    the same in every process."""
    best = sorted(ranking, key=lambda m: (-ranking[m], m))[:top]
    return sorted(set(best) | set(named))


# ----------------------------------------------------------------------------- attacks
def pgd_curve(net, x, y, threat: ThreatConfig, grid: list[float], steps: int, restarts: int,
              batch_size: int = 500, seed: int = 0) -> tuple[list[dict], dict[float, torch.Tensor]]:
    """PGD accuracy at each eps of the grid, each eps attacked independently on the same images
    (so that a rise with eps exposes a failing attack rather than being hidden by reuse)."""
    curve, correct = [], {}
    for eps in grid:
        torch.manual_seed(seed)
        step = threat.step_size * eps / threat.eps
        correct[eps] = pgd_correct(net, x, y, eps, step, steps, threat.norm, restarts, batch_size)
        curve.append({"eps": eps, "acc": correct[eps].float().mean().item()})
    return curve, correct


def _into_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project an attack's output into the eps-ball and [0, 1]: an external attack's rounding slack
    can then only weaken it, never count a point outside the threat model."""
    return x + attacks.project(x_adv - x, x, eps, norm)


def autoattack(net, x, y, norm: str, eps: float, n_classes: int, steps: int = 100, queries: int = 5000,
               seed: int = 0, batch_size: int = 500) -> dict:
    """AutoAttack, standard version (Croce & Hein 2020), from torchattacks: APGD-CE, APGD-T, FAB-T and
    Square run in that order, each on the images that all previous attacks failed on, so the result is
    the pointwise worst case over the four. Run one by one (as torchattacks' AutoAttack/MultiAttack does
    internally) to record the breakdown: robust accuracy after each attack and the images each one
    broke. `steps` 100 and `queries` 5000 are the standard settings of AutoAttack's reference code
    (torchattacks' own AutoAttack wrapper leaves APGD and FAB at its default of 10 iterations);
    APGD-T and FAB-T target the n_classes - 1 other classes (AutoAttack's 9 on 10 classes)."""
    import torchattacks

    net.eval()
    dev = _device(net)
    fast = attacks.attack_view(net)  # the same function (BatchNorm folded): attacks run on it, `net` judges
    attacks_ = {
        "apgd-ce": torchattacks.APGD(fast, norm=norm, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed),
        "apgd-t": torchattacks.APGDT(fast, norm=norm, eps=eps, steps=steps, n_restarts=1, n_classes=n_classes,
                                     seed=seed),
        "fab-t": torchattacks.FAB(fast, norm=norm, eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                                  n_classes=n_classes, seed=seed),
        "square": torchattacks.Square(fast, norm=norm, eps=eps, n_queries=queries, n_restarts=1, seed=seed),
    }
    robust = predict(net, x, batch_size) == y
    n = max(len(y), 1)
    breakdown = {"clean": robust.float().mean().item()}
    broken_by, seconds = {}, {}
    for name, attack in attacks_.items():
        start = time.perf_counter()
        todo = robust.nonzero().flatten()
        broken = 0
        for i in range(0, len(todo), batch_size):
            idx = todo[i:i + batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            x_adv = _into_ball(attack(xb, yb).detach(), xb, eps, norm)
            with torch.no_grad():
                fooled = (net(x_adv).argmax(1) != yb).cpu()
            robust[idx[fooled]] = False
            broken += int(fooled.sum())
        breakdown[name] = robust.float().mean().item()
        broken_by[name] = broken / n
        seconds[name] = round(time.perf_counter() - start, 2)
    net.eval()  # torchattacks restores the mode it found; keep eval regardless
    return {"acc": robust.float().mean().item(), "images": len(y), "breakdown": breakdown,
            "broken_by": broken_by, "seconds": seconds, "steps": steps, "queries": queries,
            "robust": robust}


def transfer_attack(source, target, x, y, threat: ThreatConfig, eps: float, steps: int, logits: bool,
                    batch_size: int = 500, seed: int = 0) -> dict:
    """Adversarial examples crafted on the public source model, replayed on the target model.

    Features: PGD pushing the source's penultimate features away from their clean values (target-
    agnostic: it needs no target labels, the Renofeation threat model). Logits: untargeted PGD on the
    source's cross-entropy, only when the label spaces match. The success rate counts the clean-correct
    images the target model gets wrong on either attack's example."""
    source.eval()
    target.eval()
    dev = _device(target)
    src_dev = _device(source)
    step = threat.step_size * eps / threat.eps
    torch.manual_seed(seed)
    clean_ok = predict(target, x, batch_size) == y
    todo = clean_ok.nonzero().flatten()
    fooled_feat = torch.zeros(len(todo), dtype=torch.bool)
    fooled_logit = torch.zeros(len(todo), dtype=torch.bool)
    for i in range(0, len(todo), batch_size):
        idx = todo[i:i + batch_size]
        xb, yb = x[idx].to(src_dev), y[idx].to(src_dev)
        x_feat = attacks.feature_pgd(source.features, xb, eps, step, steps, threat.norm)
        with torch.no_grad():
            fooled_feat[i:i + len(idx)] = (target(x_feat.to(dev)).argmax(1) != yb.to(dev)).cpu()
        if logits:
            x_logit = attacks.pgd(source, xb, yb, eps, step, steps, threat.norm)
            with torch.no_grad():
                fooled_logit[i:i + len(idx)] = (target(x_logit.to(dev)).argmax(1) != yb.to(dev)).cpu()
    n = max(len(todo), 1)
    return {"asr": (fooled_feat | fooled_logit).float().sum().item() / n,
            "asr_features": fooled_feat.float().sum().item() / n,
            "asr_logits": fooled_logit.float().sum().item() / n if logits else None,
            "images": int(len(todo)), "eps": eps, "steps": steps, "broken": todo[fooled_feat | fooled_logit]}


# ----------------------------------------------------------------------------- sanity checks
def sanity_checks(curve: list[dict], whitebox: dict, pgd_long: dict, transfer: Optional[dict],
                  aa: Optional[dict], cfg: EvaluateConfig) -> dict[str, dict]:
    """Gradient-masking checks after Carlini et al. (2019), each {passed, the numbers it compared}.

    Each tolerance is in accuracy (or success rate) and never less than one image of the sample the
    check compares on, so that one image flipping between two random starts cannot fail a check.

    - monotone: accuracy does not rise with eps by more than `monotone_tolerance` (each eps is an
      independent attack on the same images, so some noise is expected; a real rise means the attack
      fails at large eps, the signature of masked gradients).
    - large_eps: accuracy at the grid's largest eps is at most `large_eps_max_acc`.
    - more_steps: PGD-`check_steps` with `check_restarts` restarts is not above PGD-`steps` on the same
      images by more than `steps_tolerance`.
    - blackbox_transfer: the transfer attack's success rate is not above the white-box PGD's (same eps,
      same images, over clean-correct images) by more than `blackbox_tolerance`.
    - blackbox_square (when AutoAttack ran): Square, the black-box attack of AutoAttack, breaks at most
      `blackbox_tolerance` of the images that APGD-CE, APGD-T and FAB-T all failed on.
    """
    def slack(tolerance: float, images: int) -> float:
        return max(tolerance, 1.0 / max(images, 1)) + 1e-6  # 1e-6: float32 accuracies

    checks = {}
    accs = [p["acc"] for p in curve]
    rises = [(accs[i + 1] - accs[i], curve[i]["eps"], curve[i + 1]["eps"]) for i in range(len(curve) - 1)]
    worst = max(rises, default=(0.0, 0.0, 0.0))
    tol = slack(cfg.monotone_tolerance, whitebox["images"])
    checks["monotone"] = {"passed": worst[0] <= tol, "max_rise": worst[0], "from_eps": worst[1], "to_eps": worst[2],
                          "images": whitebox["images"], "tolerance": round(tol, 4)}
    checks["large_eps"] = {"passed": curve[-1]["acc"] <= cfg.large_eps_max_acc, "eps": curve[-1]["eps"],
                           "acc": curve[-1]["acc"], "threshold": cfg.large_eps_max_acc}
    tol = slack(cfg.steps_tolerance, pgd_long["images"])
    checks["more_steps"] = {"passed": pgd_long["acc"] <= pgd_long["short_acc"] + tol,
                            "short_acc": pgd_long["short_acc"], "long_acc": pgd_long["acc"],
                            "short_steps": cfg.steps, "long_steps": cfg.check_steps,
                            "long_restarts": cfg.check_restarts, "images": pgd_long["images"],
                            "tolerance": round(tol, 4)}
    if transfer is not None:
        tol = slack(cfg.blackbox_tolerance, transfer["images"])
        checks["blackbox_transfer"] = {
            "passed": transfer["asr"] <= whitebox["asr"] + tol,
            "transfer_asr": transfer["asr"], "whitebox_asr": whitebox["asr"], "images": transfer["images"],
            "tolerance": round(tol, 4)}
    if aa is not None:
        extra = aa["broken_by"]["square"]
        tol = slack(cfg.blackbox_tolerance, aa["images"])
        checks["blackbox_square"] = {"passed": extra <= tol, "square_extra": extra, "images": aa["images"],
                                     "tolerance": round(tol, 4)}
    return checks


# ----------------------------------------------------------------------------- everything for one model
def evaluate_model(net, x, y, threat: ThreatConfig, cfg: EvaluateConfig, n_classes: int,
                   source=None, source_logits: bool = False, run_autoattack: bool = False,
                   desc: Optional[str] = None) -> dict:
    """Every number the evaluate stage reports for one model, on the images x, y (already the
    evaluation subset). `source` is the public model the transfer attack crafts its examples on.
    With `desc`, a progress bar over the phases."""
    from tqdm import tqdm

    seconds = {}
    bar = tqdm(total=2 + (source is not None) + run_autoattack, desc=desc, unit="phase", disable=desc is None)

    def say(msg):
        bar.set_postfix_str(msg, refresh=True)

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 2)
        bar.update(1)
        return out

    net.eval()
    grid = eps_grid(threat, cfg.eps_grid)
    say(f"PGD-{cfg.steps} curve on {len(y)} images, eps {grid}")
    curve, correct = timed("curve", lambda: pgd_curve(net, x, y, threat, grid, cfg.steps, cfg.restarts,
                                                      cfg.batch_size, cfg.seed))
    nominal = round(float(threat.eps), 10)
    clean_ok, robust_ok = correct[0.0], correct[nominal]
    pgd_acc = robust_ok.float().mean().item()
    whitebox = {"asr": (clean_ok & ~robust_ok).float().sum().item() / max(int(clean_ok.sum()), 1),
                "images": len(y)}

    m = min(cfg.check_images, len(y))
    say(f"PGD-{cfg.check_steps} x {cfg.check_restarts} restarts on {m} images")

    def long_pgd():
        torch.manual_seed(cfg.seed + 1)
        long_ok = pgd_correct(net, x[:m], y[:m], threat.eps, threat.step_size, cfg.check_steps, threat.norm,
                              cfg.check_restarts, cfg.batch_size)
        return {"acc": long_ok.float().mean().item(), "short_acc": robust_ok[:m].float().mean().item(),
                "images": m}
    pgd_long = timed("more_steps", long_pgd)

    transfer = None
    if source is not None:
        say(f"transfer attack from the source model ({'features and logits' if source_logits else 'features'})")
        transfer = timed("transfer", lambda: transfer_attack(source, net, x, y, threat, threat.eps,
                                                             cfg.transfer_steps, source_logits, cfg.batch_size,
                                                             cfg.seed))
    aa = None
    if run_autoattack:
        k = min(cfg.autoattack_images, len(y))
        say(f"AutoAttack (standard) on {k} images")
        aa = timed("autoattack", lambda: autoattack(net, x[:k], y[:k], threat.norm, threat.eps, n_classes,
                                                    cfg.autoattack_steps, cfg.autoattack_queries, cfg.seed,
                                                    cfg.batch_size))
    bar.close()
    checks = sanity_checks(curve, whitebox, pgd_long, transfer, aa, cfg)
    out = {
        "clean_acc": curve[0]["acc"], "pgd_acc": pgd_acc, "pgd_images": len(y), "pgd_steps": cfg.steps,
        "pgd_restarts": cfg.restarts, "pgd_curve": curve,
        "autoattack_acc": aa["acc"] if aa else None,
        "autoattack_images": aa["images"] if aa else None,
        # PGD on exactly the AutoAttack images, so the two numbers compare like with like
        "autoattack_pgd_acc": robust_ok[:aa["images"]].float().mean().item() if aa else None,
        "autoattack_breakdown": ({"robust_acc_after": aa["breakdown"], "broken_by": aa["broken_by"],
                                  "steps": aa["steps"], "queries": aa["queries"], "seconds": aa["seconds"]}
                                 if aa else None),
        "transfer_asr": transfer["asr"] if transfer else None,
        "transfer_attack": {k: v for k, v in transfer.items() if k != "broken"} if transfer else None,
        "whitebox_asr": whitebox["asr"],
        "checks_passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "seconds": seconds,
    }
    return _plain(out)


def _plain(obj):
    """JSON-ready: Python floats/bools, NaN as None."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
