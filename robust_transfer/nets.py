"""Architectures with a features/head split and named blocks.

Every network is a `Net`: raw [0, 1] images in, normalisation inside (so attacks and consumers
never normalise), then `blocks` (an ordered, named `nn.Sequential`), then a linear `head`.
`features(x)` is the penultimate representation; `trunk(x, k)` is the input of the last k blocks,
which last-k probing freezes and CARTL's feature-distance term measures.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError


class Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Net(nn.Module):
    def __init__(self, blocks: "OrderedDict[str, nn.Module]", feature_dim: int, num_classes: int,
                 in_channels: int, mean: Optional[list[float]] = None, std: Optional[list[float]] = None):
        super().__init__()
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.blocks = nn.Sequential(blocks)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks.named_children()]

    def _check_k(self, k: int) -> int:
        if not 0 <= k <= len(self.blocks):
            raise ConfigError(f"k={k} is out of range: this network has {len(self.blocks)} blocks {self.block_names}")
        return len(self.blocks) - k

    def trunk(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Input of the last k blocks (k=0: the penultimate features)."""
        h = self.normalize(x)
        for block in list(self.blocks)[: self._check_k(k)]:
            h = block(h)
        return h

    def tail(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Penultimate features from the output of `trunk(x, k)`."""
        for block in list(self.blocks)[self._check_k(k):]:
            h = block(h)
        return h

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every block (what feature distillation matches)."""
        outs, h = [], self.normalize(x)
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def small_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 1, **norm) -> Net:
    """Four conv blocks and one dense block: trains on 2 CPU cores in minutes."""
    c = 32 * width
    spatial = image_size // 4
    blocks = OrderedDict(
        conv1=conv_bn(in_channels, c),
        conv2=conv_bn(c, c, stride=2),
        conv3=conv_bn(c, 2 * c),
        conv4=nn.Sequential(conv_bn(2 * c, 2 * c, stride=2), nn.AdaptiveAvgPool2d(spatial // 2 or 1)),
        fc=nn.Sequential(nn.Flatten(), nn.Linear(2 * c * max(spatial // 2, 1) ** 2, 128 * width), nn.ReLU(inplace=True)),
    )
    return Net(blocks, 128 * width, num_classes, in_channels, **norm)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class WideBlock(PreActBlock):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__(cin, cout, stride)
        self.dropout = dropout

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + short


class PoolFlatten(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def preact_resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 1, **norm) -> Net:
    w = 64 * width
    blocks = OrderedDict(stem=nn.Conv2d(in_channels, w, 3, 1, 1, bias=False))
    cin = w
    for i, (cout, stride) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)), start=1):
        blocks[f"layer{i}_0"] = PreActBlock(cin, cout, stride)
        blocks[f"layer{i}_1"] = PreActBlock(cout, cout, 1)
        cin = cout
    blocks["pool"] = PoolFlatten(cin)
    return Net(blocks, cin, num_classes, in_channels, **norm)


def wide_resnet(in_channels: int, num_classes: int, image_size: int, width: int = 10, depth: int = 28, **norm) -> Net:
    """WideResNet-depth-width (Zagoruyko & Komodakis), as in the papers' CIFAR experiments."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    blocks = OrderedDict(stem=nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False))
    cin = widths[0]
    for g, stride in enumerate((1, 2, 2), start=1):
        for i in range(n):
            blocks[f"group{g}_{i}"] = WideBlock(cin, widths[g], stride if i == 0 else 1)
            cin = widths[g]
    blocks["pool"] = PoolFlatten(cin)
    return Net(blocks, cin, num_classes, in_channels, **norm)


ARCHITECTURES = {"small_cnn": small_cnn, "preact_resnet18": preact_resnet18, "wide_resnet": wide_resnet}


def build_net(arch: str, in_channels: int, num_classes: int, image_size: int, width: int = 1,
              mean: Optional[list[float]] = None, std: Optional[list[float]] = None) -> Net:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch: unknown architecture '{arch}', expected one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels, num_classes, image_size, width=width, mean=mean, std=std)


def net_spec(arch: str, shape: tuple[int, int, int], num_classes: int, width: int) -> dict:
    """What it takes to rebuild a network: stored beside every checkpoint."""
    h, w, c = shape
    return {"arch": arch, "in_channels": c, "num_classes": num_classes, "image_size": h, "width": width}


def from_spec(spec: dict) -> Net:
    return build_net(spec["arch"], spec["in_channels"], spec["num_classes"], spec["image_size"], spec["width"])


def save_model(model: Net, spec: dict, path, extra: Optional[dict] = None) -> None:
    """A checkpoint is a plain dict of tensors and JSON-able values: loads with weights_only=True."""
    from .data import atomic_write

    with atomic_write(path) as tmp:
        torch.save({"spec": spec, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "extra": extra or {}}, tmp)


def load_model(path, expect_arch: Optional[str] = None, expect: Optional[dict] = None) -> tuple[Net, dict]:
    """Rebuild a network from a checkpoint written by `save_model`; never unpickles arbitrary objects.
    `expect`: spec fields the checkpoint must have (e.g. the data's in_channels and image_size)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"missing checkpoint {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path} is not a state-dict checkpoint ({type(exc).__name__}); refusing to unpickle it") from None
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint written by robust_transfer (no spec/state_dict)")
    spec = ckpt["spec"]
    if expect_arch and spec.get("arch") != expect_arch:
        raise ConfigError(f"{path} holds a '{spec.get('arch')}' checkpoint, expected '{expect_arch}'")
    wrong = {k: spec.get(k) for k, v in (expect or {}).items() if spec.get(k) != v}
    if wrong:
        raise ConfigError(f"{path} holds a model for {wrong}, expected {({k: expect[k] for k in wrong})}")
    model = from_spec(spec)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"{path} does not fit architecture {spec}: {str(exc).splitlines()[0][:160]}") from None
    return model, ckpt.get("extra", {})
