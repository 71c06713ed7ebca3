"""The fused integer backend: quantized BatchNorm on plain uint8/int8 tensors, no quantized dtype.

In the quantized domain a BatchNorm is one affine map per channel on the integers. The native
kernel (``quantized::batch_norm{1,2,3}d[_relu]``, measured with torch 2.13 on x86-64 AVX2) computes,
in this order and precision (f32: float32, f64: float64)::

    inv_sigma = rsqrt(running_var + f32(eps))                                  # torch.rsqrt, f32
    alpha     = f32( f64(f32(inv_sigma * weight)) * (in_scale / out_scale) )   # ratio in f64
    beta      = f32( f64(f32(bias - f32(running_mean * inv_sigma) * weight)) / out_scale )
    q         = clamp(out_zp + round_half_even(fma_f32(alpha, x - in_zp, beta)), lo, hi)

with ``lo = out_zp`` for the ReLU variants. ``FusedBatchNorm`` reproduces that bit for bit on plain
integer tensors. Because an 8-bit input has only 256 codes per channel, exactness is proved once,
at construction: the native table (every channel x every code, computed exactly with an emulated
float32 fma) is compared with what the fast kernel computes; a channel where the kernel's
``(x - in_zp) * a + b`` (two roundings, no fma) differs gets ``a``/``b`` moved by a few float32 ulps
until every code matches, and a module where that fails runs a lookup table instead.

The boundaries match ``torch.quantize_per_tensor`` (``round_half_even(fma_f32(x, 1/scale, zp))``,
then clamp; computed here as an f64 multiply-add rounded to f32) and ``dequantize``
(``(q - zp) * f32(scale)``).

Kernels are plain torch functions. With ``COMPILE`` true (the default; ``FXQBN_COMPILE=0`` in the
environment turns it off) each is traced with symbolic sizes and compiled by inductor (the compiler
behind ``torch.compile``, called through ``torch._inductor.standalone_compile`` to skip dynamo's
per-call guards) on first use, and cached for the process: new shapes reuse it. If compiling fails
(no C++ compiler, ...) fxqbn warns once and runs the same functions eagerly, with the same results.
Under ``torch.export`` / ``torch.compile`` of a whole model they are traced as ordinary aten ops.

Tensors of four 8-bit codes per int32 word: the compiler vectorizes 8-bit loads poorly (8 codes
per partial load), so contiguous and channels-last inputs are viewed as int32 words and each word's
four codes are unpacked, mapped and packed again with shifts. int8 codes are XORed with 0x80 into
uint8 codes (``x + 128``) and back, so one kernel serves both dtypes.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .errors import FxqbnError
from .nn import RANKS, check_shape, check_statistics
from .qparams import DTYPE_RANGES, QParams

__all__ = [
    "COMPILE", "FusedBatchNorm", "FusedQuantize", "FusedDeQuantize",
    "quantize", "dequantize", "integer_dtype", "native_codes", "fold",
]

COMPILE = os.environ.get("FXQBN_COMPILE", "1") != "0"  # compile kernels on first use; False: always eager

INTEGER_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8}  # quantized dtype -> plain dtype

_F32, _F64, _I32 = torch.float32, torch.float64, torch.int32
# Adding 1.5 * 2**23 to a float32 |t| < 2**22 leaves round_half_even(t) in the low mantissa bits: the
# int32 bit pattern is _MAGIC_BITS + round(t). Beyond that range, and for +-inf, the bit pattern is
# still monotone in t, so the clamp that follows saturates exactly as the native kernel does.
_MAGIC = 12582912.0
_MAGIC_BITS = 0x4B400000
_FLIP = -2139062144  # 0x80808080 as int32: int8 codes <-> uint8 codes (x + 128), four per word
_LITTLE_ENDIAN = sys.byteorder == "little"
_SEARCH_ULPS = 4  # how far a channel's kernel constants may move, in float32 ulps, to match every code


def integer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The plain integer dtype that carries codes of quantized ``dtype`` (quint8 -> uint8, qint8 -> int8)."""
    return INTEGER_DTYPES[dtype]


# -- kernels: plain torch functions, compiled on first use ---------------------------------------------
# ``fc`` / ``ic`` are float / int constants: tensors when compiled (so new qparams do not recompile),
# tuples of Python numbers when eager or traced by torch.export.


def _bn_codes(x: torch.Tensor, a: Any, b: Any, fc: Any, ic: Any) -> torch.Tensor:
    """Codes of one byte lane -> output codes: clamp(round((x - fc[0]) * a + b) + zp_out, ic[1], ic[2])."""
    t = (x.to(_F32) - fc[0]) * a + b
    return ((t + _MAGIC).view(_I32) + ic[0]).clamp(ic[1], ic[2])


def _bn_plain(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fc: Any, ic: Any) -> torch.Tensor:
    """The BN map on a tensor of uint8/int8 codes of any layout; ``a``, ``b`` broadcast per channel."""
    return _bn_codes(x, a, b, fc, ic).to(x.dtype)


def _bn_words(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fc: Any, ic: Any) -> torch.Tensor:
    """The BN map on int32 words of four codes; ``a[k]``, ``b[k]`` are the constants of byte ``k``."""
    w = w ^ ic[3]
    out = _bn_codes(w & 255, a[0], b[0], fc, ic)
    for k in (1, 2, 3):
        out = out | (_bn_codes((w >> (8 * k)) & 255, a[k], b[k], fc, ic) << (8 * k))
    return out ^ ic[3]


def _quantize_codes(x: torch.Tensor, fc: Any, ic: Any) -> torch.Tensor:
    """clamp(round(f32(x * fc[0] + fc[1]))) + offset, with ic = (offset - _MAGIC_BITS, lo + offset, hi + offset)."""
    s = (x.to(_F64) * fc[0] + fc[1]).to(_F32)  # fma_f32(x, 1/scale, zp): the product is exact in f64
    return ((s + _MAGIC).view(_I32) + ic[0]).clamp(ic[1], ic[2])


def _quantize_plain(x: torch.Tensor, fc: Any, ic: Any, dtype: torch.dtype) -> torch.Tensor:
    return _quantize_codes(x, fc, ic).to(dtype)


def _quantize_words(x4: torch.Tensor, fc: Any, ic: Any) -> torch.Tensor:
    """Floats viewed as (n, 4) -> n int32 words of four codes."""
    out = _quantize_codes(x4[:, 0], fc, ic)
    for k in (1, 2, 3):
        out = out | (_quantize_codes(x4[:, k], fc, ic) << (8 * k))
    return out ^ ic[3]


_compiled: dict[tuple, Callable] = {}  # (kernel, argument signature) -> compiled artifact
_compiled_ok: set[Callable] = set()  # kernels that compiled and ran at least once
_compile_failed: list[str] = []  # the reason, once compiling has failed in this process


def _signature(args: tuple) -> tuple:
    """What a compiled kernel is specialised on: dtypes, ranks and which sizes are 1; other values as is."""
    return tuple((a.dtype, tuple(s == 1 for s in a.shape)) if isinstance(a, torch.Tensor) else a for a in args)


def _compile(fn: Callable, args: tuple) -> Callable:
    """``fn`` traced with symbolic sizes (make_fx) and compiled by inductor (torch.compile's compiler).

    Compiled without dynamo, so a call costs no guard evaluation (~10 us instead of ~150 us here);
    the callers make every tensor argument contiguous and the cache key carries dtypes, ranks and
    size-1 dimensions, which is everything the traced graph is specialised on.
    """
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def tensor_fn(*ts: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, t in zip(tensors, ts):
            full[i] = t
        return fn(*full)

    examples = [args[i] for i in tensors]
    # No duck shaping: equal sizes in the example (a 4-word row and the 4 byte lanes, C == L, ...)
    # must not become one symbol, or the kernel would only be right for that coincidence.
    with fx_config.patch(use_duck_shape=False):
        graph = make_fx(tensor_fn, tracing_mode="symbolic")(*examples)
    for node in graph.graph.nodes:  # standalone_compile(from_graph) takes the shape env from here
        if "val" in node.meta:
            node.meta.setdefault("example_value", node.meta["val"])
    artifact = torch._inductor.standalone_compile(graph, examples, dynamic_shapes="from_graph")

    def run(*call_args: Any) -> torch.Tensor:
        out = artifact(*[call_args[i] for i in tensors])
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


def _call(fn: Callable, eager_args: tuple, tensor_args: Callable[[], tuple]) -> torch.Tensor:
    """Run kernel ``fn``: compiled (once per argument signature, then cached) when possible, else eagerly.

    ``tensor_args`` gives the arguments for the compiled kernel (constants as tensors, so new
    qparams do not recompile); every tensor in them is contiguous.
    """
    if not COMPILE or _compile_failed or torch.compiler.is_compiling() or torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in eager_args
    ):
        return fn(*eager_args)
    args = tensor_args()
    if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args):
        return fn(*eager_args)
    key = (fn, _signature(args))
    try:
        with torch.no_grad():
            compiled = _compiled.get(key)
            if compiled is None:
                compiled = _compiled[key] = _compile(fn, args)
            out = compiled(*args)
    except Exception as exc:  # a compiler failure on first use: remember it and stay eager
        if fn in _compiled_ok:
            raise
        _compile_failed.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            f"fxqbn.fused: compiling the kernels failed ({type(exc).__name__}); running them eagerly "
            "(same results, slower)", RuntimeWarning, stacklevel=3,
        )
        return fn(*eager_args)
    _compiled_ok.add(fn)
    return out


# -- layouts -----------------------------------------------------------------------------------------


def _channels_last(x: torch.Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """A 1-d view of a dense contiguous / channels-last tensor, and how to give a result the same layout."""
    if x.is_contiguous():
        return x.view(-1), lambda y: y.view(x.shape)
    if _channels_last(x):
        perm = (0, *range(2, x.dim()), 1)
        inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
        nhwc = x.permute(perm)
        return nhwc.reshape(-1), lambda y: y.view(nhwc.shape).permute(inverse)
    return None


def _packable(x: torch.Tensor) -> bool:
    return _LITTLE_ENDIAN and x.numel() % 4 == 0 and x.storage_offset() % 4 == 0 and x.numel() > 0


@functools.lru_cache(maxsize=256)
def _boundary_constants(scale: float, zero_point: int, dtype: torch.dtype) -> tuple[float, int, int, int]:
    """(1/scale as torch rounds it, the zero point, qmin, qmax) for ``quantize``."""
    if dtype not in INTEGER_DTYPES:
        raise FxqbnError(f"fxqbn.fused.quantize takes torch.quint8 or torch.qint8, got {dtype}")
    lo, hi = DTYPE_RANGES[dtype]
    scale32 = torch.tensor(scale, dtype=_F32)
    if not (torch.isfinite(scale32) and scale32 > 0):
        raise FxqbnError(f"fxqbn.fused.quantize: scale {scale!r} is not a positive float32 number")
    inv = float(torch.tensor(1.0, dtype=_F32) / scale32)  # torch: 1.0f / (float)scale
    return inv, int(zero_point), lo, hi


def quantize(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """Float -> plain uint8 (``torch.quint8``) or int8 (``torch.qint8``) codes, rounded exactly as
    ``torch.quantize_per_tensor(x, scale, zero_point, dtype).int_repr()``; same shape and layout."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FxqbnError(f"fxqbn.fused.quantize expects a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    inv, zp, lo, hi = _boundary_constants(float(scale), int(zero_point), dtype)
    x = x.to(_F32)
    flat = _flat(x)
    if flat is None or not _packable(x):
        values, restore = flat if flat is not None else (x.contiguous().view(-1), lambda y: y.view(x.shape))
        fc, ic, out = (inv, zp), (-_MAGIC_BITS, lo, hi), integer_dtype(dtype)
        codes = _call(_quantize_plain, (values, fc, ic, out),
                      lambda: (values, torch.tensor(fc, dtype=_F64), torch.tensor(ic, dtype=_I32), out))
        return restore(codes)
    values, restore = flat
    # int8 codes become uint8 codes (+128) after rounding (the rounding sees the real zero point), then flip back
    shift, flip = (128, _FLIP) if dtype == torch.qint8 else (0, 0)
    fc, ic = (inv, zp), (shift - _MAGIC_BITS, lo + shift, hi + shift, flip)
    x4 = values.view(-1, 4)
    words = _call(_quantize_words, (x4, fc, ic), lambda: (x4, torch.tensor(fc, dtype=_F64), torch.tensor(ic, dtype=_I32)))
    return restore(words.view(integer_dtype(dtype)))


def dequantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Plain uint8/int8 codes -> float32, exactly as ``Tensor.dequantize`` of the quantized tensor."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.uint8, torch.int8):
        raise FxqbnError(f"fxqbn.fused.dequantize expects uint8 or int8 codes, got {getattr(x, 'dtype', type(x).__name__)}")
    # Eager on purpose: ATen's uint8 -> float32 conversion and two in-place float ops beat a compiled
    # kernel here (which loads 8-bit codes 8 at a time). (q - zp) is exact; one rounding in the multiply.
    return x.to(_F32).sub_(float(zero_point)).mul_(float(torch.tensor(scale, dtype=_F32)))


# -- exact emulation of the native kernel (construction time only) -----------------------------------


def _fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c) with one rounding, for float32 inputs: the product is exact in f64, the
    sum is made exact-or-odd (round to odd, Boldo & Melquiond) so that rounding to f32 is correct."""
    a, b, c = (t.to(_F64) for t in torch.broadcast_tensors(a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: s + err == p + c exactly
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
    s = torch.where((err != 0) & even & torch.isfinite(s), torch.nextafter(s, toward), s)
    return s.to(_F32)


def fold(bn: Any, qin: QParams, qout: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel's per-channel (alpha, beta), float32, computed exactly as it computes them.

    ``bn``: anything with ``running_mean``, ``running_var``, ``weight``, ``bias`` (None: not affine) and ``eps``.
    """
    var = bn.running_var.detach().to(_F32)
    mean = bn.running_mean.detach().to(_F32)
    weight = bn.weight.detach().to(_F32) if bn.weight is not None else torch.ones_like(var)
    bias = bn.bias.detach().to(_F32) if bn.bias is not None else torch.zeros_like(var)
    inv_sigma = torch.rsqrt(var + torch.tensor(bn.eps, dtype=_F32))
    alpha = ((inv_sigma * weight).to(_F64) * (qin.scale / qout.scale)).to(_F32)
    beta = ((bias - (mean * inv_sigma) * weight).to(_F64) / qout.scale).to(_F32)
    return alpha, beta


def _bounds(qout: QParams, relu: bool) -> tuple[int, int]:
    lo, hi = DTYPE_RANGES[qout.dtype]
    return (max(lo, qout.zero_point) if relu else lo), hi


def native_codes(alpha: torch.Tensor, beta: torch.Tensor, qin: QParams, qout: QParams, relu: bool) -> torch.Tensor:
    """(C, 256) int32: the native kernel's output code for every channel and every input code."""
    lo, hi = DTYPE_RANGES[qin.dtype]
    v = (torch.arange(lo, hi + 1, dtype=_I32) - qin.zero_point).to(_F32)
    t = _fma_f32(alpha[:, None], v[None, :], beta[:, None])
    out_lo, out_hi = _bounds(qout, relu)
    return (torch.round(t).to(_F64) + qout.zero_point).clamp(out_lo, out_hi).to(_I32)


def _kernel_codes(a: torch.Tensor, b: torch.Tensor, qin: QParams, qout: QParams, relu: bool) -> torch.Tensor:
    """What ``_bn_codes`` computes for every code: ``a``, ``b`` of shape (..., C) -> (..., C, 256)."""
    lo, hi = DTYPE_RANGES[qin.dtype]
    codes = torch.arange(lo, hi + 1, dtype=_I32).to(integer_dtype(qin.dtype))
    out_lo, out_hi = _bounds(qout, relu)
    fc, ic = (float(qin.zero_point),), (qout.zero_point - _MAGIC_BITS, out_lo, out_hi)
    return _bn_codes(codes, a[..., None], b[..., None], fc, ic)


def _ulps(t: torch.Tensor, n: int) -> torch.Tensor:
    """(2n+1, *t.shape): ``t`` moved by 0, +1, -1, +2, -2, ... float32 ulps."""
    out, up, down = [t], t, t
    for _ in range(n):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        out += [up, down]
    return torch.stack(out)


def _kernel_constants(
    alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, qin: QParams, qout: QParams, relu: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) for which ``_bn_codes`` reproduces ``table`` for every channel and code; None if not found."""
    a, b = alpha.clone(), beta.clone()
    bad = (_kernel_codes(a, b, qin, qout, relu) != table).any(dim=1).nonzero().flatten()
    if bad.numel() == 0:
        return a, b
    k = 2 * _SEARCH_ULPS + 1
    cand_a = _ulps(alpha[bad], _SEARCH_ULPS)[:, None, :].expand(k, k, -1)  # (ka, kb, nbad)
    cand_b = _ulps(beta[bad], _SEARCH_ULPS)[None, :, :].expand(k, k, -1)
    ok = (_kernel_codes(cand_a, cand_b, qin, qout, relu) == table[bad]).all(dim=-1)  # (ka, kb, nbad)
    cost = (torch.arange(k)[:, None] + 1) // 2 + (torch.arange(k)[None, :] + 1) // 2  # ulps moved in all
    cost = torch.where(ok, cost[..., None], torch.iinfo(torch.int64).max).flatten(0, 1)  # (ka*kb, nbad)
    best = cost.argmin(dim=0)
    if not bool(ok.flatten(0, 1)[best, torch.arange(bad.numel())].all()):
        return None
    a[bad] = cand_a.flatten(0, 1)[best, torch.arange(bad.numel())]
    b[bad] = cand_b.flatten(0, 1)[best, torch.arange(bad.numel())]
    return a, b


# -- the module --------------------------------------------------------------------------------------


class FusedBatchNorm(nn.Module):
    """A quantized BatchNorm (+ReLU) of any dim on plain integer codes, bit-exact with the native kernel.

    Input and output are uint8 (quint8 qparams) or int8 (qint8) tensors of codes; the qparams are
    Python numbers on the module. Contiguous input gives contiguous output, channels-last input gives
    channels-last output (the native kernel returns channels-last always; the values are the same).

    Buffers: ``alpha``, ``beta`` (the native kernel's per-channel constants), ``kernel_a``/``kernel_b``
    (what the compiled map uses: equal to alpha/beta except in channels where moving them by a few
    ulps makes the map without fma reproduce the native one for every code), and ``table`` (C, 256),
    used instead when no such constants exist (``mode == "table"``).
    """

    def __init__(self, dim: int, relu: bool, alpha: torch.Tensor, beta: torch.Tensor, input_qparams: QParams,
                 output_qparams: QParams, kernel: str = "auto") -> None:
        super().__init__()
        if dim not in RANKS:
            raise FxqbnError(f"FusedBatchNorm dim must be 1, 2 or 3, got {dim}")
        if input_qparams.dtype != output_qparams.dtype:
            raise FxqbnError(f"input dtype {input_qparams.dtype} and output dtype {output_qparams.dtype} differ")
        if kernel not in ("auto", "table"):
            raise FxqbnError(f"kernel must be 'auto' or 'table', got {kernel!r}")
        if not (torch.isfinite(alpha).all() and torch.isfinite(beta).all()):
            raise FxqbnError(
                "the folded BatchNorm constants are not finite (running_var + eps is 0, or a parameter is inf/NaN): "
                "fix the BatchNorm's statistics or keep it float"
            )
        self.dim, self.relu, self.num_features = dim, relu, alpha.numel()
        self.input_qparams, self.output_qparams = input_qparams, output_qparams
        self.register_buffer("alpha", alpha.to(_F32).contiguous())
        self.register_buffer("beta", beta.to(_F32).contiguous())
        table = native_codes(self.alpha, self.beta, input_qparams, output_qparams, relu)
        found = None if kernel == "table" else _kernel_constants(self.alpha, self.beta, table, input_qparams, output_qparams, relu)
        self.mode = "affine" if found is not None else "table"
        a, b = found if found is not None else (self.alpha, self.beta)
        self.register_buffer("kernel_a", a.contiguous())
        self.register_buffer("kernel_b", b.contiguous())
        self.register_buffer("table", table.to(integer_dtype(input_qparams.dtype)).flatten() if self.mode == "table" else None)
        lo, hi = DTYPE_RANGES[input_qparams.dtype]
        out_lo, out_hi = _bounds(output_qparams, relu)
        zin, zout = input_qparams.zero_point, output_qparams.zero_point
        self._plain = ((float(zin),), (zout - _MAGIC_BITS, out_lo, out_hi))
        shift, flip = (128, _FLIP) if input_qparams.dtype == torch.qint8 else (0, 0)
        self._words = ((float(zin + shift),), (zout + shift - _MAGIC_BITS, out_lo + shift, out_hi + shift, flip))
        for name, (fc, ic) in (("plain", self._plain), ("words", self._words)):  # what the compiled kernels take
            self.register_buffer(f"_{name}_fc", torch.tensor(fc, dtype=_F32), persistent=False)
            self.register_buffer(f"_{name}_ic", torch.tensor(ic, dtype=_I32), persistent=False)
        c = self.num_features
        self.register_buffer("_rows_a", a.view(1, 1, c, 1).expand(4, 1, c, 1).contiguous(), persistent=False)
        self.register_buffer("_rows_b", b.view(1, 1, c, 1).expand(4, 1, c, 1).contiguous(), persistent=False)
        self._code_lo = lo

    @classmethod
    def from_bn(cls, bn: nn.Module, dim: int, relu: bool, input_qparams: QParams, output_qparams: QParams,
                kernel: str = "auto") -> "FusedBatchNorm":
        """Build from a float BatchNorm in eval mode with running statistics, and both qparams."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise FxqbnError(f"FusedBatchNorm.from_bn expects a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise FxqbnError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it normalises with "
                "batch statistics and cannot be quantized; keep it float"
            )
        return cls.from_tensors(bn, dim, relu, input_qparams, output_qparams, name=type(bn).__name__, kernel=kernel)

    @classmethod
    def from_tensors(cls, bn: Any, dim: int, relu: bool, input_qparams: QParams, output_qparams: QParams,
                     name: str = "BatchNorm", kernel: str = "auto") -> "FusedBatchNorm":
        """Build from BN tensors (``fxqbn.backends.BnTensors``), refusing statistics that would
        silently saturate a channel (``fxqbn.nn.check_statistics``), naming ``name``."""
        check_statistics(name, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        alpha, beta = fold(bn, input_qparams, output_qparams)
        return cls(dim, relu, alpha, beta, input_qparams, output_qparams, kernel)

    # -- forward -------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        want = integer_dtype(self.input_qparams.dtype)
        if not isinstance(x, torch.Tensor) or x.dtype != want:
            got = getattr(x, "dtype", type(x).__name__)
            raise FxqbnError(
                f"{self._get_name()} expects {want} codes of {self.input_qparams.dtype} input, got {got}: "
                f"quantize it with fxqbn.fused.quantize(x, scale, zero_point, {self.input_qparams.dtype}) first"
            )
        check_shape(self._get_name(), x, self.dim, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        channel = (1, -1) + (1,) * (x.dim() - 2)
        if self.mode == "table":
            index = (x.to(torch.int64) - self._code_lo) + (torch.arange(self.num_features, device=x.device) * 256).view(channel)
            return self.table[index]
        n, c = x.shape[0], x.shape[1]
        spatial = x.numel() // max(n * c, 1)
        a, b = self.kernel_a, self.kernel_b
        if _packable(x) and x.is_contiguous() and spatial % 4 == 0:  # (N, C, S/4) words, one channel per row
            w = x.view(n, c, spatial).view(_I32)
            out = self._run_words(w, self._rows_a, self._rows_b)
            return out.view(x.dtype).view(x.shape)
        if _packable(x) and _channels_last(x) and c % 4 == 0:  # rows of C codes: byte k of word j is channel 4j+k
            flat, restore = _flat(x)
            rows, per_row = x.numel() // c, c // 4
            tile = 1
            while per_row * tile < 64 and rows % (2 * tile) == 0:  # a longer inner loop vectorizes better
                tile *= 2
            w = flat.view(_I32).view(rows // tile, per_row * tile)
            a4, b4 = a.view(per_row, 4).t().repeat(1, tile), b.view(per_row, 4).t().repeat(1, tile)
            return restore(self._run_words(w, a4, b4).view(x.dtype).view(-1))
        fc, ic = self._plain
        if _channels_last(x):  # (N*S, C) rows, channels innermost
            flat, restore = _flat(x)
            xs, a_c, b_c = flat.view(-1, c), a.view(1, c), b.view(1, c)
        else:
            xs, a_c, b_c = x.contiguous().view(n, c, spatial), a.view(1, c, 1), b.view(1, c, 1)
            restore = lambda y: y.view(x.shape)  # noqa: E731
        out = _call(_bn_plain, (xs, a_c, b_c, fc, ic), lambda: (xs, a_c, b_c, self._plain_fc, self._plain_ic))
        return restore(out.view(-1) if out.dim() == 2 else out)

    def _run_words(self, w: torch.Tensor, a4: torch.Tensor, b4: torch.Tensor) -> torch.Tensor:
        fc, ic = self._words
        return _call(_bn_words, (w, a4, b4, fc, ic), lambda: (w, a4, b4, self._words_fc, self._words_ic))

    # -- presentation --------------------------------------------------------------------------------
    def _get_name(self) -> str:
        return f"FusedBN{'ReLU' if self.relu else ''}{self.dim}d"

    def extra_repr(self) -> str:
        qin, qout = self.input_qparams, self.output_qparams
        return (
            f"{self.num_features}, {str(qin.dtype).removeprefix('torch.')}, mode={self.mode}, "
            f"input=({qin.scale:.6g}, {qin.zero_point}), output=({qout.scale:.6g}, {qout.zero_point})"
        )



class _FusedBoundary(nn.Module):
    """A boundary of the fused backend: plain codes carry no qparams, so the module holds them."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.qparams = QParams(scale, zero_point, dtype)

    @classmethod
    def from_qparams(cls, qparams: QParams) -> "_FusedBoundary":
        return cls(qparams.scale, qparams.zero_point, qparams.dtype)

    def extra_repr(self) -> str:
        q = self.qparams
        return f"scale={q.scale:.6g}, zero_point={q.zero_point}, dtype={q.dtype}"


class FusedQuantize(_FusedBoundary):
    """The float -> plain-codes boundary: ``quantize`` with fixed qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != _F32 or x.device.type != "cpu":
            raise FxqbnError(
                f"fxqbn's fused BatchNorm takes float32 CPU tensors, got {x.dtype} on {x.device}: pass x.float().cpu()"
            )
        return quantize(x, self.qparams.scale, self.qparams.zero_point, self.qparams.dtype)


class FusedDeQuantize(_FusedBoundary):
    """The plain-codes -> float boundary: ``dequantize`` with fixed qparams."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize(x, self.qparams.scale, self.qparams.zero_point)
