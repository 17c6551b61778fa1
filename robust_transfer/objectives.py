"""One function per training objective, all with the same signature.

    objective(net, batch, ctx) -> Step(loss, logits, passes)

`net` is the unwrapped network (attacks use it with input gradients only); `batch` is a dict with
`x` (raw [0, 1] images), `y` and, where the method caches them, teacher outputs; `ctx` carries the
threat model, the method's options, the frozen teacher and any learnable auxiliary modules.
`passes` counts forward+backward passes through the network for this batch (PGD-K training costs
K+1), which is how the pipeline reports compute.
Formulas and defaults: shared/DESIGN.md, Methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks
from .config import ThreatConfig


@dataclass
class Step:
    loss: torch.Tensor
    logits: torch.Tensor  # on the images the loss trains on (adversarial ones for AT), for accuracy
    passes: float


@dataclass
class Context:
    threat: ThreatConfig
    options: dict[str, Any] = field(default_factory=dict)
    teacher: Optional[nn.Module] = None  # frozen, eval mode
    aux: nn.ModuleDict = field(default_factory=nn.ModuleDict)  # learnable extras (projections)
    head_only: bool = False  # LwF's first phase: only the head trains


def _pgd_train(net, x, y, threat: ThreatConfig):
    return attacks.pgd(net, x, y, threat.eps, threat.step_size, threat.train_steps, threat.norm)


def _fgsm_rs_train(net, x, y, ctx: Context):
    """Fast AT's examples: one signed step of alpha_ratio * eps (1.25) from a uniform random start."""
    t = ctx.threat
    return attacks.fgsm(net, x, y, t.eps, t.norm, rand_init=True, step_size=ctx.options.get("alpha_ratio", 1.25) * t.eps)


def natural(net, batch, ctx: Context) -> Step:
    """Cross-entropy on clean images: natural training, fine-tuning, probes."""
    logits = net(batch["x"])
    return Step(F.cross_entropy(logits, batch["y"]), logits, 1)


def probe(net, batch, ctx: Context) -> Step:
    """A new head on cached frozen features (`z`, or `h`: the input of the last k blocks) from the
    extract stage: no backbone pass. The composed model predicts exactly what the probe does."""
    if "h" in batch:
        logits = net.head(net.tail(batch["h"], ctx.options["k"]))
    else:
        logits = net.head(batch["z"])
    return Step(F.cross_entropy(logits, batch["y"]), logits, 1)


def pgd_at(net, batch, ctx: Context) -> Step:
    """Madry et al.: CE on PGD-K examples from a random start."""
    x_adv = _pgd_train(net, batch["x"], batch["y"], ctx.threat)
    logits = net(x_adv)
    return Step(F.cross_entropy(logits, batch["y"]), logits, ctx.threat.train_steps + 1)


def trades(net, batch, ctx: Context) -> Step:
    """Zhang et al.: CE(clean) + beta * KL(p(x) || p(x')), x' maximising the KL from x + 0.001 N(0, 1)."""
    x, y, t = batch["x"], batch["y"], ctx.threat
    with torch.no_grad():
        p_clean = F.softmax(net(x), 1)
    kl = lambda xa: F.kl_div(F.log_softmax(net(xa), 1), p_clean, reduction="none").sum(1)
    # The KL's gradient vanishes at x itself, so the ascent starts from a random point of the ball.
    x_adv = attacks.pgd_loss(kl, x, t.eps, t.step_size, t.train_steps, t.norm, rand_init=True)
    logits_clean, logits_adv = net(x), net(x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")
    loss = F.cross_entropy(logits_clean, y) + ctx.options.get("beta", 6.0) * robust
    return Step(loss, logits_adv, t.train_steps + 2)


def fgsm_rs(net, batch, ctx: Context) -> Step:
    """Wong et al. fast AT: one signed step of alpha = 1.25 eps from a uniform random start.
    The engine's guard stops it when a PGD check collapses (catastrophic overfitting)."""
    x_adv = _fgsm_rs_train(net, batch["x"], batch["y"], ctx)
    logits = net(x_adv)
    return Step(F.cross_entropy(logits, batch["y"]), logits, 2)


def cartl_fdm(net, batch, ctx: Context) -> Step:
    """CARTL pre-training: CE(g(f(x')), y) + lam * sum_batch ||h(x') - h(x)||_2 / sqrt(d), with h the
    input of the last k blocks (the part transfer will freeze). Summed, not averaged, over the batch,
    as in the authors' code: it fixes what a given lam means. x' is PGD-K as in the paper, or with
    option attack=fgsm_rs fast AT's single step (the CPU default pipeline's choice, as for its robust source)."""
    x, y, k, t = batch["x"], batch["y"], ctx.options.get("k", 1), ctx.threat
    if ctx.options.get("attack", "pgd") == "fgsm_rs":  # x' from fast AT's step: 2 passes instead of K + 1
        x_adv = _fgsm_rs_train(net, x, y, ctx)
        attack_passes = 1
    else:
        x_adv = _pgd_train(net, x, y, t)
        attack_passes = t.train_steps
    h_adv, h_clean = net.trunk(x_adv, k), net.trunk(x, k)
    logits = net.head(net.tail(h_adv, k))
    d = h_adv[0].numel()
    fdm = (h_adv - h_clean).flatten(1).norm(dim=1).sum() / math.sqrt(d)
    return Step(F.cross_entropy(logits, y) + ctx.options.get("lam", 0.005) * fdm, logits, attack_passes + 2)


def lwf(net, batch, ctx: Context) -> Step:
    """Shafahi et al.: CE + lam * mean_batch ||z(x) - z0(x)||_1, z0 the frozen robust source's penultimate
    features on clean target images (cached by the extract stage, passed as batch['z0'])."""
    if ctx.head_only:  # no graph through the backbone: its weights get no gradient, so no decay or momentum either
        with torch.no_grad():
            z = net.features(batch["x"])
    else:
        z = net.features(batch["x"])
    z0 = batch["z0"] if "z0" in batch else _teacher_features(ctx, batch["x"])
    logits = net.head(z)
    penalty = (z - z0).abs().flatten(1).sum(1).mean()
    return Step(F.cross_entropy(logits, batch["y"]) + ctx.options.get("lam", 0.005) * penalty, logits, 1)


def nfd(net, batch, ctx: Context) -> Step:
    """Renofeation (Chin et al.): CE + lam * sum over stages of MSE(phi_l(drop(s_l(x))), t_l(x)), with
    spatial dropout on every student stage output, phi_l a learnable 1x1 projection, t_l the frozen
    pretrained model's stage outputs."""
    x, p = batch["x"], ctx.options.get("dropout", 0.1)
    with torch.no_grad():
        targets = ctx.teacher.stages(x)
    h = net.normalize(x)
    dist = 0.0
    for i, block in enumerate(net.blocks):
        h = block(h)
        h = F.dropout2d(h, p, net.training) if h.dim() == 4 else F.dropout(h, p, net.training)
        if str(i) in ctx.aux:
            dist = dist + F.mse_loss(ctx.aux[str(i)](h), targets[i])
    logits = net.head(h)
    return Step(F.cross_entropy(logits, batch["y"]) + ctx.options.get("lam", 1.0) * dist, logits, 1)


def rrm(net, batch, ctx: Context) -> Step:
    """Vaishnavi et al.: w_ce * CE(student(x), y) - mean cos(z_s(x), z_t(x)), on clean inputs; z_s goes
    through a learnable linear projection when the widths differ."""
    z_s = net.features(batch["x"])
    with torch.no_grad():
        z_t = ctx.teacher.features(batch["x"])
    proj = ctx.aux["proj"] if "proj" in ctx.aux else nn.Identity()
    cos = F.cosine_similarity(proj(z_s), z_t, dim=1).mean()
    logits = net.head(z_s)
    return Step(ctx.options.get("w_ce", 0.005) * F.cross_entropy(logits, batch["y"]) - cos, logits, 1)


def _teacher_features(ctx: Context, x):
    with torch.no_grad():
        return ctx.teacher.features(x)


OBJECTIVES: dict[str, Callable[..., Step]] = {
    "natural": natural,
    "probe": probe,
    "pgd_at": pgd_at,
    "trades": trades,
    "fgsm_rs": fgsm_rs,
    "cartl": cartl_fdm,
    "lwf": lwf,
    "nfd": nfd,
    "rrm": rrm,
}


# ----------------------------------------------------------------------------- constraints
@torch.no_grad()
def spectral_normalize_(modules, beta: float, state: dict, power_iters: int = 1, tol: float = 1e-4,
                        max_iters: int = 100) -> None:
    """CARTL's non-expansive constraint: W <- beta * W / sigma(W) for every Conv/Linear weight, sigma
    estimated by power iteration on the weight reshaped to 2-D (one persistent vector per weight).
    At least `power_iters` iterations (CARTL's code does one), then on until the estimate moves less
    than `tol` relatively: power iteration underestimates sigma, and after a large step one warm
    iteration can leave sigma(W) several percent above beta, which breaks the bound the method is for."""
    for m in modules:
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight.reshape(m.weight.shape[0], -1)  # a copy when the weight is channels-last
        u = state.get(id(m))
        if u is None:
            u = F.normalize(torch.randn(w.shape[0], device=w.device), dim=0)
        sigma = w.new_zeros(())
        for i in range(max_iters):
            v = F.normalize(w.t() @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
            prev, sigma = sigma, torch.dot(u, w @ v)
            if i + 1 >= power_iters and abs(sigma - prev) <= tol * abs(sigma):
                break
        state[id(m)] = u
        if sigma > 0:
            m.weight.mul_(beta / sigma)
