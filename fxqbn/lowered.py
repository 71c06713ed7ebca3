"""The modules ``fxqbn.lower`` installs in whole-model int8 graphs.

``LoweredBatchNorm`` wraps one BN kernel (``fxqbn.nn``'s native module or ``fxqbn.fused``'s) so that it
takes and returns what the graph holds at that point: quantized tensors in torch.ao graphs, plain
uint8/int8 codes in PT2E graphs, converting at its edges when the kernel works on the other kind.
The kernel itself clamps its output to the codes the float graph's activation (ReLU6, clamp) and
quantize allowed. (Where nothing needs converting, in PT2E graphs with the fused kernel,
``fxqbn.lower`` installs the kernel itself.)
``ByRank`` picks a kernel by the input's rank, for BNs whose rank the graph does not say.
"""

from __future__ import annotations

import torch
from torch import nn

from fxqbn.passes.records import CODES, QUANTIZED
from fxqbn.passes.registry import RANK_TO_DIM

from . import qops
from .errors import FxqbnError
from .fused_io import integer_dtype
from .qparams import QParams

__all__ = ["LoweredBatchNorm", "ByRank"]


class ByRank(nn.Module):
    """One kernel per BN dim; ``forward`` runs the one for the input's rank (2-3: 1-d, 4: 2-d, 5: 3-d)."""

    def __init__(self, kernels: dict[int, nn.Module]) -> None:
        super().__init__()
        self.kernels = nn.ModuleDict({str(dim): kernel for dim, kernel in kernels.items()})

    def kernel_for(self, x: torch.Tensor) -> nn.Module:
        """The kernel for ``x``'s rank."""
        dim = RANK_TO_DIM.get(x.dim())
        if dim is None:
            raise FxqbnError(f"int8 BatchNorm expects an input of 2 to 5 dims, got shape {tuple(x.shape)}")
        return self.kernels[str(dim)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel_for(x)(x)


class LoweredBatchNorm(nn.Module):
    """An int8 BN inside a whole-model int8 graph.

    kernel: the BN module; ``consumes``: what it takes and gives, ``QUANTIZED`` tensors (native) or
        plain ``CODES`` (fused).
    holds: what the graph holds here: ``CODES`` (PT2E) or ``QUANTIZED`` tensors (torch.ao).
    input_qparams / output_qparams: the qparams at the edges (input None: read off a quantized input).
    """

    def __init__(self, kernel: nn.Module, consumes: str, holds: str, input_qparams: QParams | None,
                 output_qparams: QParams) -> None:
        super().__init__()
        if {consumes, holds} - {CODES, QUANTIZED}:
            raise FxqbnError(f"LoweredBatchNorm takes and holds {CODES!r} or {QUANTIZED!r}, got {consumes!r} and {holds!r}")
        if consumes != holds and input_qparams is None:
            raise FxqbnError("converting between codes and quantized tensors needs the input qparams")
        self.kernel, self.kernel_codes, self.graph_codes = kernel, consumes == CODES, holds == CODES
        self.input_qparams, self.output_qparams = input_qparams, output_qparams

    def _check_input(self, x: torch.Tensor) -> None:
        q = self.input_qparams or self.output_qparams
        if self.graph_codes and x.dtype != integer_dtype(q.dtype):
            raise FxqbnError(f"{self._get_name()} expects {integer_dtype(q.dtype)} codes, got {x.dtype}")
        if not self.graph_codes and (not x.is_quantized or x.dtype != self.output_qparams.dtype):
            raise FxqbnError(f"{self._get_name()} expects a {self.output_qparams.dtype} quantized tensor, got {x.dtype}")
        if not self.graph_codes and self.kernel_codes and (x.q_scale(), x.q_zero_point()) != (q.scale, q.zero_point):
            raise FxqbnError(
                f"{self._get_name()} was built for input qparams ({q.scale}, {q.zero_point}), "
                f"got ({x.q_scale()}, {x.q_zero_point()})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph_codes and self.kernel_codes:  # plain codes throughout: torch.compile traces the kernel
            self._check_input(x)
            return self.kernel(x)
        if torch.compiler.is_compiling():
            return qops.eagerly(self._quantized, x)
        return self._quantized(x)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.graph_codes and not self.kernel_codes:
            x = qops.from_codes(x, self.input_qparams.scale, self.input_qparams.zero_point)
        elif not self.graph_codes and self.kernel_codes:  # the fused kernel on the quantized tensors' own memory
            kernel = self.kernel.kernel_for(x) if isinstance(self.kernel, ByRank) else self.kernel
            return kernel.forward_quantized(x)
        y = self.kernel(x)
        if self.graph_codes and not self.kernel_codes:  # the native kernel returns channels-last: keep x's layout
            return qops.codes(y).contiguous() if x.is_contiguous() else qops.codes(y)
        return y

    def _get_name(self) -> str:
        return "LoweredBatchNorm"

    def extra_repr(self) -> str:
        return "on codes" if self.graph_codes else "on quantized tensors"
