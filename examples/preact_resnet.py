"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", 2016), BNs quantized.

Every residual block is BN -> ReLU -> conv -> BN -> ReLU -> conv, added to the shortcut: each BN reads
a float value (the residual sum, or a convolution) and becomes one quantized BN+ReLU kernel.

    python examples/preact_resnet.py                                        # the Python API
    fxqbn convert examples/preact_resnet.py:build --verify                  # the command
"""

import torch
from torch import nn

import fxqbn
from fxqbn.models import estimate_bn_statistics


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))  # BatchNorm2d+ReLU, its output read by conv1 and the shortcut
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Four stages of two blocks, channels width, 2x, 4x, 8x (64 in the paper; smaller here for speed)."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        blocks, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for i in range(2):
                blocks.append(PreActBlock(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The factory `fxqbn convert` calls: the model in eval mode and an example input.

    No trained weights here: BN statistics are estimated on random images so the BNs normalise.
    """
    torch.manual_seed(0)
    model = estimate_bn_statistics(PreActResNet18(), [torch.randn(8, 3, 32, 32) for _ in range(2)])
    return model, (torch.randn(1, 3, 32, 32),)


def main() -> None:
    model, example = build()
    observed = fxqbn.prepare(model, example)
    with torch.no_grad():
        for _ in range(4):  # calibration: random images stand in for real data
            observed(torch.randn(2, 3, 32, 32))
        quantized = fxqbn.convert(observed)
        x = torch.randn(2, 3, 32, 32)
    print(fxqbn.compare(model, quantized, x))  # the report, with each BN's error and the model's output SQNR


if __name__ == "__main__":
    main()
