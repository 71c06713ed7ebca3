"""Quickstart: quantize the BatchNorms of a small CNN with fxqbn's Python API.

    python examples/quickstart.py                                           # the Python API
    fxqbn convert examples/quickstart.py:build --verify                     # the command
"""

from collections import OrderedDict

import torch
from torch import nn

import fxqbn


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The factory `fxqbn convert` calls: the model in eval mode and an example input."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(),  # bn1 folded into conv; ReLU float
        bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),  # BN+ReLU: one fused int8 kernel
    )).eval()
    return model, (torch.randn(1, 3, 32, 32),)


def main() -> None:
    model, example = build()
    observed = fxqbn.prepare(model, example)
    with torch.no_grad():
        for _ in range(8):  # calibration: real data in practice
            observed(torch.randn(4, 3, 32, 32))
    quantized = fxqbn.convert(observed)
    held_out = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    print(fxqbn.compare(model, quantized, held_out))  # the report, each BN's error and the model's SQNR filled in


if __name__ == "__main__":
    main()
