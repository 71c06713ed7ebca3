"""Small float models for the torch.ao oracle tests (tests/test_oracle.py).

Every model is built in eval mode with randomised BatchNorm statistics. Each case declares how
many BatchNorm modules it holds and the shapes of its inputs. The models only use ops that
torch.ao leaves float when just BatchNorm2d/3d, nn.ReLU and F.relu carry a qconfig, and every
ReLU follows a BN whose only user it is, so both tools quantize exactly the same patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Case", "CASES", "randomize_batchnorms"]

N, C, H, W, D = 2, 4, 6, 6, 3


def randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Random running statistics (positive variance), weight and bias for every BN; eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c) * 0.5)
                module.running_var.copy_(torch.rand(c) * 1.5 + 0.25)
                module.weight.copy_(torch.randn(c) * 0.5 + 1.0)
                module.bias.copy_(torch.randn(c) * 0.5)
    return model.eval()


class BNChain(nn.Module):
    """bn1 -> bn2 -> nn.ReLU -> bn3: back-to-back patterns, quantized end to end."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(C)
        self.bn2 = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.bn3 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.relu(self.bn2(self.bn1(x))))


class BNAfterAdd(nn.Module):
    """BN reading the float sum of two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x + y)


class BNAfterCat(nn.Module):
    """BN reading a float concatenation (of float values, not of BN outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2 * C)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([x * 2, y], 1))


class BNReLUSpellings(nn.Module):
    """BN2d + nn.ReLU, nn.ReLU(inplace=True), F.relu and F.relu(inplace=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(C)
        self.relu1 = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(C)
        self.relu2 = nn.ReLU(inplace=True)
        self.bn3 = nn.BatchNorm2d(C)
        self.bn4 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.relu2(self.bn2(self.relu1(self.bn1(x))))  # two fused patterns back to back
        b = F.relu(self.bn3(x))  # shares bn1's input
        c = F.relu(self.bn4(x - 1), inplace=True)
        return a + b, c


class BN3dModel(nn.Module):
    """BN3d alone and BN3d + nn.ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm3d(C)
        self.bn2 = nn.BatchNorm3d(C)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn1(x), self.relu(self.bn2(y))


class MultiOutput(nn.Module):
    """A tuple of outputs; one is a BN output that float code and another BN also read."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(C)
        self.bn2 = nn.BatchNorm2d(C)
        self.bn3 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.bn1(x)
        h = a * 2 + 1  # float code reading a BN output that is also returned...
        c = F.relu(self.bn2(a))  # ...and read, quantized, by another pattern
        e = self.bn3(x)  # reads the same input as bn1
        return a, c, e + h


class UnfusedReLU(nn.Module):
    """A ReLU that is not the BN output's only user stays unfused (torch.ao quantizes it alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.bn1(x)
        return a, self.relu(a), F.relu(self.bn2(x * 2))


class ConvPool(nn.Module):
    """Float convs and pooling between BNs (never conv directly into BN: torch.ao would fold it);
    the first BN + ReLU sit in a nested nn.Sequential (qualified names ``block.0``/``block.1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.block = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
        self.conv2 = nn.Conv2d(C, 2 * C, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(F.avg_pool2d(self.conv1(x), 2))
        h = self.conv2(h) * 0.5
        return F.max_pool2d(self.bn2(h), 3)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    num_bns: int
    # False where torch.ao quantizes more than the BN patterns (a standalone ReLU), so its graph
    # has other quantize/dequantize boundaries than fxqbn's.
    same_boundaries: bool = True

    def inputs(self, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
        """A fresh batch from the global RNG (seed it first)."""
        return tuple((torch.randn(shape) * 1.5 + 0.3) * scale for shape in self.input_shapes)


IMAGE = (N, C, H, W)
VOLUME = (N, C, D, H, W)

CASES = (
    Case("bn_chain", BNChain, (IMAGE,), 3),
    Case("bn_after_add", BNAfterAdd, (IMAGE, IMAGE), 1),
    Case("bn_after_cat", BNAfterCat, (IMAGE, IMAGE), 1),
    Case("bn_relu_spellings", BNReLUSpellings, (IMAGE,), 4),
    Case("bn3d", BN3dModel, (VOLUME, VOLUME), 2),
    Case("multi_output", MultiOutput, (IMAGE,), 3),
    Case("conv_pool", ConvPool, ((N, C, 8, 8),), 2),
    Case("unfused_relu", UnfusedReLU, (IMAGE,), 2, same_boundaries=False),
)
