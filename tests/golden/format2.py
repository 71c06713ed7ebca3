"""The model behind ``format2_{native,fused}.pt``: fxqbn.save files of format 2 (a BN between float
code is one FloatIO; no digests, no example inputs), written by fxqbn at commit cb3b265, the last to
write that format. Its ``F.batch_norm`` needs example inputs to be traced, which a format 2 file does
not hold. ``tests/test_serialize.py`` loads them with today's fxqbn and compares the outputs with the
ones stored beside them.

Written with (fxqbn of that commit importable, torch 2.13.0)::

    python tests/golden/format2.py tests/golden
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


class Format2Model(nn.Module):
    """A BN module between float convs (a FloatIO), then an F.batch_norm on the module's statistics, then a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn1(self.conv1(x)))
        return F.relu(F.batch_norm(y, self.mean, self.var, training=False))


def write(folder: str) -> None:
    import fxqbn

    for backend in ("native", "fused"):
        torch.manual_seed(0)
        model = Format2Model().eval()
        for mean, var in ((model.bn1.running_mean, model.bn1.running_var), (model.mean, model.var)):
            mean.uniform_(-0.5, 0.5)
            var.uniform_(0.5, 2.0)
        observed = fxqbn.prepare(model, (torch.randn(2, 3, 6, 6),))
        with torch.no_grad():
            observed(torch.randn(8, 3, 6, 6))
        quantized = fxqbn.convert(observed, backend=backend)
        probe = torch.randn(2, 3, 6, 6)
        fxqbn.save(quantized, f"{folder}/format2_{backend}.pt")
        torch.save({"input": probe, "output": quantized(probe)}, f"{folder}/format2_{backend}_io.pt")


if __name__ == "__main__":
    write(sys.argv[1])
