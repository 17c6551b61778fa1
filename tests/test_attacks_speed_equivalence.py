"""The optimised attacks (fused Linf projection, eval-mode fast copy with BatchNorm folded in) give
the same adversarial examples as a straightforward PGD, up to float rounding (issue 8)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rt_testlib import digits, trained_digits_net
from robust_transfer import attacks


def _flat_norm(v):
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def reference_pgd(model, x, y, eps, step, steps, norm):
    """Textbook PGD (Madry et al.) on the model itself: a perturbation delta, projected onto the
    eps-ball, then x + delta clipped to [0, 1]; the same random start draw as attacks.random_start."""
    def project(d):
        d = d.clamp(-eps, eps) if norm == "Linf" else d * (eps / _flat_norm(d)).clamp(max=1.0)
        return (x + d).clamp(0, 1) - x

    if norm == "Linf":
        d = torch.empty_like(x).uniform_(-eps, eps)
    else:
        g = torch.randn_like(x)
        r = torch.rand(x.shape[0], 1, 1, 1) ** (1.0 / x[0].numel())
        d = g / _flat_norm(g) * r * eps
    d = project(d)
    for _ in range(steps):
        d.requires_grad_(True)
        loss = F.cross_entropy(model(x + d), y, reduction="none").sum()
        (g,) = torch.autograd.grad(loss, d)
        d = project(d.detach() + (step * g.sign() if norm == "Linf" else step * g / _flat_norm(g)))
    return (x + d).detach()


@pytest.fixture(scope="module")
def model_and_data():
    x, y = digits()["test"]
    return trained_digits_net(), x[:300], y[:300]


@torch.no_grad()
def _pred(net, x):
    return net(x).argmax(1)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("norm,eps,step", [("Linf", 0.1, 0.025), ("L2", 0.5, 0.15)])
def test_optimised_pgd_matches_the_reference(model_and_data, fast, norm, eps, step, monkeypatch):
    net, x, y = model_and_data
    monkeypatch.setattr(attacks, "FAST_EVAL_COPY", fast)
    torch.manual_seed(3)
    ours = attacks.pgd(net, x, y, eps, step, 10, norm)
    torch.manual_seed(3)
    ref = reference_pgd(net, x, y, eps, step, 10, norm)
    assert ours.min() >= 0 and ours.max() <= 1
    diff = (ours - ref).abs()
    if norm == "Linf":
        # Rounding flips the sign of a near-zero gradient now and then; everything else is equal.
        assert (diff > 1e-5).float().mean() < 0.01, (diff > 1e-5).float().mean()
        assert (ours - x).abs().max() <= eps + 1e-6
    else:
        # L2 steps follow the gradient's direction, so rounding moves every pixel a little.
        per_image = diff.flatten(1).norm(dim=1)
        assert per_image.mean() < 0.05 * eps, per_image.mean()
        assert (ours - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    clean = _pred(net, x) == y
    robust_ours, robust_ref = (_pred(net, ours) == y), (_pred(net, ref) == y)
    assert robust_ref.sum() < clean.sum() - 20, "the attack should break the model: nothing compared otherwise"
    assert (robust_ours != robust_ref).float().mean() <= 0.02
    assert abs(robust_ours.float().mean() - robust_ref.float().mean()) <= 0.01


def test_fast_copy_is_the_same_function_without_batchnorm(model_and_data):
    net, x, _ = model_and_data
    view = attacks.attack_view(net)
    assert view is not net
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in view.modules())
    assert not any(p.requires_grad for p in view.parameters())
    with torch.no_grad():
        torch.testing.assert_close(view(x), net(x), atol=1e-4, rtol=1e-4)
    assert attacks.attack_view(net) is view  # cached while the weights stay the same
    assert all(m.training is False for m in net.modules()), "the model's own mode is untouched"


def test_fast_copy_follows_weight_updates(model_and_data):
    """A stale copy would attack last epoch's weights: every in-place update or reload refreshes it."""
    net, x, y = model_and_data
    before = attacks.attack_view(net)
    with torch.no_grad():
        net.head.weight.mul_(-1.0)  # an in-place update (as an optimiser step makes)
    after = attacks.attack_view(net)
    assert after is not before
    with torch.no_grad():
        torch.testing.assert_close(after(x), net(x), atol=1e-4, rtol=1e-4)
    net.load_state_dict(trained_digits_net().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(attacks.attack_view(net)(x), net(x), atol=1e-4, rtol=1e-4)


def test_training_model_is_attacked_as_is(model_and_data):
    """Adversarial training attacks the model in train mode (batch statistics): no copy is made."""
    net, x, y = model_and_data
    net.train()
    try:
        assert attacks.attack_view(net) is net
        running = net.blocks.conv1[1].running_mean.clone()
        attacks.pgd(net, x[:64], y[:64], 0.1, 0.025, 2)
        assert not torch.equal(running, net.blocks.conv1[1].running_mean), "train-mode BN should have run"
    finally:
        net.eval()
