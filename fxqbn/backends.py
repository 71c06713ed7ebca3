"""Backends: what a quantized BatchNorm pattern becomes, and how values cross the float boundary.

``fxqbn.convert(observed, backend=...)`` picks one record; ``rewrite_patterns`` takes it, so the
rewrite logic is one code path for every backend. Each backend decides the module for a rule's
(dim, activation) through ``KERNELS``, its op name and its boundaries. Boundaries are modules (their checks survive
re-tracing, e.g. when a converted model is unpickled).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import fused, qops
from . import nn as qnn
from .errors import FxqbnError
from .nn import DeQuantize, Quantize
from .qparams import DTYPE_RANGES, QParams

if TYPE_CHECKING:
    from fxqbn.passes import Rule

__all__ = ["Backend", "BACKENDS", "NATIVE", "FUSED", "backend_named", "BnTensors", "Kernel", "KERNELS"]


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
class Kernel:
    """How both backends compute a rule's activation: the BN kernel's ReLU variant (a clamp at the
    output zero point), then, when ``clamp``, a clamp to the activation's float bounds (native: the
    quantized clamp op; fused: the same bounds as codes, inside the kernel)."""

    relu: bool
    clamp: bool = False


# Activation name (``passes.patterns.Activation.name``) -> its kernel: the mapping a new activation adds.
KERNELS: dict[str, Kernel] = {
    "": Kernel(relu=False),  # bn(x)
    "ReLU": Kernel(relu=True),  # quantized::batch_norm*_relu
    "ReLU6": Kernel(relu=True, clamp=True),  # ..._relu, then clamp(0, 6)
}


@dataclass(frozen=True)
class Backend:
    """How one backend builds the replacement of a pattern and its float boundaries.

    name: what ``fxqbn.convert(backend=...)`` calls it.
    build: (dim, kernel, BN tensors, input qparams, output qparams, float clamp or None, name for
        messages) -> the replacement module.
    op_name: (dim, kernel, activation name) -> the kernel the replacement runs, as the report names it.
    quantize: input qparams -> the float -> quantized boundary module.
    dequantize: output qparams -> the quantized -> float boundary module.
    dequantize_shared: True when one dequantize module serves every boundary (quantized tensors
        carry their qparams); False when each set of qparams needs its own (plain integer tensors).
    rebuild_from: like ``build``, from a replacement holding tensors from a file instead of BN tensors:
        the replacement built afresh from them, checked as ``module_for`` checks (``fxqbn.load``
        compares the two; see ``rebuild``).
    kernels: activation name -> Kernel; a rule whose activation is missing has no module here.
    """

    name: str
    build: Callable[..., nn.Module]
    op_name: Callable[[int, Kernel, str], str]
    quantize: Callable[[QParams], nn.Module]
    dequantize: Callable[[QParams], nn.Module]
    dequantize_shared: bool
    rebuild_from: Callable[..., nn.Module]
    kernels: Mapping[str, Kernel] = field(default_factory=lambda: KERNELS)

    def kernel_for(self, rule: "Rule") -> Kernel:
        """The rule's kernel on this backend; FxqbnError naming the rule when there is none."""
        kernel = self.kernels.get(rule.activation.name)
        if kernel is None:
            raise FxqbnError(
                f"backend {self.name!r} has no kernel for {rule.name} (activation {rule.activation.name!r}): "
                "add it to fxqbn.backends.KERNELS"
            )
        return kernel

    def module_for(self, rule: "Rule", tensors: BnTensors, qin: QParams, qout: QParams, name: str, checked: bool = False) -> nn.Module:
        """The module replacing a pattern of ``rule`` whose BN holds ``tensors``, between ``qin`` and ``qout``
        (``checked``: the tensors are ``fxqbn.nn.own_many``'s: checked float32 copies nobody else holds)."""
        kernel = self.kernel_for(rule)
        clamp = _finite_clamp(rule.activation.lo, rule.activation.hi, qout) if kernel.clamp else None
        return self.build(rule.dim, kernel, tensors, qin, qout, clamp, name, checked)

    def rebuild(self, rule: "Rule", loaded: nn.Module, qin: QParams, qout: QParams, name: str) -> nn.Module:
        """``rule``'s replacement built afresh from the tensors of ``loaded`` (a replacement read from a file)."""
        kernel = self.kernel_for(rule)
        clamp = _finite_clamp(rule.activation.lo, rule.activation.hi, qout) if kernel.clamp else None
        return self.rebuild_from(rule.dim, kernel, loaded, qin, qout, clamp, name)

    def op_for(self, rule: "Rule") -> str:
        """The kernel a rule's replacement runs, as the report names it."""
        return self.op_name(rule.dim, self.kernel_for(rule), rule.activation.name)


def _finite_clamp(lo: float, hi: float, qparams: QParams) -> tuple[float, float]:
    """(lo, hi) with an unbounded side replaced by the float value of the dtype's extreme code."""
    qmin, qmax = DTYPE_RANGES[qparams.dtype]
    low, high = (qmin - qparams.zero_point) * qparams.scale, (qmax - qparams.zero_point) * qparams.scale
    return min(max(lo, low), high), max(min(hi, high), low)


_NATIVE_CLASSES = {  # (dim, the kernel's ReLU) -> the fxqbn.nn module
    (1, False): qnn.BatchNorm1d, (2, False): qnn.BatchNorm2d, (3, False): qnn.BatchNorm3d,
    (1, True): qnn.BNReLU1d, (2, True): qnn.BNReLU2d, (3, True): qnn.BNReLU3d,
}


def _native(dim: int, kernel: Kernel, t: BnTensors, qin: QParams, qout: QParams, clamp, name: str, checked: bool = False) -> nn.Module:
    return _NATIVE_CLASSES[(dim, kernel.relu)].from_tensors(
        t.running_mean, t.running_var, t.weight, t.bias, t.eps, t.momentum, qout, name=name, clamp=clamp, checked=checked
    )


def _native_again(dim: int, kernel: Kernel, m: nn.Module, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    return _native(dim, kernel, BnTensors(m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.momentum), qin, qout, clamp, name)


def _fused(dim: int, kernel: Kernel, t: BnTensors, qin: QParams, qout: QParams, clamp, name: str, checked: bool = False) -> nn.Module:
    codes = None if clamp is None else qops.clamp_bounds(*clamp, qout.scale, qout.zero_point, qout.dtype)
    return fused.FusedBatchNorm.from_tensors(t, dim, kernel.relu, qin, qout, name=name, clamp=codes, checked=checked)


def _fused_again(dim: int, kernel: Kernel, m: nn.Module, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    codes = None if clamp is None else qops.clamp_bounds(*clamp, qout.scale, qout.zero_point, qout.dtype)
    bounds = fused.code_bounds(qout, kernel.relu, codes)
    return fused.FusedBatchNorm(dim, m.alpha, m.beta, m.table, qin, qout, bounds, relu=kernel.relu, kernel=m.kernel, name=name, saved=True)


NATIVE = Backend(  # PyTorch's quantized op library on quint8/qint8 tensors (fxqbn.nn modules)
    name="native",
    build=_native,
    op_name=lambda dim, kernel, act: qops.BN_OP_NAMES[(dim, kernel.relu)] + ("+quantized::clamp" if kernel.clamp else ""),
    quantize=Quantize.from_qparams,
    dequantize=lambda qparams: DeQuantize(),
    dequantize_shared=True,
    rebuild_from=_native_again,
)

FUSED = Backend(  # one integer affine map per channel (C kernels) on plain uint8/int8 tensors (fxqbn.fused)
    name="fused",
    build=_fused,
    op_name=lambda dim, kernel, act: f"fxqbn.fused.batch_norm{dim}d" + (f"_{act.lower()}" if act else ""),
    quantize=fused.FusedQuantize.from_qparams,
    dequantize=fused.FusedDeQuantize.from_qparams,
    dequantize_shared=False,
    rebuild_from=_fused_again,
)

BACKENDS = {backend.name: backend for backend in (NATIVE, FUSED)}


def backend_named(name: object) -> Backend:
    """The backend called ``name``; FxqbnError listing the choices otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise FxqbnError(f"unknown backend {name!r}: choose one of {', '.join(repr(n) for n in BACKENDS)}")
    return backend
