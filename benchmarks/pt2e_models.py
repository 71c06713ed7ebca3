"""The models of benchmarks/pt2e.py: where PT2E's conv -> BN fold and its float standalone BNs show.

* ``preact_resnet``: examples/preact_resnet.py (CIFAR-style: the first block's BN reads the stem conv,
  whose output the residual add reads too, so folding that BN into the stem changes the model).
* ``densenet_bc``: examples/densenet_bc.py (every BN after a cat or a transition reads no conv).
* ``mobilenet_v2``: inverted residual blocks (1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6
  -> 1x1 project -> BN) whose residual add feeds a standalone BN -> ReLU6.
* ``mlp``: a BatchNorm1d on the raw features, then Linear -> ReLU -> BatchNorm1d blocks (no BN folds).

Each builder returns the model in eval mode, with BN statistics estimated on random inputs, and its
input shape without the batch dim.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from fxqbn.models import estimate_bn_statistics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import densenet_bc
import preact_resnet


class InvertedResidual(nn.Module):
    """MobileNetV2's block; with a residual, the sum goes through a standalone BN -> ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        width = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
            nn.Conv2d(width, width, 3, stride, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout
        self.post = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU6()) if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return self.post(x + out) if self.post is not None else out


class MobileNetV2Style(nn.Module):
    """A 32x32 MobileNetV2: stem conv -> BN -> ReLU6, inverted residual stages, 1x1 conv head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        cin = 16
        for cout, blocks, stride in ((24, 2, 1), (32, 3, 2), (64, 3, 2), (96, 2, 1)):
            for i in range(blocks):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class ReluBnMLP(nn.Module):
    """BatchNorm1d on the raw features, then Linear -> ReLU -> BatchNorm1d blocks, then a Linear head."""

    def __init__(self, features: int = 64, hidden: tuple[int, ...] = (512, 512, 256), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(features)]
        for size in hidden:
            layers += [nn.Linear(features, size), nn.ReLU(), nn.BatchNorm1d(size)]
            features = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _estimated(model: nn.Module, shape: tuple[int, ...], scale: float = 1.0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return estimate_bn_statistics(model, [torch.randn(16, *shape) * scale for _ in range(2)]), shape


def _preact() -> tuple[nn.Module, tuple[int, ...]]:
    return preact_resnet.build()[0], (3, 32, 32)


def _densenet() -> tuple[nn.Module, tuple[int, ...]]:
    return densenet_bc.build()[0], (3, 32, 32)


def _mobilenet() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _estimated(MobileNetV2Style(), (3, 32, 32))


def _mlp() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return _estimated(ReluBnMLP(), (64,), scale=3.0)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "preact_resnet": _preact,
    "densenet_bc": _densenet,
    "mobilenet_v2": _mobilenet,
    "mlp": _mlp,
}
