"""Quantize the BatchNorms of a small CNN with fxqbn and print what happened to each one."""

import torch
from torch import nn

import fxqbn


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv(x)))  # BatchNorm2d+ReLU: one fused quantized kernel
        return torch.relu(self.bn2(x))  # fed quantized, with no dequantize/quantize in between


def main() -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    observed = fxqbn.prepare(model, (torch.randn(1, 3, 32, 32),))
    with torch.no_grad():
        for _ in range(8):  # calibration: real data in practice
            observed(torch.randn(4, 3, 32, 32))
    quantized = fxqbn.convert(observed)
    held_out = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    print(fxqbn.compare(model, quantized, held_out))  # the report, with each BN's error filled in


if __name__ == "__main__":
    main()
