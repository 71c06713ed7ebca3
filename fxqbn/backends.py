"""Backends: what a quantized BatchNorm pattern becomes, and how values cross the float boundary.

``fxqbn.convert(observed, backend=...)`` picks one record; ``rewrite_patterns`` takes it, so the
rewrite logic is one code path for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import fx, nn

from . import fused, qops
from .errors import FxqbnError
from .qparams import QParams

if TYPE_CHECKING:
    from fxqbn.passes import Rule

__all__ = ["Backend", "BACKENDS", "NATIVE", "FUSED", "backend_named"]


@dataclass(frozen=True)
class Backend:
    """How one backend builds the replacement of a pattern and its float boundaries.

    name: what ``fxqbn.convert(backend=...)`` calls it.
    module_for: (rule, float BN module, input qparams, output qparams) -> the replacement module.
    op_for: rule -> the kernel the replacement runs, as the report names it.
    quantize: graph target ``(x, scale, zero_point, dtype)``: float -> the backend's quantized values.
    dequantize: graph target: the backend's quantized values -> float.
    dequantize_args: (quantized value node, its qparams) -> the arguments of ``dequantize``.
    """

    name: str
    module_for: Callable[["Rule", nn.Module, QParams, QParams], nn.Module]
    op_for: Callable[["Rule"], str]
    quantize: Callable
    dequantize: Callable
    dequantize_args: Callable[[fx.Node, QParams], tuple]


NATIVE = Backend(  # PyTorch's quantized op library on quint8/qint8 tensors (fxqbn.nn modules)
    name="native",
    module_for=lambda rule, bn, qin, qout: rule.qmodule.from_bn(bn, qout),
    op_for=lambda rule: rule.op,
    quantize=qops.quantize,
    dequantize=qops.dequantize,
    dequantize_args=lambda node, qp: (node,),
)

FUSED = Backend(  # one compiled integer affine map per channel on plain uint8/int8 tensors (fxqbn.fused)
    name="fused",
    module_for=lambda rule, bn, qin, qout: fused.FusedBatchNorm.from_bn(bn, rule.qmodule._DIM, rule.relu, qin, qout),
    op_for=lambda rule: f"fxqbn.fused.batch_norm{rule.qmodule._DIM}d" + ("_relu" if rule.relu else ""),
    quantize=fused.quantize,
    dequantize=fused.dequantize,
    dequantize_args=lambda node, qp: (node, qp.scale, qp.zero_point),
)

BACKENDS = {backend.name: backend for backend in (NATIVE, FUSED)}


def backend_named(name: object) -> Backend:
    """The backend called ``name``; FxqbnError listing the choices otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise FxqbnError(f"unknown backend {name!r}: choose one of {', '.join(repr(n) for n in BACKENDS)}")
    return backend
