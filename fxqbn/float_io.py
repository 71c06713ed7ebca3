"""``FloatIO``: a quantized BatchNorm between float code, its two boundaries inside it.

Where a BN pattern reads a float value that no other pattern reads, and only float code reads
its output (a BN between float convs, as in most CNNs), ``convert`` installs one ``FloatIO`` in
the BN's place instead of three nodes (quantize, BN, dequantize)::

    bns_0 = getattr(self.bns, "0")(mul)     # FloatIO(quantize, bn, dequantize)

It computes exactly what the three nodes did: ``dequantize(bn(quantize(x)))``, with the backend's
own boundary modules. The graph has a third of the nodes for such BNs, which is what generating
and compiling the GraphModule's code costs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FloatIO"]


class FloatIO(nn.Module):
    """``dequantize(bn(quantize(x)))``: float in, float out, the quantized BN ``bn`` in between."""

    def __init__(self, quantize: nn.Module, bn: nn.Module, dequantize: nn.Module) -> None:
        super().__init__()
        self.quantize, self.bn, self.dequantize = quantize, bn, dequantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.dequantize(self.bn(self.quantize(x)))
        return self._forward(x)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and hasattr(self.bn, "between_floats"):
            # fake tensors have no quantized dtypes: the native BN, float in and float out, is one op
            return self.bn.between_floats(x, self.quantize)
        return self.dequantize(self.bn(self.quantize(x)))
