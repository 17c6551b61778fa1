"""Every training objective on a tiny model and real images: finite loss, finite gradients, the
method's own term behaving as its formula says (issues 2 and 3)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rt_testlib import digits, trained_digits_net
from robust_transfer.config import OBJECTIVE_OPTIONS, ThreatConfig
from robust_transfer.nets import build_net
from robust_transfer.objectives import OBJECTIVES, Context, spectral_normalize_

THREAT = ThreatConfig(norm="Linf", eps=0.1, step_size=0.025, train_steps=3, eval_steps=5)


@pytest.fixture(scope="module")
def batch():
    x, y = digits()["train"]
    return {"x": x[:32], "y": y[:32]}


def _context(name: str, net, teacher) -> Context:
    options = dict(OBJECTIVE_OPTIONS.get(name, {}))
    aux = nn.ModuleDict()
    if name == "nfd":
        with torch.no_grad():
            outs = teacher.stages(torch.rand(2, 1, 8, 8))
        for i, o in enumerate(outs):
            aux[str(i)] = nn.Conv2d(o.shape[1], o.shape[1], 1) if o.dim() == 4 else nn.Linear(o.shape[1], o.shape[1])
    if name == "rrm" and net.feature_dim != teacher.feature_dim:
        aux["proj"] = nn.Linear(net.feature_dim, teacher.feature_dim, bias=False)
    if name == "probe":
        options["k"] = 2
    return Context(THREAT, options, teacher=teacher, aux=aux)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_gives_finite_loss_and_gradients(name, batch):
    torch.manual_seed(0)
    teacher = trained_digits_net()
    for p in teacher.parameters():
        p.requires_grad_(False)
    net = build_net("small_cnn", 1, 10, 8, width=2 if name == "rrm" else 1).train()
    ctx = _context(name, net, teacher)
    b = dict(batch)
    if name == "probe":  # cached features of the frozen source: the head and the last k blocks train
        with torch.no_grad():
            b["h"] = teacher.trunk(b["x"], 2)
    step = OBJECTIVES[name](net, b, ctx)
    assert step.loss.dim() == 0 and torch.isfinite(step.loss), step.loss
    assert step.logits.shape == (32, 10) and step.passes >= 1
    step.loss.backward()
    params = [p for p in list(net.parameters()) + list(ctx.aux.parameters())]
    grads = [p.grad for p in params if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    if name in ("nfd", "rrm") and len(ctx.aux):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.aux.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_adversarial_objectives_count_their_attack_passes(batch):
    net = build_net("small_cnn", 1, 10, 8)
    assert OBJECTIVES["natural"](net, batch, Context(THREAT)).passes == 1
    assert OBJECTIVES["pgd_at"](net, batch, Context(THREAT)).passes == THREAT.train_steps + 1
    assert OBJECTIVES["fgsm_rs"](net, batch, Context(THREAT)).passes == 2


def test_pgd_at_trains_on_adversarial_images(batch):
    """The same weights score worse on PGD-AT's images than on the clean ones."""
    net = trained_digits_net()
    torch.manual_seed(0)
    clean = OBJECTIVES["natural"](net, batch, Context(THREAT)).loss
    adv = OBJECTIVES["pgd_at"](net, batch, Context(THREAT)).loss
    assert adv > clean + 0.1


def test_trades_with_beta_zero_is_clean_cross_entropy(batch):
    net = trained_digits_net()
    step = OBJECTIVES["trades"](net, batch, Context(THREAT, {"beta": 0.0}))
    assert torch.allclose(step.loss, F.cross_entropy(net(batch["x"]), batch["y"]))
    torch.manual_seed(0)
    robust = OBJECTIVES["trades"](net, batch, Context(THREAT, {"beta": 6.0})).loss
    assert robust > step.loss  # the KL term is positive at a maximising x'


def test_cartl_feature_distance_term(batch):
    """CARTL's FDM: lam * sum over the batch of ||h(x') - h(x)||_2 / sqrt(d) on top of adversarial CE."""
    net = trained_digits_net()
    torch.manual_seed(3)
    plain = OBJECTIVES["cartl"](net, batch, Context(THREAT, {"lam": 0.0, "k": 1})).loss
    torch.manual_seed(3)
    with_fdm = OBJECTIVES["cartl"](net, batch, Context(THREAT, {"lam": 1.0, "k": 1})).loss
    torch.manual_seed(3)
    double = OBJECTIVES["cartl"](net, batch, Context(THREAT, {"lam": 2.0, "k": 1})).loss
    fdm = with_fdm - plain
    assert fdm > 0
    assert torch.allclose(double - plain, 2 * fdm, rtol=1e-4)  # linear in lam
    # summed, not averaged, over the batch: half the batch gives about half the term
    half = {k: v[:16] for k, v in batch.items()}
    torch.manual_seed(3)
    a = OBJECTIVES["cartl"](net, half, Context(THREAT, {"lam": 1.0, "k": 1})).loss
    torch.manual_seed(3)
    b = OBJECTIVES["cartl"](net, half, Context(THREAT, {"lam": 0.0, "k": 1})).loss
    assert 0.25 * fdm < (a - b) < 0.75 * fdm


def test_cartl_with_fast_at_examples_costs_three_passes_and_keeps_its_feature_term(batch):
    """attack=fgsm_rs: x' from one FGSM-RS step (2 passes for CE, 1 for h(x)) instead of PGD-K."""
    net = trained_digits_net()
    torch.manual_seed(3)
    fast = OBJECTIVES["cartl"](net, batch, Context(THREAT, {"lam": 1.0, "k": 1, "attack": "fgsm_rs"}))
    torch.manual_seed(3)
    plain = OBJECTIVES["cartl"](net, batch, Context(THREAT, {"lam": 0.0, "k": 1, "attack": "fgsm_rs"}))
    assert fast.passes == 3 and OBJECTIVES["cartl"](net, batch, Context(THREAT, {"k": 1})).passes == THREAT.train_steps + 2
    assert fast.loss > plain.loss  # the feature-distance term is there
    with torch.no_grad():  # and x' is an attack: lower accuracy than on the clean images
        assert (fast.logits.argmax(1) == batch["y"]).float().mean() < (net(batch["x"]).argmax(1) == batch["y"]).float().mean()


def _lwf_penalty(net, batch, z0, lam=1.0):
    ctx = Context(THREAT, {"lam": lam})
    step = OBJECTIVES["lwf"](net, dict(batch, z0=z0), ctx)
    return (step.loss - F.cross_entropy(step.logits, batch["y"])).item()


def test_lwf_term_is_zero_from_the_source_and_grows_as_features_move(batch):
    source = trained_digits_net()
    with torch.no_grad():
        z0 = source.features(batch["x"])
    net = copy.deepcopy(source)
    net.head = nn.Linear(net.feature_dim, 5)  # a new head for the target task: the penalty ignores it
    target = dict(batch, y=batch["y"] % 5)
    assert _lwf_penalty(net, target, z0) == pytest.approx(0.0, abs=1e-6)
    # the same without the cache: the frozen teacher computes z0
    step = OBJECTIVES["lwf"](net, target, Context(THREAT, {"lam": 1.0}, teacher=source))
    assert torch.allclose(step.loss, F.cross_entropy(step.logits, target["y"]), atol=1e-6)

    torch.manual_seed(0)
    direction = {n: torch.randn_like(p) for n, p in net.blocks.named_parameters()}
    penalties = []
    for scale in (0.01, 0.03, 0.1):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in moved.blocks.named_parameters():
                p.add_(scale * direction[n] * p.abs().mean())
        penalties.append(_lwf_penalty(moved, target, z0))
    assert 0 < penalties[0] < penalties[1] < penalties[2], penalties
    # the weight multiplies the penalty
    assert _lwf_penalty(moved, target, z0, lam=0.5) == pytest.approx(0.5 * penalties[2], rel=1e-4)


def test_lwf_head_only_phase_trains_only_the_head(batch):
    """Shafahi et al.'s first phase: the head alone trains. The backbone gets no gradient at all, not
    even from the penalty, so weight decay and momentum leave it alone too."""
    source = trained_digits_net()
    net = copy.deepcopy(source)
    with torch.no_grad():
        z0 = source.features(batch["x"]) + 0.5  # features away from the source's: a non-zero penalty
    step = OBJECTIVES["lwf"](net, dict(batch, z0=z0), Context(THREAT, {"lam": 1.0}, head_only=True))
    step.loss.backward()
    assert net.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.blocks.parameters())
    net.zero_grad(set_to_none=True)
    OBJECTIVES["lwf"](net, dict(batch, z0=z0), Context(THREAT, {"lam": 1.0})).loss.backward()
    assert all(p.grad is not None for p in net.blocks.parameters())  # the second phase trains everything


def test_rrm_rewards_matching_the_teacher(batch):
    teacher = trained_digits_net()
    ctx = Context(THREAT, {"w_ce": 0.0}, teacher=teacher)
    assert OBJECTIVES["rrm"](copy.deepcopy(teacher), batch, ctx).loss.item() == pytest.approx(-1.0, abs=1e-5)
    stranger = build_net("small_cnn", 1, 10, 8)
    assert OBJECTIVES["rrm"](stranger, batch, ctx).loss.item() > -0.99


def test_nfd_distance_uses_every_projected_stage(batch):
    teacher = trained_digits_net()
    student = build_net("small_cnn", 1, 10, 8).eval()  # eval: no dropout noise, a deterministic loss
    ctx = _context("nfd", student, teacher)
    ctx.options["dropout"] = 0.0
    step0 = OBJECTIVES["nfd"](student, batch, Context(THREAT, {"lam": 0.0, "dropout": 0.0}, teacher, ctx.aux))
    step1 = OBJECTIVES["nfd"](student, batch, Context(THREAT, {"lam": 1.0, "dropout": 0.0}, teacher, ctx.aux))
    with torch.no_grad():
        s, t = student.stages(batch["x"]), teacher.stages(batch["x"])
        expected = sum(F.mse_loss(ctx.aux[str(i)](s[i]), t[i]) for i in range(len(s)))
    assert torch.allclose(step1.loss - step0.loss, expected, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.4, 1.0])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spectral_normalisation_bounds_every_weight(beta, layout):
    """Power iteration underestimates sigma, so the bound holds up to the estimate's error: converged
    on a weight's first projection, then one iteration per step with a persistent vector (as CARTL
    does) keeps it small while the weights move by optimiser-sized steps. The engine trains with
    channels-last convolution weights: the bound is on the same matrix in either layout."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(8, 16, 3), nn.Linear(20, 10), nn.Conv2d(3, 4, 1), nn.Linear(128, 5), nn.Conv2d(32, 64, 3)]
    layers = [m.to(memory_format=layout) for m in layers]
    with torch.no_grad():
        for m in layers:
            m.weight.mul_(5.0)
    state: dict = {}
    sigmas = []
    for _ in range(20):
        with torch.no_grad():
            for m in layers:  # an optimiser-sized step: 2% of the weights' scale
                m.weight.add_(0.02 * m.weight.abs().mean() * torch.randn_like(m.weight))
        spectral_normalize_(layers, beta, state, power_iters=1)
        sigmas.append([torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord=2).item()
                       for m in layers])
    for step, row in enumerate(sigmas):
        assert all(beta * 0.98 <= sigma <= beta * 1.02 for sigma in row), (step, row)
