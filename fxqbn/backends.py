"""Backends: what an int8 BatchNorm pattern becomes, and how values cross the float boundary.

The registry of backends: each is one frozen ``Backend`` spec (its kernels live in its own module).
``fxqbn.convert(observed, backend=...)`` and ``fxqbn.lower(..., backend=...)`` pick one; the graph passes
(``fxqbn.passes``) take it without importing this module, so the pipeline is one code path for every
backend. Boundaries are modules (their checks survive re-tracing, e.g. when a converted model is unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxqbn.passes.plan import finite_clamp
from fxqbn.passes.records import CODES, QUANTIZED
from fxqbn.passes.registry import Rule

from . import fused, qops
from . import nn as qnn
from .errors import FxqbnError
from .nn import DeQuantize, Quantize, own_many
from .qparams import QParams

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
    """One backend: what an int8 BN pattern becomes on it, and how values cross into and out of it.

    name: what ``fxqbn.convert(backend=...)`` / ``fxqbn.lower(backend=...)`` call it.
    consumes: the int8 tensors its modules take and give: ``QUANTIZED`` (quint8/qint8 tensors, which
        carry their qparams) or ``CODES`` (plain uint8/int8 tensors: the qparams are the modules').
    build: (dim, relu, BN tensors, input qparams, output qparams, float clamp or None, name for messages)
        -> the int8 BN module: the kernel's ReLU variant when ``relu``, then a clamp to the float bounds.
        The tensors are checked float32 copies nobody else holds (``fxqbn.nn.own_many``).
    rebuild: the same from an int8 BN module holding tensors read from a file instead of BN tensors,
        checked as ``build`` checks (``fxqbn.load`` compares the two).
    quantize / dequantize: qparams -> the float -> int8 / int8 -> float boundary module.
    op_names: (dim as text, "N" when picked by rank; relu; clamp; activation name) -> the kernel, as the report names it.
    modules: the module types it installs (a model holding one was converted already: ``fxqbn.prepare`` refuses it).
    """

    name: str
    consumes: str
    build: Callable[..., nn.Module]
    rebuild: Callable[..., nn.Module]
    quantize: Callable[[QParams], nn.Module]
    dequantize: Callable[[QParams], nn.Module]
    op_names: Callable[[str, bool, bool, str], str]
    modules: tuple[type, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or self.consumes not in (QUANTIZED, CODES):
            raise ValueError(f"backend {self.name!r}: a name, and consumes {QUANTIZED!r} or {CODES!r}")
        for field in ("build", "rebuild", "quantize", "dequantize", "op_names"):
            if not callable(getattr(self, field)):
                raise ValueError(f"backend {self.name!r}: {field} must be callable")
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in self.modules):
            raise ValueError(f"backend {self.name!r}: modules must be nn.Module types")

    @property
    def dequantize_shared(self) -> bool:
        """One dequantize module serves every boundary: quantized tensors carry their qparams."""
        return self.consumes == QUANTIZED

    def op_name(self, dim: int | None, relu: bool, clamp: bool, activation: str) -> str:
        return self.op_names("N" if dim is None else str(dim), relu, clamp, activation)

    def op_for(self, rule: Rule) -> str:
        """The kernel a rule's module runs, as the report names it."""
        act = rule.activation
        return self.op_name(rule.dim, act.relu, act.clamp, act.name)

    def module_for(self, rule: Rule, tensors: BnTensors, qin: QParams, qout: QParams, name: str) -> nn.Module:
        """The module replacing a pattern of ``rule`` whose BN holds ``tensors``, between ``qin`` and ``qout``."""
        act = rule.activation
        clamp = finite_clamp(act.lo, act.hi, qout) if act.clamp else None
        ((mean, var, weight, bias),) = own_many([(name, tensors)])
        return self.build(rule.dim, act.relu, BnTensors(mean, var, weight, bias, tensors.eps, tensors.momentum), qin, qout, clamp, name)


_NATIVE_CLASSES = {  # (dim, the kernel's ReLU) -> the fxqbn.nn module
    (1, False): qnn.BatchNorm1d, (2, False): qnn.BatchNorm2d, (3, False): qnn.BatchNorm3d,
    (1, True): qnn.BNReLU1d, (2, True): qnn.BNReLU2d, (3, True): qnn.BNReLU3d,
}


def _native(dim: int, relu: bool, t: BnTensors, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    return _NATIVE_CLASSES[(dim, relu)].from_tensors(
        t.running_mean, t.running_var, t.weight, t.bias, t.eps, t.momentum, qout, name=name, clamp=clamp, checked=True
    )


def _native_again(dim: int, relu: bool, m: nn.Module, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    return _NATIVE_CLASSES[(dim, relu)].from_tensors(
        m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.momentum, qout, name=name, clamp=clamp
    )


def _code_clamp(clamp: tuple[float, float] | None, qout: QParams) -> tuple[int, int] | None:
    return None if clamp is None else qops.clamp_bounds(*clamp, qout.scale, qout.zero_point, qout.dtype)


def _fused(dim: int, relu: bool, t: BnTensors, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    return fused.FusedBatchNorm.from_tensors(t, dim, relu, qin, qout, name=name, clamp=_code_clamp(clamp, qout), checked=True)


def _fused_again(dim: int, relu: bool, m: nn.Module, qin: QParams, qout: QParams, clamp, name: str) -> nn.Module:
    bounds = fused.code_bounds(qout, relu, _code_clamp(clamp, qout))
    return fused.FusedBatchNorm(dim, m.alpha, m.beta, m.table, qin, qout, bounds, relu=relu, kernel=m.kernel, name=name, saved=True)


NATIVE = Backend(  # PyTorch's quantized op library on quint8/qint8 tensors (fxqbn.nn modules)
    name="native",
    consumes=QUANTIZED,
    build=_native,
    rebuild=_native_again,
    quantize=Quantize.from_qparams,
    dequantize=lambda qparams: DeQuantize(),
    op_names=lambda dim, relu, clamp, act: f"quantized::batch_norm{dim}d" + ("_relu" if relu else "") + ("+quantized::clamp" if clamp else ""),
    modules=(qnn._QuantizedBatchNorm, Quantize, DeQuantize),
)

FUSED = Backend(  # one integer affine map per channel (C kernels) on plain uint8/int8 tensors (fxqbn.fused)
    name="fused",
    consumes=CODES,
    build=_fused,
    rebuild=_fused_again,
    quantize=fused.FusedQuantize.from_qparams,
    dequantize=fused.FusedDeQuantize.from_qparams,
    op_names=lambda dim, relu, clamp, act: f"fxqbn.fused.batch_norm{dim}d" + (f"_{act.lower()}" if act else ""),
    modules=(fused.FusedBatchNorm, fused.FusedQuantize, fused.FusedDeQuantize),
)

BACKENDS = {backend.name: backend for backend in (NATIVE, FUSED)}


def backend_named(name: object) -> Backend:
    """The backend called ``name``; FxqbnError listing the choices otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise FxqbnError(f"unknown backend {name!r}: choose one of {', '.join(repr(n) for n in BACKENDS)}")
    return backend
