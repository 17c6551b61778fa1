"""FGSM and PGD on a small CNN trained on real data (scikit-learn digits) (issue 2)."""
from __future__ import annotations

import pytest
import torch

from rt_testlib import digits, trained_digits_net
from robust_transfer import attacks


@torch.no_grad()
def _acc(net, x, y):
    return (net(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def model_and_data():
    x, y = digits()["test"]
    return trained_digits_net(), x, y


def test_pgd_is_stronger_than_fgsm(model_and_data):
    net, x, y = model_and_data
    torch.manual_seed(0)
    clean = _acc(net, x, y)
    eps = 0.1
    fgsm_acc = _acc(net, attacks.fgsm(net, x, y, eps), y)
    pgd_acc = _acc(net, attacks.pgd(net, x, y, eps, eps / 4, 20), y)
    assert clean > 0.9, f"the fixture model did not train: clean accuracy {clean:.3f}"
    assert fgsm_acc < clean - 0.05, (clean, fgsm_acc)
    assert pgd_acc < fgsm_acc - 0.03, f"PGD-20 {pgd_acc:.3f} is not clearly below FGSM {fgsm_acc:.3f}"


def test_more_pgd_steps_do_not_help_the_model(model_and_data):
    net, x, y = model_and_data
    torch.manual_seed(0)
    few = _acc(net, attacks.pgd(net, x, y, 0.1, 0.025, 2), y)
    many = _acc(net, attacks.pgd(net, x, y, 0.1, 0.025, 20), y)
    assert many <= few


@pytest.mark.parametrize("norm,eps,step", [("Linf", 0.1, 0.05), ("L2", 0.5, 0.3)])
def test_perturbations_stay_in_the_eps_ball_and_the_image_range(model_and_data, norm, eps, step):
    net, x, y = model_and_data
    x = x[:200]
    y = y[:200]
    torch.manual_seed(1)
    advs = {
        "pgd": attacks.pgd(net, x, y, eps, step, 10, norm),
        "pgd_restarts": attacks.pgd(net, x, y, eps, step, 3, norm, restarts=3),
        "pgd_until_fooled": attacks.pgd_until_fooled(net, x, y, eps, step, 10, norm, restarts=2),
        "fgsm": attacks.fgsm(net, x, y, eps, norm),
        "fgsm_rs": attacks.fgsm(net, x, y, eps, norm, rand_init=True, step_size=1.25 * eps),
        "random_start": x + attacks.random_start(x, eps, norm),
        "feature_pgd": attacks.feature_pgd(net.features, x, eps, step, 5, norm),
    }
    for name, x_adv in advs.items():
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
        assert size.max().item() <= eps + 1e-5, (name, size.max().item())
        assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0, name
        assert size.mean().item() > 0.3 * eps, f"{name} barely moved: the test would not see a projection bug"
    # many pixels of digits are 0 or 1: the [0, 1] clipping is active, not vacuous
    linf = (advs["pgd"] - x).abs()
    assert ((x == 0) & (linf == 0)).any()


def test_restarts_keep_the_worst_case_per_example(model_and_data):
    """With restarts the attack keeps, for each image, a restart that fooled the model if any did; the
    first restart draws the same random start as a single run with the same seed."""
    net, x, y = model_and_data
    x, y = x[:300], y[:300]
    torch.manual_seed(7)
    single = attacks.pgd(net, x, y, 0.08, 0.02, 3)
    torch.manual_seed(7)
    multi = attacks.pgd(net, x, y, 0.08, 0.02, 3, restarts=4)
    with torch.no_grad():
        fooled_single = net(single).argmax(1) != y
        fooled_multi = net(multi).argmax(1) != y
    assert torch.all(fooled_multi[fooled_single])
    assert fooled_multi.sum() > fooled_single.sum()


def test_attacks_leave_the_model_alone(model_and_data):
    net, x, y = model_and_data
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attacks.pgd(net, x[:64], y[:64], 0.1, 0.025, 3)
    assert net.training, "an attack changed the model's train/eval mode"
    assert all(p.grad is None for p in net.parameters()), "an attack accumulated weight gradients"
    net.eval()
    after = net.state_dict()
    # BN running statistics move in train mode; weights never do
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_zero_eps_is_the_identity(model_and_data):
    net, x, y = model_and_data
    assert torch.equal(attacks.pgd(net, x[:32], y[:32], 0.0, 0.0, 3), x[:32])


def test_pgd_until_fooled_breaks_what_pgd_breaks_with_fewer_passes(model_and_data):
    """The evaluation's PGD leaves an image at the first iterate that fools the model: it must break
    at least the images plain PGD breaks at its final iterate (same random start, same steps), every
    image it calls broken must be misclassified by the model itself, and it must attack fewer images
    per step as they break (on the fast copy, where the passes go)."""
    net, x, y = model_and_data
    net.eval()
    x, y = x[:300], y[:300]
    counted = []
    view = attacks.attack_view(net)
    hook = view.register_forward_pre_hook(lambda m, args: counted.append(len(args[0])))
    try:
        for eps in (0.05, 0.15):
            counted.clear()
            torch.manual_seed(3)
            plain = attacks.pgd(net, x, y, eps, eps / 4, 20)
            plain_images = sum(counted)
            counted.clear()
            torch.manual_seed(3)
            early = attacks.pgd_until_fooled(net, x, y, eps, eps / 4, 20)
            early_images = sum(counted)
            with torch.no_grad():
                broken_plain = net(plain).argmax(1) != y
                broken_early = net(early).argmax(1) != y
            assert broken_early.sum() >= broken_plain.sum(), (eps, broken_early.sum(), broken_plain.sum())
            assert (broken_plain & ~broken_early).sum() <= 1, eps  # float rounding of other batch sizes at most
            # eps 0.05: 12 % broken, 5,700 of 6,000 image passes; eps 0.15: 93 %, about 1,650
            most_broken = broken_early.float().mean().item() > 0.8
            assert early_images < plain_images * (0.5 if most_broken else 1.0), (eps, early_images, plain_images)
    finally:
        hook.remove()


def test_pgd_until_fooled_restarts_only_the_images_not_yet_fooled(model_and_data):
    net, x, y = model_and_data
    net.eval()
    x, y = x[:300], y[:300]
    starts = []
    real = attacks.random_start
    attacks.random_start = lambda xs, eps, norm: (starts.append(len(xs)), real(xs, eps, norm))[1]
    try:
        torch.manual_seed(5)
        adv = attacks.pgd_until_fooled(net, x, y, 0.1, 0.025, 5, restarts=3)
    finally:
        attacks.random_start = real
    with torch.no_grad():
        broken = (net(adv).argmax(1) != y).sum().item()
    assert starts[0] == len(y) and all(a > b for a, b in zip(starts, starts[1:])), starts
    assert len(y) - starts[-1] <= broken  # the images that left before the last restart were fooled
