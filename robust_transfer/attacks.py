"""FGSM and PGD (Linf and L2, random start, restarts) and feature-space PGD.

Attacks take raw [0, 1] images and a model that normalises internally; they never change the
model's train/eval mode (callers choose: evaluation attacks run in eval mode). Gradients are taken
with `torch.autograd.grad` with respect to the input only, so no weight gradients are computed or
accumulated during attack steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

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


def pgd_loss(loss_fn: LossFn, x: torch.Tensor, eps: float, step_size: float, steps: int,
             norm: str = "Linf", rand_init: bool = True, restarts: int = 1,
             success: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Maximise `loss_fn` over the eps-ball around x with projected gradient ascent.

    With several restarts, each example keeps the restart where `success` (per-example bool, e.g.
    misclassified) first holds, else the one with the highest final loss: the pointwise worst case.
    """
    x = x.detach()
    best_adv, best_loss = x.clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_hit = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = random_start(x, eps, norm) if rand_init else torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(x + delta)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            delta = project(_step(delta.detach(), grad, step_size, norm), x, eps, norm)
        x_adv = (x + delta).detach()
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            loss = loss_fn(x_adv)
            hit = success(x_adv) if success is not None else torch.zeros_like(best_hit)
            take = (hit & ~best_hit) | (~best_hit & ~hit & (loss > best_loss))
            best_adv[take], best_loss[take] = x_adv[take], loss[take]
            best_hit |= hit
    return best_adv


def pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
        norm: str = "Linf", rand_init: bool = True, restarts: int = 1) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy (Madry et al.); the attack the evaluation reports."""
    success = (lambda xa: model(xa).argmax(1) != y) if restarts > 1 else None
    return pgd_loss(ce_loss(model, y), x, eps, step_size, steps, norm, rand_init, restarts, success)


def fgsm(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf",
         rand_init: bool = False, step_size: Optional[float] = None) -> torch.Tensor:
    """One gradient step: FGSM (Goodfellow et al.), or FGSM-RS (Wong et al.) with a random start and
    step 1.25 * eps."""
    return pgd_loss(ce_loss(model, y), x, eps, step_size or eps, 1, norm, rand_init)


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
