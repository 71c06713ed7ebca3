"""The cost model ``fxqbn.lower`` uses by default: per BN, an int8 kernel or the float BN it would replace,
whichever costs less, decided from what is known statically. Deterministic: the same graph (and the same
``example_inputs`` shapes) gives the same choices. docs/lower.md states the rule and its measurements
(``benchmarks/lower_cost.py``).

What is known of a BN (``Site``): what the graph holds at its edges (torch.ao quantized tensors or PT2E
codes), its channel count, whether the graph shows its input qparams (the fused kernel needs them when it
is built), whether fxqbn's C kernels are built, and -- where the graph records it (PT2E export, or a
shape pass on ``example_inputs``) -- its input's shape and layout.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxqbn.passes import Match

from .ckernels import EXT
from .qops import CHANNELS_LAST

__all__ = ["FUSED", "NATIVE", "FLOAT", "Site", "Choice", "CostModel", "COST_MODEL", "site_of"]

FUSED, NATIVE, FLOAT = "fused", "native", "float"


@dataclass(frozen=True)
class Site:
    """What ``fxqbn.lower`` knows of one BN when it chooses."""

    channels: int
    input_qparams_known: bool  # the graph shows them: the fused kernel can be built
    c_kernels: bool  # fxqbn's C kernels are built (else the fused kernel runs aten ops)
    shape: tuple[int, ...] | None = None  # the BN input's shape, where the graph records it
    channels_last: bool | None = None  # its layout (rank 4 / 5), where recorded

    def describe(self) -> str:
        """'16 channels, input 16x16x24x24 channels-last' (what the report's reason says of the site)."""
        if self.shape is None:
            return f"{self.channels} channels, input shape not recorded"
        layout = "" if self.channels_last is None or len(self.shape) < 4 else (" channels-last" if self.channels_last else " contiguous")
        return f"{self.channels} channels, input {'x'.join(map(str, self.shape))}{layout}"


@dataclass(frozen=True)
class Choice:
    """What a BN becomes: ``kernel`` "fused", "native" or "float" (kept float), and why, for its report row."""

    kernel: str
    reason: str


@dataclass(frozen=True)
class CostModel:
    """The rule, as data (thresholds from benchmarks/lower_cost.py, one thread; see docs/lower.md):

    1. fused, where it can be built and runs its C kernel: it costs less than the float BN it replaces
       (dequantize, BN, quantize, activation) at every shape, layout and channel count measured;
    2. else native, where the input is known to be channels-last (rank 4 / 5) with at least
       ``native_min_channels`` channels and ``native_min_elements`` elements: the only sites where the
       native op was measured clearly faster than the float BN;
    3. else the BN stays float.
    """

    native_min_channels: int = 64
    native_min_elements: int = 1 << 16

    def native_pays(self, site: Site) -> bool:
        return (
            site.shape is not None and bool(site.channels_last) and site.channels >= self.native_min_channels
            and math.prod(site.shape) >= self.native_min_elements
        )

    def choose(self, site: Site, int8: bool = False) -> Choice:
        """The kernel for ``site`` and the one-line reason the report row carries; ``int8``: never float
        (``fxqbn.lower(bn='int8')``: the native kernel where the rule would keep the float BN)."""
        where = site.describe()
        if site.input_qparams_known and site.c_kernels:
            return Choice(FUSED, "int8 fused kernel: cheaper than the float BN at every shape measured (cost model)")
        why_not_fused = (
            "fxqbn's C kernels are not built" if not site.c_kernels
            else "the fused kernel needs input qparams the graph does not show"
        )
        if self.native_pays(site):
            return Choice(NATIVE, f"int8 native kernel ({where}): channels-last with >= {self.native_min_channels} channels costs "
                                  f"less than the float BN ({why_not_fused}; cost model)")
        if int8:
            return Choice(NATIVE, f"int8 native kernel ({where}): bn='int8' forces int8 where the cost model keeps the float BN ({why_not_fused})")
        return Choice(FLOAT, f"kept float: the int8 native kernel at {where} costs more than the float BN it replaces, and "
                             f"{why_not_fused} (cost model; backend= or bn='int8' forces int8)")


COST_MODEL = CostModel()


def _layout(value: object, rank: int) -> bool | None:
    """Whether a recorded value (``tensor_meta`` or export's ``val``) is channels-last; None if not said."""
    if rank not in CHANNELS_LAST:
        return None
    fmt = getattr(value, "memory_format", None)
    if fmt is not None:
        return fmt == CHANNELS_LAST[rank]
    if isinstance(value, torch.Tensor):
        return not value.is_contiguous() and value.is_contiguous(memory_format=CHANNELS_LAST[rank])
    return None


def site_of(graph_nodes: dict[str, fx.Node], root: torch.nn.Module, match: Match) -> Site:
    """What is known of ``match``'s BN in an int8 graph: the value its dequantize reads is the BN's input."""
    channels = int(operator.attrgetter(match.bn.running_mean)(root).numel())
    dequantize = graph_nodes[match.boundary.input]
    source = dequantize.args[0] if dequantize.args and isinstance(dequantize.args[0], fx.Node) else dequantize
    value = source.meta.get("tensor_meta", source.meta.get("val"))
    if value is None:  # PT2E's quantize / dequantize nodes carry no shape; the BN's output has its input's
        bn = graph_nodes[match.bn.output]
        value = bn.meta.get("tensor_meta", bn.meta.get("val"))
    shape = getattr(value, "shape", None)
    shape = tuple(int(s) for s in shape) if shape is not None and all(isinstance(s, int) for s in shape) else None
    return Site(
        channels=channels, input_qparams_known=match.boundary.input_qparams is not None, c_kernels=EXT is not None,
        shape=shape, channels_last=None if shape is None else _layout(value, len(shape)),
    )

