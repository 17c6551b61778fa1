"""Clean accuracy, PGD robustness curves, AutoAttack, transfer attack, gradient-masking checks.

Every attack runs with the model in eval mode on raw [0, 1] images (normalisation is inside the
model), in batches, on whatever device the model is on.
"""
from __future__ import annotations

import torch

from . import attacks
from .config import ThreatConfig


@torch.no_grad()
def predict(net, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    net.eval()
    dev = next(net.parameters()).device
    return torch.cat([net(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def accuracy(net, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    return (predict(net, x, batch_size) == y).float().mean().item() if len(y) else float("nan")


def pgd_accuracy(net, x: torch.Tensor, y: torch.Tensor, threat: ThreatConfig, eps: float | None = None,
                 steps: int | None = None, restarts: int | None = None, batch_size: int = 500) -> float:
    """Accuracy under PGD (random start, `restarts` restarts, worst case per example)."""
    net.eval()
    eps = threat.eps if eps is None else eps
    if eps == 0:
        return accuracy(net, x, y, batch_size)
    step = threat.step_size * eps / threat.eps  # the step scales with eps: eps/4 at the nominal one
    dev = next(net.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        x_adv = attacks.pgd(net, xb, yb, eps, step, steps or threat.eval_steps, threat.norm,
                            restarts=restarts or threat.restarts)
        with torch.no_grad():
            correct += (net(x_adv).argmax(1) == yb).sum().item()
    return correct / max(len(y), 1)
