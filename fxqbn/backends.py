"""Backends: what a quantized BatchNorm pattern becomes, and how values cross the float boundary.

``fxqbn.convert(observed, backend=...)`` picks one record; ``rewrite_patterns`` takes it, so the
rewrite logic is one code path for every backend. Boundaries are modules (their checks survive
re-tracing, e.g. when a converted model is unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import fused
from .errors import FxqbnError
from .nn import DeQuantize, Quantize
from .qparams import QParams

if TYPE_CHECKING:
    from fxqbn.passes import Rule

__all__ = ["Backend", "BACKENDS", "NATIVE", "FUSED", "backend_named", "BnTensors"]


@dataclass(frozen=True)
class BnTensors:
    """A BatchNorm's tensors and constants, from a module or an ``F.batch_norm`` call."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    momentum: float | None


@dataclass(frozen=True)
class Backend:
    """How one backend builds the replacement of a pattern and its float boundaries.

    name: what ``fxqbn.convert(backend=...)`` calls it.
    module_for: (rule, BN tensors, input qparams, output qparams, name for messages) -> the replacement.
    op_for: rule -> the kernel the replacement runs, as the report names it.
    quantize: input qparams -> the float -> quantized boundary module.
    dequantize: output qparams -> the quantized -> float boundary module.
    dequantize_shared: True when one dequantize module serves every boundary (quantized tensors
        carry their qparams); False when each set of qparams needs its own (plain integer tensors).
    """

    name: str
    module_for: Callable[["Rule", BnTensors, QParams, QParams, str], nn.Module]
    op_for: Callable[["Rule"], str]
    quantize: Callable[[QParams], nn.Module]
    dequantize: Callable[[QParams], nn.Module]
    dequantize_shared: bool


NATIVE = Backend(  # PyTorch's quantized op library on quint8/qint8 tensors (fxqbn.nn modules)
    name="native",
    module_for=lambda rule, t, qin, qout, name: rule.qmodule.from_tensors(
        t.running_mean, t.running_var, t.weight, t.bias, t.eps, t.momentum, qout, name=name
    ),
    op_for=lambda rule: rule.op,
    quantize=Quantize.from_qparams,
    dequantize=lambda qparams: DeQuantize(),
    dequantize_shared=True,
)

FUSED = Backend(  # one integer affine map per channel (C kernels) on plain uint8/int8 tensors (fxqbn.fused)
    name="fused",
    module_for=lambda rule, t, qin, qout, name: fused.FusedBatchNorm.from_tensors(
        t, rule.dim, rule.relu, qin, qout, name=name
    ),
    op_for=lambda rule: f"fxqbn.fused.batch_norm{rule.dim}d" + ("_relu" if rule.relu else ""),
    quantize=fused.FusedQuantize.from_qparams,
    dequantize=fused.FusedDeQuantize.from_qparams,
    dequantize_shared=False,
)

BACKENDS = {backend.name: backend for backend in (NATIVE, FUSED)}


def backend_named(name: object) -> Backend:
    """The backend called ``name``; FxqbnError listing the choices otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise FxqbnError(f"unknown backend {name!r}: choose one of {', '.join(repr(n) for n in BACKENDS)}")
    return backend
