"""The model behind ``format1_{native,fused}.pt``: fxqbn.save files of format 1 (every boundary a
graph node), written by fxqbn at commit 9053e47, the last to write that format. ``tests/test_serialize.py``
loads them with today's fxqbn and compares the outputs with the ones stored beside them.

Written with (fxqbn of that commit importable, torch 2.13.0)::

    python tests/golden/format1.py tests/golden
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class Format1Model(nn.Module):
    """BNs between float convs (FloatIO in format 2), then a BN -> ReLU -> BN chain read quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn3, self.bn4 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return self.bn4(self.relu(self.bn3(self.bn2(y) + 1)))


def write(folder: str) -> None:
    import fxqbn

    for backend in ("native", "fused"):
        torch.manual_seed(0)
        model = Format1Model().eval()
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        observed = fxqbn.prepare(model, (torch.randn(2, 3, 6, 6),))
        with torch.no_grad():
            observed(torch.randn(8, 3, 6, 6))
        quantized = fxqbn.convert(observed, backend=backend)
        probe = torch.randn(2, 3, 6, 6)
        fxqbn.save(quantized, f"{folder}/format1_{backend}.pt")
        torch.save({"input": probe, "output": quantized(probe)}, f"{folder}/format1_{backend}_io.pt")


if __name__ == "__main__":
    write(sys.argv[1])
