"""A 3-D CNN for video clips (C3D-style, with residual stages), its BatchNorm3d layers quantized.

Stem conv3d -> BN3d -> ReLU, then residual stages of conv3d -> BN3d -> ReLU -> conv3d -> BN3d, whose
sum with the shortcut goes through F.relu: the second BN of each block is quantized alone (its output
is added in float), the others fuse their ReLU. Every BN here follows the conv that feeds it alone,
which fxqbn.prepare would fold into it by default: ``fold=False`` (``--no-fold``) keeps them BNs.

    python examples/cnn3d.py                                                # the Python API
    fxqbn convert examples/cnn3d.py:build --no-fold --verify                # the command
"""

import torch
import torch.nn.functional as F
from torch import nn

import fxqbn
from fxqbn.models import estimate_bn_statistics


class Block3d(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.down = None
        if stride != 1 or in_planes != planes:
            self.down = nn.Sequential(nn.Conv3d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # BatchNorm3d+ReLU
        out = self.bn2(self.conv2(out))  # BatchNorm3d alone: the add and ReLU stay float
        shortcut = self.down(x) if self.down is not None else x
        return F.relu(out + shortcut)


class Video3dCNN(nn.Module):
    """Clips of shape (N, 3, T, H, W) -> class scores; three stages of two residual blocks."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, width, (3, 5, 5), (1, 2, 2), (1, 2, 2), bias=False),
                                  nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        stages, planes = [], width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            stages += [Block3d(planes, out, stride=1 if stage == 0 else 2), Block3d(out, out, stride=1)]
            planes = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool3d(x, 1), 1))


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The factory `fxqbn convert` calls: the model in eval mode and an example clip (8 frames of 32x32).

    No trained weights here: BN statistics are estimated on random clips so the BNs normalise.
    """
    torch.manual_seed(0)
    model = estimate_bn_statistics(Video3dCNN(), [torch.randn(4, 3, 8, 32, 32) for _ in range(2)])
    return model, (torch.randn(1, 3, 8, 32, 32),)


def main() -> None:
    model, example = build()
    observed = fxqbn.prepare(model, example, fold=False)  # quantize the BNs rather than fold them into the convs
    with torch.no_grad():
        for _ in range(4):  # calibration: random clips stand in for real data
            observed(torch.randn(2, 3, 8, 32, 32))
        quantized = fxqbn.convert(observed)
        x = torch.randn(2, 3, 8, 32, 32)
    print(fxqbn.compare(model, quantized, x))  # the report, with each BN's error and the model's output SQNR


if __name__ == "__main__":
    main()
