"""The fused backend's boundaries: float32 <-> plain uint8/int8 codes, exactly as the installed torch.

``quantize`` gives ``torch.quantize_per_tensor(x, scale, zp, dtype).int_repr()`` and ``dequantize``
gives ``Tensor.dequantize()`` of those codes, bit for bit, without making a quantized tensor.
torch versions round differently (2.13: ``rne(fma(x, 1/scale, zp))``; 2.14.1: ``zp + rne(x * (1/scale))``),
so the rounding is probed once per process (``rounding()``) against ``torch.quantize_per_tensor``
itself, and ``dequantize`` is checked on all 256 codes for each (scale, zero point) before the fast
kernel serves it. Values that leave the range where torch's vector and scalar code paths agree
(|x / scale| > 2^30, inf, NaN) are sent to ``fxqbn.qops.quantize``, which saturates them on every torch.

The fast kernels are the C ones (``fxqbn.ckernels``); without them, and under tracing
(torch.export, torch.compile, fx) or TorchScript, the formulas below run as ordinary aten ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import qops
from .ckernels import EXT, threads, warn_if_missing
from .errors import FxqbnError
from .qparams import DTYPE_RANGES, PLAIN_TO_QUANTIZED, QParams

__all__ = ["Rounding", "rounding", "quantize", "dequantize", "integer_dtype", "FusedQuantize", "FusedDeQuantize"]

QUANTIZED_DTYPES = PLAIN_TO_QUANTIZED  # plain dtype -> quantized dtype
INTEGER_DTYPES = {q: plain for plain, q in PLAIN_TO_QUANTIZED.items()}  # quantized dtype -> plain dtype
_F32 = torch.float32


def integer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The plain integer dtype that carries codes of quantized ``dtype`` (quint8 -> uint8, qint8 -> int8)."""
    return INTEGER_DTYPES[dtype]


def tracing(x: object) -> bool:
    """True under torch.compile / torch.export / fx tracing: the kernels must be traced as aten ops."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()




def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its elements fill its memory without gaps in one of the layouts the kernels walk; else a contiguous copy."""
    if x.is_contiguous() or (x.dim() in qops.CHANNELS_LAST and x.is_contiguous(memory_format=qops.CHANNELS_LAST[x.dim()])):
        return x
    if x.dim() >= 3 and x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


# -- quantize -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rounding:
    """How this torch's ``quantize_per_tensor`` computes a code (found by ``rounding()``).

    mul_first: ``zp + rne(x * inv)`` (torch 2.14.1) rather than ``rne(fma(x, inv, zp))`` (2.13).
    inv_in_f64: ``inv = f32(1 / scale)`` divided in float64 rather than ``1.0f / f32(scale)``.
    """

    mul_first: bool
    inv_in_f64: bool

    def inverse(self, scale: float) -> float:
        if self.inv_in_f64:
            return float(torch.tensor(1.0 / scale, dtype=_F32))
        return float(torch.tensor(1.0, dtype=_F32) / torch.tensor(scale, dtype=_F32))


ROUNDINGS = (Rounding(False, False), Rounding(True, False), Rounding(False, True), Rounding(True, True))


def quantize_formula(x: torch.Tensor, inv: float, zp: int, lo: int, hi: int, mul_first: bool, dtype: torch.dtype) -> torch.Tensor:
    """The codes as aten ops (traced / scripted / probing path); +inf, NaN and values past the int32
    range saturate to ``hi``, -inf to ``lo``, as ``fxqbn.qops.quantize`` defines them on every torch."""
    x = x.to(torch.float32)
    if mul_first:
        t = x * inv
    else:
        t = (x.to(torch.float64) * inv + float(zp)).to(torch.float32)  # fma: the product is exact in f64
    # NaN and t >= 2147483520 (where torch 2.14.1's vector path would wrap) become that bound, then hi
    # after the clamp: one select (a NaN compares False), which torch.compile vectorizes.
    t = torch.where(t < 2147483520.0, t, 2147483520.0)
    q = torch.round(t) + float(zp) if mul_first else torch.round(t)
    return q.clamp(float(lo), float(hi)).to(dtype)


def _candidate(x: torch.Tensor, r: Rounding, scale: float, zp: int, dtype: torch.dtype) -> torch.Tensor:
    """What the fast path computes under rounding ``r`` (C kernel when built, else the formula)."""
    lo, hi = DTYPE_RANGES[dtype]
    if EXT is None:
        return quantize_formula(x, r.inverse(scale), zp, lo, hi, r.mul_first, integer_dtype(dtype))
    out = torch.empty_like(x, dtype=integer_dtype(dtype))
    EXT.quantize(x.data_ptr(), out.data_ptr(), x.numel(), r.inverse(scale), zp, lo, hi, r.mul_first, 1)
    return out


def _probe_inputs() -> list[tuple[torch.Tensor, float, int, torch.dtype]]:
    """Values at, and one float32 ulp either side of, rounding ties, for a few qparams; long (torch's
    vector path) and short (its scalar path). The first is where torch 2.13 and 2.14.1 differ."""
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.tensor([0.19004565] * 40), 0.0115179233, 133, torch.quint8)]
    for i in range(12):
        scale = float(torch.exp(torch.randn(1, generator=gen, dtype=torch.float64) * 2) * 0.05)
        if i % 2:
            scale = float(torch.tensor(scale, dtype=_F32))
        dtype = (torch.quint8, torch.qint8)[i % 2]
        lo, hi = DTYPE_RANGES[dtype]
        zp = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ties = (torch.randint(-300, 300, (4099,), generator=gen).float() + 0.5) * torch.tensor(scale, dtype=_F32)
        step = torch.randint(-1, 2, ties.shape, generator=gen)
        x = torch.where(step > 0, torch.nextafter(ties, torch.tensor(1e30)), torch.where(step < 0, torch.nextafter(ties, torch.tensor(-1e30)), ties))
        cases += [(x, scale, zp, dtype), (x[:7].clone(), scale, zp, dtype)]
    return cases


@functools.lru_cache(maxsize=1)
def rounding() -> Rounding | None:
    """The rounding of this torch's ``quantize_per_tensor``, probed once; None if no candidate matches
    (then ``quantize`` always calls torch's op)."""
    cases = _probe_inputs()
    for r in ROUNDINGS:
        if all(torch.equal(_candidate(x, r, s, z, d), qops.quantize(x, s, z, d).int_repr()) for x, s, z, d in cases):
            return r
    return None


@functools.lru_cache(maxsize=1024)
def _quantize_constants(scale: float, zero_point: int, dtype: torch.dtype) -> tuple[Rounding | None, float, int, int]:
    """(this torch's rounding, 1/scale as it rounds it, qmin, qmax), after checking the arguments."""
    if dtype not in INTEGER_DTYPES:
        raise FxqbnError(f"fxqbn.fused.quantize takes torch.quint8 or torch.qint8, got {dtype}")
    s = torch.tensor(scale, dtype=_F32)
    if not (bool(torch.isfinite(s)) and float(s) > 0):
        raise FxqbnError(f"fxqbn.fused.quantize: scale {scale!r} is not a positive float32 number")
    r = rounding()
    return r, (r or ROUNDINGS[0]).inverse(scale), *DTYPE_RANGES[dtype]


@torch.compiler.assume_constant_result  # torch.compile: run once, eagerly; its numbers are the graph's constants
def _formula_constants(scale: float, zero_point: int, dtype: torch.dtype) -> tuple[bool, float, int, int]:
    """What ``quantize_formula`` takes for these qparams: (mul_first, 1/scale as torch rounds it, qmin, qmax)."""
    r, inv, lo, hi = _quantize_constants(scale, zero_point, dtype)
    return (r or ROUNDINGS[0]).mul_first, inv, lo, hi


def quantize(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """Float -> plain uint8 (``torch.quint8``) or int8 (``torch.qint8``) codes, equal to
    ``torch.quantize_per_tensor(x, scale, zero_point, dtype).int_repr()``; same shape and layout."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FxqbnError(f"fxqbn.fused.quantize expects a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    scale, zero_point = float(scale), int(zero_point)
    if tracing(x):
        mul_first, inv, lo, hi = _formula_constants(scale, zero_point, dtype)
        return quantize_formula(x, inv, zero_point, lo, hi, mul_first, integer_dtype(dtype))
    r, inv, lo, hi = _quantize_constants(scale, zero_point, dtype)
    x = dense(x if x.dtype == _F32 else x.to(_F32))
    if EXT is not None and r is not None and x.device.type == "cpu":
        out = torch.empty_like(x, dtype=integer_dtype(dtype))
        if not EXT.quantize(x.data_ptr(), out.data_ptr(), x.numel(), inv, zero_point, lo, hi, r.mul_first, threads()):
            return out
    warn_if_missing()
    return qops.quantize(x, scale, zero_point, dtype).int_repr()


# -- dequantize ---------------------------------------------------------------------------------------


def dequantize_formula(x: torch.Tensor, scale32: float, zp: int) -> torch.Tensor:
    """(q - zp) * scale in float32, as aten ops; ``scale32`` is the scale rounded to float32."""
    return x.to(torch.float32).sub_(float(zp)).mul_(scale32)


@torch.compiler.assume_constant_result  # torch.compile: a constant of the graph
def _scale32(scale: float) -> float:
    return float(torch.tensor(scale, dtype=_F32))


def _fast_dequantize(x: torch.Tensor, scale: float, zero_point: int, threads_: int) -> torch.Tensor:
    if EXT is None:
        return dequantize_formula(x, _scale32(scale), zero_point)
    out = torch.empty_like(x, dtype=_F32)
    EXT.dequantize(x.data_ptr(), out.data_ptr(), x.numel(), scale, zero_point, x.dtype == torch.int8, threads_)
    return out


@functools.lru_cache(maxsize=1024)
def _dequantize_exact(scale: float, zero_point: int, dtype: torch.dtype) -> bool:
    """Whether the fast path gives torch's floats for every code with these qparams (long and short input)."""
    lo, hi = DTYPE_RANGES[QUANTIZED_DTYPES[dtype]]
    codes = torch.arange(lo, hi + 1, dtype=torch.int32).repeat(5)[:1283].to(dtype)
    for x in (codes, codes[:5].clone()):
        if not torch.equal(_fast_dequantize(x, scale, zero_point, 1), qops.dequantize(qops.from_codes(x, scale, zero_point))):
            return False
    return True


def _check_codes(x: object) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in QUANTIZED_DTYPES:
        raise FxqbnError(f"fxqbn.fused.dequantize expects uint8 or int8 codes, got {getattr(x, 'dtype', type(x).__name__)}")


def dequantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Plain uint8/int8 codes -> float32, equal to ``Tensor.dequantize()`` of the quantized tensor."""
    _check_codes(x)
    scale, zero_point = float(scale), int(zero_point)
    if tracing(x):
        return dequantize_formula(x, _scale32(scale), zero_point)
    x = dense(x)
    if _dequantize_exact(scale, zero_point, x.dtype):
        if EXT is None:
            warn_if_missing()
        return _fast_dequantize(x, scale, zero_point, threads())
    return qops.dequantize(qops.from_codes(x, scale, zero_point))


# -- the boundary modules --------------------------------------------------------------------------------


class _FusedBoundary(nn.Module):
    """A boundary of the fused backend: plain codes carry no qparams, so the module holds them."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.qparams = QParams(scale, zero_point, dtype)
        r = rounding() or ROUNDINGS[0]  # what TorchScript runs (probed here, outside any tracing)
        self._scale, self._zero_point, self._inv, self._mul_first = float(scale), int(zero_point), r.inverse(scale), r.mul_first
        self._scale32, self._code_dtype = _scale32(scale), integer_dtype(dtype)
        self._lo, self._hi = DTYPE_RANGES[dtype]

    @classmethod
    def from_qparams(cls, qparams: QParams) -> "_FusedBoundary":
        return cls(qparams.scale, qparams.zero_point, qparams.dtype)

    def extra_repr(self) -> str:
        q = self.qparams
        return f"scale={q.scale:.6g}, zero_point={q.zero_point}, dtype={q.dtype}"


class FusedQuantize(_FusedBoundary):
    """The float -> plain-codes boundary: ``quantize`` with fixed qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._formula(x)
        return self._eager(x)

    def _formula(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_formula(x, self._inv, self._zero_point, self._lo, self._hi, self._mul_first, self._code_dtype)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # fx tracing: aten ops in the graph
            return self._formula(x)
        if x.dtype != _F32 or x.device.type != "cpu":
            raise FxqbnError(
                f"fxqbn's fused BatchNorm takes float32 CPU tensors, got {x.dtype} on {x.device}: pass x.float().cpu()"
            )
        if torch.compiler.is_compiling():  # this module's constants, as numbers: one graph of aten ops
            return self._formula(x)
        return quantize(x, self._scale, self._zero_point, self.qparams.dtype)


class FusedDeQuantize(_FusedBoundary):
    """The plain-codes -> float boundary: ``dequantize`` with fixed qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return dequantize_formula(x, self._scale32, self._zero_point)
        return self._eager(x)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # fx tracing: aten ops in the graph
            return dequantize_formula(x, self._scale32, self._zero_point)
        if torch.compiler.is_compiling():  # this module's constants, as numbers: one graph of aten ops
            _check_codes(x)
            return dequantize_formula(x, self._scale32, self._zero_point)
        return dequantize(x, self._scale, self._zero_point)
