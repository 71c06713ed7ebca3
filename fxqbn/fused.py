"""The fused integer backend: quantized BatchNorm on plain uint8/int8 tensors, no quantized dtype.

In the quantized domain a BatchNorm is one affine map per channel on the integers. An 8-bit input
has only 256 codes per channel, so ``FusedBatchNorm`` is exact by construction: when it is built it
runs the installed torch's native op (``quantized::batch_norm*`` through ``fxqbn.qops``) on all 256
codes of every channel, clamps them to the module's code range [lo, hi] (ReLU: lo = zero point),
and keeps that (C, 256) ``table``. Then it checks its fast kernels against the table, every code:

* the C kernel (``fxqbn/_ckernels.c``): ``clamp(zout + rne(fma(alpha, x - zin, beta)), lo, hi)``
  with the native op's own constants ``alpha``, ``beta`` (``fold``); a channel where it differs (for
  |alpha * v + beta| >= 2^31 the native op clips and adds the zero point in int32) runs the table;
* the pure-torch kernel (no C extension, ``FXQBN_NO_EXT=1``, tracing, TorchScript):
  ``(x - zin) * a + b`` with two float32 roundings, ``a``/``b`` moved by a few ulps per channel
  until every code matches; if a channel cannot be matched the torch path gathers from the table.

``fxqbn.fused_io`` holds the boundaries (``quantize``/``dequantize``, exact with the installed torch).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from fxqbn.passes.registry import RANKS

from . import qops
from .ckernels import EXT, threads, warn_if_missing
from .errors import FxqbnError
from .fused_io import (  # noqa: F401  (re-exported: the fused backend's public names)
    FusedDeQuantize, FusedQuantize, Rounding, dense, dequantize, integer_dtype, quantize, rounding, tracing,
)
from .nn import check_shape, check_statistics
from .qparams import DTYPE_RANGES, QParams

__all__ = [
    "FusedBatchNorm", "FusedQuantize", "FusedDeQuantize", "quantize", "dequantize", "integer_dtype",
    "fold", "native_table", "code_bounds",
]

_F32, _F64, _I32 = torch.float32, torch.float64, torch.int32
_SEARCH_ULPS = 4  # how far a channel's torch-kernel constants may move, in float32 ulps, to match every code
_VECTOR = 64  # codes per step of the C kernel (AVX-512; 32 with AVX2): per-element constants repeat with a period that is a multiple
_PERIOD = 1024  # ... of it, and at least this long


def fold(bn: Any, qin: QParams, qout: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel's per-channel (alpha, beta), float32, computed as it computes them (torch 2.13/2.14):
    ``alpha = f32(f64(f32(rsqrt(var + eps) * weight)) * (in_scale / out_scale))``, ``beta`` likewise.

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


def code_bounds(qout: QParams, relu: bool, clamp: tuple[int, int] | None = None) -> tuple[int, int]:
    """The output code range: the dtype's, raised to the zero point for ReLU, narrowed to ``clamp``."""
    lo, hi = DTYPE_RANGES[qout.dtype]
    want = clamp if clamp is not None else (lo, hi)
    if not (len(want) == 2 and all(isinstance(v, int) for v in want) and lo <= want[0] <= want[1] <= hi):
        raise FxqbnError(f"FusedBatchNorm clamp must be two codes lo <= hi within [{lo}, {hi}] for {qout.dtype}, got {clamp!r}")
    lo, hi = max(lo, want[0]), want[1]
    return (min(max(lo, qout.zero_point), hi) if relu else lo), hi


def native_table(bn: Any, dim: int, relu: bool, qin: QParams, qout: QParams, bounds: tuple[int, int]) -> torch.Tensor:
    """(C, 256) output codes of the installed torch's native op for every channel and input code,
    clamped to ``bounds``. The op runs on rows of C channels, as it would on any input."""
    c = bn.running_mean.numel()
    x = _code_rows(qin.dtype, c).view(256, c, *([1] * dim if dim > 1 else []))
    weight = bn.weight.detach().float().contiguous() if bn.weight is not None else torch.ones(c)
    bias = bn.bias.detach().float().contiguous() if bn.bias is not None else torch.zeros(c)
    out = qops.batch_norm(
        qops.from_codes(x, qin.scale, qin.zero_point), weight, bias, bn.running_mean.detach().float().contiguous(),
        bn.running_var.detach().float().contiguous(), float(bn.eps), qout.scale, qout.zero_point, dim, relu,
    ).int_repr()
    return out.reshape(256, c).t().clamp(*bounds).contiguous()


@functools.lru_cache(maxsize=None)  # two dtypes
def _every_code(dtype: torch.dtype) -> torch.Tensor:
    """The 256 codes of ``dtype`` in order, as plain integers (shared between calls: never written)."""
    lo, hi = DTYPE_RANGES[dtype]
    return torch.arange(lo, hi + 1, dtype=_I32).to(integer_dtype(dtype))


@functools.lru_cache(maxsize=32)
def _code_rows(dtype: torch.dtype, c: int) -> torch.Tensor:
    """(256, c): row k is code k in every channel (shared between calls: never written)."""
    return _every_code(dtype).view(256, 1).expand(256, c).contiguous()


# -- the pure-torch kernel -----------------------------------------------------------------------------


def bn_formula(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, zin: float, zout: int, lo: int, hi: int) -> torch.Tensor:
    """clamp(zout + round_half_even((x - zin) * a + b), lo, hi) as int32, two float32 roundings."""
    # Saturated far outside any code before the int32 conversion, as only this kernel does: the C
    # kernel converts out-of-range values to INT32_MIN, the native op clips them to 2147483520 and
    # adds the zero point in int32. Channels where a kernel then differs from the native op run the table.
    t = ((x.to(torch.float32) - zin) * a + b).clamp(-1073741824.0, 1073741824.0)
    return (torch.round(t).to(torch.int32) + zout).clamp(lo, hi)


def affine_codes(alpha: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype, zin: int, zout: int,
                 bounds: tuple[int, int]) -> torch.Tensor:
    """(C, 256) int32: ``bn_formula`` with ``alpha``, ``beta`` on every code of ``dtype`` in every channel."""
    return bn_formula(_every_code(dtype), alpha[:, None].to(_F32), beta[:, None].to(_F32), float(zin), zout, *bounds)


def _ulps(t: torch.Tensor, n: int) -> torch.Tensor:
    """(2n+1, *t.shape): ``t`` moved by 0, +1, -1, +2, -2, ... float32 ulps."""
    out, up, down = [t], t, t
    for _ in range(n):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        out += [up, down]
    return torch.stack(out)


def check_saved_table(name: str, alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, dtype: torch.dtype,
                      zin: int, zout: int, bounds: tuple[int, int]) -> torch.Tensor:
    """Refuse, naming BatchNorm ``name``, a ``table`` (from a file) whose codes leave ``bounds`` or lie
    more than one code from what ``alpha`` and ``beta`` give: the native op is within one of them.
    Returns what they give (``affine_codes``)."""
    if table.shape != (alpha.numel(), 256) or alpha.shape != beta.shape:
        raise FxqbnError(f"BatchNorm '{name}': its table is {tuple(table.shape)}, not ({alpha.numel()}, 256): the file is damaged; convert the model again")
    ref, formula = table.to(_I32), affine_codes(alpha, beta, dtype, zin, zout, bounds)
    far = (ref - formula).abs_().amax(dim=1) > 1
    bad = (far | (ref.amin(dim=1) < bounds[0]) | (ref.amax(dim=1) > bounds[1])).nonzero().flatten()
    if bad.numel():
        raise FxqbnError(
            f"BatchNorm '{name}': its table disagrees with its constants alpha and beta at channel {int(bad[0])} "
            f"({bad.numel()} channel(s) in all): the file is damaged; convert the model again"
        )
    return formula


def torch_constants(alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, dtype: torch.dtype,
                    zin: int, zout: int, bounds: tuple[int, int],
                    formula: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) for which ``bn_formula`` reproduces ``table`` for every channel and code; None if not
    found. ``formula``: ``affine_codes`` of ``alpha`` and ``beta``, when the caller has it."""
    codes, ref = _every_code(dtype), table.to(_I32)

    def matches(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (bn_formula(codes, a[..., None], b[..., None], float(zin), zout, *bounds) == ref[rows]).all(dim=-1)

    if formula is None:
        formula = affine_codes(alpha, beta, dtype, zin, zout, bounds)
    a, b = alpha.clone(), beta.clone()
    bad = (formula - ref).abs_().amax(dim=1).nonzero().flatten()  # integer reductions: faster than any() of bools
    if bad.numel() == 0:
        return a, b
    k = 2 * _SEARCH_ULPS + 1
    cand_a = _ulps(alpha[bad], _SEARCH_ULPS)[:, None, :].expand(k, k, -1)  # (ka, kb, nbad)
    cand_b = _ulps(beta[bad], _SEARCH_ULPS)[None, :, :].expand(k, k, -1)
    ok = matches(cand_a, cand_b, bad)  # (ka, kb, nbad)
    cost = (torch.arange(k)[:, None] + 1) // 2 + (torch.arange(k)[None, :] + 1) // 2  # ulps moved in all
    cost = torch.where(ok, cost[..., None], torch.iinfo(torch.int64).max).flatten(0, 1)  # (ka*kb, nbad)
    best, cols = cost.argmin(dim=0), torch.arange(bad.numel())
    if not bool(ok.flatten(0, 1)[best, cols].all()):
        return None
    a[bad], b[bad] = cand_a.flatten(0, 1)[best, cols], cand_b.flatten(0, 1)[best, cols]
    return a, b


# -- the C kernel --------------------------------------------------------------------------------------


class _CKernel:
    """The C kernel's constants for one module, and the calls into it (plain tensors, not buffers:
    ``module.to(dtype)`` must not change them). Every channel runs the affine map until
    ``use_table`` marks some to run their table."""

    def __init__(self, alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, dtype: torch.dtype,
                 zin: int, zout: int, bounds: tuple[int, int]) -> None:
        c = alpha.numel()
        period = c * _VECTOR // math.gcd(c, _VECTOR)
        period *= -(-_PERIOD // period)  # long enough that the loop runs many blocks per pass
        self.channels, self.period = c, period
        repeats = -(-(period + _VECTOR) // c)  # >= period + _VECTOR entries: see the C
        self.a, self.b = torch.stack([alpha, beta]).to(_F32)[:, None, :].expand(2, repeats, c).reshape(2, -1)  # float *
        self.table = table.contiguous().view(torch.uint8)
        self.ints = (zin, zout, bounds[0], bounds[1], int(dtype == torch.qint8))
        self.table_mask, self.table_channels = torch.zeros(c, dtype=torch.uint8), torch.zeros(0, dtype=_I32)
        self._set_constants()

    def use_table(self, channels: torch.Tensor) -> None:
        """Run the table in the ``channels`` marked True ((C,) bool), the affine map in the others."""
        self.table_mask = channels.to(torch.uint8).contiguous()
        self.table_channels = channels.nonzero().flatten().to(_I32)
        self._set_constants()

    def _set_constants(self) -> None:
        """The kernel's constant arguments, pointers into this object's own tensors."""
        self.constants = (self.a.data_ptr(), self.b.data_ptr(), self.period, self.table.data_ptr(), self.table_mask.data_ptr(),
                          self.table_channels.data_ptr(), self.table_channels.numel(), *self.ints)

    def __getstate__(self) -> dict:  # copies and pickles get new tensors: their pointers are recomputed
        return {k: v for k, v in self.__dict__.items() if k != "constants"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_constants()

    def run(self, x: torch.Tensor, out: torch.Tensor, per_element: bool, rows: int, row_len: int, n_threads: int) -> None:
        """x, out: dense tensors of the same layout; rows of ``row_len`` codes (one channel per row
        unless ``per_element``: then channel = flat index % C)."""
        EXT.bn(x.data_ptr(), out.data_ptr(), rows, row_len, self.channels, per_element, *self.constants, n_threads)

    def mismatches(self, dtype: torch.dtype) -> torch.Tensor:
        """(C,) bool: channels where the kernel's output differs from its table on some code of
        ``dtype``, in any of its per-element, vector-row and scalar-row paths."""
        c = self.channels
        per_element, rows, short = _probe_layouts(dtype, c)
        out = torch.empty(3, c * 256, dtype=torch.uint8)  # bytes, as the table
        self.run(per_element, out[0], True, 256, c, 1)
        self.run(rows, out[1], False, c, 256, 1)
        self.run(short, out[2], False, 16 * c, 16, 1)
        mask = torch.empty(c, dtype=torch.uint8)
        EXT.mismatches(out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), self.table.data_ptr(), c, mask.data_ptr())
        return mask.bool()


@functools.lru_cache(maxsize=32)
def _probe_layouts(dtype: torch.dtype, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every code of ``dtype`` in each of ``c`` channels, laid out for the C kernel's three paths:
    (256, c) per element, (c, 256) one channel per row, (16, c, 16) rows of 16 (its scalar code).
    Shared between calls: never written."""
    codes = _every_code(dtype)
    rows = codes.view(1, 256).expand(c, 256).contiguous()
    return _code_rows(dtype, c), rows, codes.view(16, 1, 16).expand(16, c, 16).contiguous()


# -- the module ------------------------------------------------------------------------------------------


def _check_arguments(name: str, dim: int, qin: QParams, qout: QParams, kernel: str) -> None:
    """Refuse, naming BatchNorm ``name``, what no FusedBatchNorm can be built from."""
    if dim not in RANKS:
        raise FxqbnError(f"BatchNorm '{name}': FusedBatchNorm dim must be 1, 2 or 3, got {dim}")
    if qin.dtype != qout.dtype:
        raise FxqbnError(f"BatchNorm '{name}': input dtype {qin.dtype} and output dtype {qout.dtype} differ")
    if kernel not in ("auto", "table"):
        raise FxqbnError(f"BatchNorm '{name}': kernel must be 'auto' or 'table', got {kernel!r}")


class FusedBatchNorm(nn.Module):
    """A quantized BatchNorm (+ReLU, or any code clamp) of any dim on plain integer codes, bit-exact
    with the installed torch's native op.

    Input and output are uint8 (quint8 qparams) or int8 (qint8) tensors of codes; the qparams are
    Python numbers on the module. Contiguous input gives contiguous output, channels-last input gives
    channels-last output (the native op returns channels-last always; the values are the same); other
    strided input gives contiguous output.

    Buffers (saved): ``alpha``, ``beta`` (the native op's per-channel constants) and ``table`` (C, 256),
    the native op's output for every code. Everything else is derived from them (``_derive``).
    """

    __jit_unused_properties__ = ["mode"]  # torch.jit.script: a Python-side description only

    def __init__(self, dim: int, alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, input_qparams: QParams,
                 output_qparams: QParams, bounds: tuple[int, int], relu: bool = False, kernel: str = "auto", *,
                 name: str = "BatchNorm", saved: bool = False) -> None:
        """Errors name BatchNorm ``name``; ``saved``: ``alpha``, ``beta`` and ``table`` come from a file,
        so the table is checked against the constants (``check_saved_table``) too."""
        super().__init__()
        _check_arguments(name, dim, input_qparams, output_qparams, kernel)
        self._setup(dim, alpha, beta, table, input_qparams, output_qparams, bounds, relu, kernel, name, saved)

    def _setup(self, dim: int, alpha: torch.Tensor, beta: torch.Tensor, table: torch.Tensor, qin: QParams, qout: QParams,
               bounds: tuple[int, int], relu: bool, kernel: str, name: str, saved: bool) -> None:
        """Buffers and attributes from checked arguments, then the kernels (``_derive``)."""
        if not bool(torch.isfinite(alpha).all() & torch.isfinite(beta).all()):
            raise FxqbnError(f"BatchNorm '{name}': " + (
                "its constants alpha / beta are not finite: the file is damaged; convert the model again" if saved else
                "the folded constants are not finite (running_var + eps is 0, or a parameter is inf/NaN): "
                "fix the BatchNorm's statistics or keep it float"))
        codes, (lo, hi) = integer_dtype(qin.dtype), bounds
        self.register_buffer("alpha", alpha.to(_F32).contiguous())
        self.register_buffer("beta", beta.to(_F32).contiguous())
        self.register_buffer("table", table.to(codes).contiguous())
        self.dim, self.relu, self.kernel, self.num_features = dim, relu, kernel, alpha.numel()
        self.input_qparams, self.output_qparams, self.bounds = qin, qout, (lo, hi)
        # what forward takes
        self._zin, self._zout, self._lo, self._hi = qin.zero_point, qout.zero_point, lo, hi
        self._code_lo, self._codes, self._ranks = DTYPE_RANGES[qin.dtype][0], codes, RANKS[dim]
        self._derive(name if saved else None)

    def _derive(self, saved: str | None = None) -> None:
        """The kernels' constants, from ``alpha``, ``beta`` and ``table``, each kernel checked on every
        code. ``saved``: the BatchNorm's name when the table came from a file (checked first)."""
        dtype, ints = self.input_qparams.dtype, (self._zin, self._zout, self.bounds)
        formula = None if saved is None else check_saved_table(saved, self.alpha, self.beta, self.table, dtype, *ints)
        found = None if self.kernel == "table" else torch_constants(self.alpha, self.beta, self.table, dtype, *ints, formula=formula)
        c_kernel = self._c_kernel()
        if c_kernel is not None:
            table_channels = c_kernel.table_channels.tolist()
        else:
            table_channels = list(range(self.num_features)) if found is None else []
        self._torch_table = found is None  # the torch path gathers from the table
        self._torch_a = found[0] if found is not None else self.alpha.clone()
        self._torch_b = found[1] if found is not None else self.beta.clone()
        self._table_offsets = torch.arange(self.num_features) * 256 - self._code_lo
        self._c, self.table_channels = c_kernel, table_channels

    def _c_kernel(self) -> _CKernel | None:
        """The C kernel, running the table in the channels where its affine map differs from the table
        on some code (in every channel for kernel='table'); None without the extension."""
        if EXT is None or self.num_features == 0:
            return None
        dtype = self.input_qparams.dtype
        c_kernel = _CKernel(self.alpha, self.beta, self.table, dtype, self._zin, self._zout, self.bounds)
        every = torch.ones(self.num_features, dtype=torch.bool)
        c_kernel.use_table(every if self.kernel == "table" else c_kernel.mismatches(dtype))
        return c_kernel

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive()

    @property
    def mode(self) -> str:
        """'affine' (no channel runs the table), 'table' (every channel does) or 'mixed'."""
        n = len(self.table_channels)
        return "affine" if n == 0 else ("table" if n == self.num_features else "mixed")

    @classmethod
    def from_bn(cls, bn: nn.Module, dim: int, relu: bool, input_qparams: QParams, output_qparams: QParams,
                kernel: str = "auto", clamp: tuple[int, int] | None = None) -> "FusedBatchNorm":
        """Build from a float BatchNorm in eval mode with running statistics, and both qparams."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise FxqbnError(f"FusedBatchNorm.from_bn expects a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise FxqbnError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it normalises with "
                "batch statistics and cannot be quantized; keep it float"
            )
        return cls.from_tensors(bn, dim, relu, input_qparams, output_qparams, name=type(bn).__name__, kernel=kernel, clamp=clamp)

    @classmethod
    def from_tensors(cls, bn: Any, dim: int, relu: bool, input_qparams: QParams, output_qparams: QParams,
                     name: str = "BatchNorm", kernel: str = "auto", clamp: tuple[int, int] | None = None,
                     checked: bool = False) -> "FusedBatchNorm":
        """Build from BN tensors (``fxqbn.backends.BnTensors``), refusing statistics that would
        silently saturate a channel (``fxqbn.nn.check_statistics``), naming ``name``; ``checked``:
        ``fxqbn.nn.check_many`` already passed these tensors.

        ``clamp``: output codes (lo, hi) to clamp to after the BN (e.g. ReLU6 / hardtanh as codes);
        ``relu`` raises lo to the output zero point, as the native ``_relu`` ops do.
        """
        _check_arguments(name, dim, input_qparams, output_qparams, kernel)  # before the native op meets them
        if not checked:
            check_statistics(name, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        bounds = code_bounds(output_qparams, relu, clamp)
        alpha, beta = fold(bn, input_qparams, output_qparams)
        table = native_table(bn, dim, relu, input_qparams, output_qparams, bounds)
        return cls(dim, alpha, beta, table, input_qparams, output_qparams, bounds, relu, kernel, name=name)

    # -- forward -------------------------------------------------------------------------------------
    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        want = integer_dtype(self.input_qparams.dtype)
        if not isinstance(x, torch.Tensor) or x.dtype != want:
            got = getattr(x, "dtype", type(x).__name__)
            raise FxqbnError(
                f"{self._get_name()} expects {want} codes of {self.input_qparams.dtype} input, got {got}: "
                f"quantize it with fxqbn.fused.quantize(x, scale, zero_point, {self.input_qparams.dtype}) first"
            )
        check_shape(self._get_name(), x, self.dim, self.num_features)

    def _check_scripted_input(self, x: torch.Tensor) -> None:
        """``_check_input`` in a form torch.jit.script compiles."""
        rank_ok = x.dim() == self.dim + 2 or (self.dim == 1 and x.dim() == 2)
        if not rank_ok or x.size(1) != self.num_features or x.dtype != self.table.dtype:
            raise FxqbnError(
                f"fused BatchNorm{self.dim}d with {self.num_features} channels expects {self.dim}-d input (N, C, ...) "
                f"of integer codes, got shape {x.shape} of {x.dtype}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            self._check_scripted_input(x)
            return self._forward_torch(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # fx tracing: aten ops in the graph
            return self._forward_torch(x)
        if x.dtype != self._codes or x.dim() not in self._ranks or x.shape[1] != self.num_features:
            self._check_input(x)  # raises, naming what is wrong
        if self._c is None or x.numel() == 0 or not x.is_cpu or tracing(x):
            if self._c is None:
                warn_if_missing()
            return self._forward_torch(x)
        x = dense(x)
        out = torch.empty_like(x)
        self._run(x, out)
        return out

    @torch.jit.unused
    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The same codes on quantized tensors (torch.ao graphs): the C kernel reads ``x``'s memory and
        writes a new quantized tensor's, so the codes are not copied out (``int_repr``) and back in."""
        if not x.is_quantized or x.dtype != self.input_qparams.dtype or x.dim() not in self._ranks or x.shape[1] != self.num_features:
            raise FxqbnError(
                f"{self._get_name()} expects a {self.input_qparams.dtype} quantized tensor (N, {self.num_features}, ...) "
                f"of rank {' or '.join(map(str, self._ranks))}, got shape {tuple(x.shape)} of {x.dtype}"
            )
        qout = self.output_qparams
        if self._c is None or x.numel() == 0 or not x.is_cpu or tracing(x):
            return qops.from_codes(self(qops.codes(x)), qout.scale, qout.zero_point)
        x = dense(x)
        out = qops.empty_quantized_as(x, qout.scale, qout.zero_point, qout.dtype)
        self._run(x, out)
        return out

    def _run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The C kernel from ``x``'s 8-bit codes into ``out``'s (both dense, of one layout)."""
        n, c = x.numel(), self.num_features
        row_len = n // (x.shape[0] * c)
        if row_len > 1 and x.is_contiguous():  # (N, C, S): a channel per row
            self._c.run(x, out, False, x.shape[0] * c, row_len, threads())
        else:  # channels innermost: (N * S, C)
            self._c.run(x, out, True, n // c, c, threads())

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The same codes in aten ops: the ulp-adjusted affine map, or a gather from the table. The
        constants are viewed as (C, 1, ...) to broadcast along dim 1: elementwise ops in x's own layout
        (torch.compile makes one plain loop of them; a transposed view made inductor's code slower and, in
        a MobileNetV2-style net, broke its conv + add fusion: benchmarks/pt2e.py)."""
        shape = [-1] + [1] * (x.dim() - 2)
        if self._torch_table:
            return self.table.view(-1)[x.to(torch.int64) + self._table_offsets.view(shape)]
        a, b = self._torch_a.view(shape), self._torch_b.view(shape)
        return bn_formula(x, a, b, float(self._zin), self._zout, self._lo, self._hi).to(self.table.dtype)

    # -- presentation --------------------------------------------------------------------------------
    def _get_name(self) -> str:
        return f"FusedBN{'ReLU' if self.relu else ''}{self.dim}d"

    def extra_repr(self) -> str:
        qin, qout = self.input_qparams, self.output_qparams
        full = code_bounds(qout, self.relu)
        clamp = "" if self.bounds == full else f", clamp={list(self.bounds)}"
        return (
            f"{self.num_features}, {str(qin.dtype).removeprefix('torch.')}, mode={self.mode}{clamp}, "
            f"input=({qin.scale:.6g}, {qin.zero_point}), output=({qout.scale:.6g}, {qout.zero_point})"
        )
