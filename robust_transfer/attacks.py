"""FGSM and PGD (Linf and L2, random start, restarts) and feature-space PGD.

Attacks take raw [0, 1] images and a model that normalises internally; they never change the
model's train/eval mode (callers choose: evaluation attacks run in eval mode). Gradients are taken
with `torch.autograd.grad` with respect to the input only, so no weight gradients are computed or
accumulated during attack steps.

Speed (benchmarks/attack_throughput.py): an attack differentiates the model K times with respect
to its input only. On a model in eval mode, `pgd` and `fgsm` therefore run on `attack_view(model)`:
a private copy with BatchNorm folded into the preceding convolutions, no weight gradients and, on
CPU, channels-last weights -- the same function up to float rounding, and about 1.5x faster on the
default small CNN. A Linf step is one add and one clamp to precomputed per-pixel bounds (the
eps-ball intersected with [0, 1]). A model in train mode (adversarial training) is attacked as is.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Switches for the speed-ups above; the defaults are what the pipeline runs (the benchmark and the
# equivalence test turn them off to compare). bf16 autocast applies to CUDA tensors only, and is off
# by default: it changes which pixels' gradient signs survive rounding, so evaluations would differ.
FAST_EVAL_COPY = True
BF16_ON_GPU = False

LossFn = Callable[[torch.Tensor], torch.Tensor]  # x_adv -> per-example loss to maximise


def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the eps-ball and keep x + delta inside [0, 1]."""
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp_(0.0, 1.0) - x


@contextlib.contextmanager
def own_random_stream(device: torch.device, seed: Optional[int] = None):
    """Random starts drawn inside come from a fork of the global generator (seeded with `seed` when
    given), so the caller's random stream is left as it was: a check run between training steps does
    not change the training, and a seeded check gives the same number every time."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:  # uniform in the L2 ball
        g = torch.randn_like(x)
        r = torch.rand(x.shape[0], *[1] * (x.dim() - 1), device=x.device) ** (1.0 / x[0].numel())
        delta = g / _flat_norm(g) * r * eps
    return project(delta, x, eps, norm)


def _step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta + step_size * grad.sign()
    return delta + step_size * grad / _flat_norm(grad)


def ce_loss(model, y: torch.Tensor) -> LossFn:
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def _linf_bounds(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linf eps-ball around x intersected with [0, 1], as per-pixel bounds: clamping to them is
    the projection onto both at once (the two boxes always overlap, at x itself)."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def _ascend(x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float, norm: str,
            bounds: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One projected ascent step; updates the detached `x_adv` in place where it can."""
    if norm == "Linf":
        return x_adv.add_(grad.sign_(), alpha=step_size).clamp_(*bounds)
    delta = _step(x_adv - x, grad, step_size, norm)
    delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp_(0.0, 1.0)  # clipping to [0, 1] moves each pixel towards x: stays in the ball


def _autocast(x: torch.Tensor):
    if BF16_ON_GPU and x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pgd_loss(loss_fn: LossFn, x: torch.Tensor, eps: float, step_size: float, steps: int,
             norm: str = "Linf", rand_init: bool = True, restarts: int = 1,
             success: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Maximise `loss_fn` over the eps-ball around x with projected gradient ascent.

    With several restarts, each example keeps the restart where `success` (per-example bool, e.g.
    misclassified) first holds, else the one with the highest final loss: the pointwise worst case.
    """
    x = x.detach()
    bounds = _linf_bounds(x, eps) if norm == "Linf" else None
    best_adv, best_loss = x.clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_hit = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        x_adv = x + random_start(x, eps, norm) if rand_init else x.clone()
        # x + (projected delta) can round a hair outside [0, 1]
        x_adv = x_adv.clamp_(*bounds) if bounds is not None else x_adv.clamp_(0.0, 1.0)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with _autocast(x):
                loss = loss_fn(x_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _ascend(x_adv.detach(), x, grad, step_size, eps, norm, bounds)
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            loss = loss_fn(x_adv).float()
            hit = success(x_adv) if success is not None else torch.zeros_like(best_hit)
            take = (hit & ~best_hit) | (~best_hit & ~hit & (loss > best_loss))
            best_adv[take], best_loss[take] = x_adv[take], loss[take]
            best_hit |= hit
    return best_adv


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
        norm: str = "Linf", rand_init: bool = True, restarts: int = 1) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al.); the attack the evaluation reports."""
    # Which restart fooled the model is judged by the model itself, not by its fast copy.
    success = (lambda xa: model(xa).argmax(1) != y) if restarts > 1 else None
    return pgd_loss(ce_loss(attack_view(model), y), x, eps, step_size, steps, norm, rand_init, restarts, success)


def pgd_until_fooled(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
                     norm: str = "Linf", rand_init: bool = True, restarts: int = 1) -> torch.Tensor:
    """`pgd` for measuring robust accuracy: an image leaves the attack at the first iterate the model
    misclassifies (a point of the threat model, so the image is broken whatever later steps would
    do), and a restart attacks only the images no earlier restart fooled. It finds every image `pgd`
    breaks at its final iterate and those it fools on the way and then loses, in fewer passes the
    more images break early (large eps, weak models, restarts). Fooling is judged by the model
    itself; its fast copy (attack_view) only proposes. Images never fooled end on the final iterate
    of the restart with the highest loss."""
    view = attack_view(model)
    x = x.detach()
    out = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_loss = torch.full((len(x),), -float("inf"), device=x.device)
    for _ in range(restarts):
        idx = (~fooled).nonzero().flatten()
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]
        bounds = _linf_bounds(xs, eps) if norm == "Linf" else None
        xa = xs + random_start(xs, eps, norm) if rand_init else xs.clone()
        xa = xa.clamp_(*bounds) if bounds is not None else xa.clamp_(0.0, 1.0)
        for step in range(steps + 1):
            last = step == steps
            xa.requires_grad_(not last)
            with torch.enable_grad() if not last else torch.no_grad():
                logits = view(xa)
            hit = logits.detach().argmax(1) != ys
            if hit.any():
                with torch.no_grad():  # confirmed by the model, not its copy
                    cand = hit.nonzero().flatten()
                    cand = cand[model(xa[cand].detach()).argmax(1) != ys[cand]]
                out[idx[cand]], fooled[idx[cand]] = xa[cand].detach(), True
                hit = torch.zeros_like(hit)
                hit[cand] = True
            if last:
                loss = F.cross_entropy(logits.float(), ys, reduction="none")
                take = ~hit & (loss > best_loss[idx])
                out[idx[take]], best_loss[idx[take]] = xa[take].detach(), loss[take]
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, ys, reduction="sum"), xa)
            keep = ~hit  # the fooled leave before the step: later steps cost only the rest
            idx, xs, ys, grad = idx[keep], xs[keep], ys[keep], grad[keep]
            if bounds is not None:
                bounds = tuple(b[keep] for b in bounds)
            if len(idx) == 0:
                break
            xa = _ascend(xa.detach()[keep], xs, grad, step_size, eps, norm, bounds)
    return out


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf",
         rand_init: bool = False, step_size: Optional[float] = None) -> torch.Tensor:
    """One gradient step: FGSM (Goodfellow et al.), or FGSM-RS (Wong et al.) with a random start and
    step 1.25 * eps."""
    return pgd_loss(ce_loss(attack_view(model), y), x, eps, step_size or eps, 1, norm, rand_init)


# ----------------------------------------------------------------------------- fast eval-mode copy
_views: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> tuple:
    """Changes whenever a weight or buffer is replaced or updated in place (optimiser steps,
    load_state_dict and BatchNorm statistics all bump a tensor's version)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def attack_view(model):
    """What an attack differentiates: for a model in eval mode, a cached private copy with BatchNorm
    folded into its convolutions, weights that need no gradient and, on CPU, channels-last layout;
    the model itself when it is training, is not an nn.Module, or cannot be traced."""
    if not FAST_EVAL_COPY or not isinstance(model, nn.Module) or any(m.training for m in model.modules()):
        return model
    key = _state_key(model)
    cached = _views.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        view = _fast_copy(model)
    except Exception:  # not traceable by torch.fx (data-dependent control flow, say): attack it as is
        view = model
    _views[model] = (key, view)
    return view


def _fast_copy(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    view = fuse(model, inplace=False)  # traces a deep copy; folds each Conv -> BatchNorm pair
    for p in view.parameters():
        p.requires_grad_(False)
    device = next(iter(view.parameters()), torch.empty(0)).device
    if device.type == "cpu":  # oneDNN's convolutions run faster on NHWC weights
        view = view.to(memory_format=torch.channels_last)
    return view.eval()


def feature_pgd(feature_fn, x: torch.Tensor, eps: float, step_size: float, steps: int, norm: str = "Linf",
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PGD in feature space: push `feature_fn(x)` towards `target` (a fixed pattern), or, without a
    target, as far as possible from the clean features. The target-agnostic transfer attack of
    Renofeation crafts its examples this way on the public source model."""
    with torch.no_grad():
        clean = feature_fn(x)
    if target is None:
        loss_fn = lambda xa: (feature_fn(xa) - clean).flatten(1).pow(2).sum(1)
    else:
        loss_fn = lambda xa: -(feature_fn(xa) - target).flatten(1).pow(2).sum(1)
    return pgd_loss(loss_fn, x, eps, step_size, steps, norm, rand_init=True)
