"""Quantized BatchNorm modules: ``BatchNorm{1,2,3}d`` and ``BNReLU{1,2,3}d``.

Modelled on ``torch/ao/nn/quantized/modules/batchnorm.py``, with its defects fixed:

* ``from_float`` keeps momentum, device and dtype (torch's drops them);
* the rank check names the right shape for every dim (torch's 3-d message says 4-D)
  and runs in ``forward``, with the channel count and the input's quantization, so
  no unchecked tensor reaches the C++ kernel;
* ``affine=False`` works (the kernel is given ones and zeros);
* statistics are stored as contiguous float32 copies, never aliases of the float module.

The output scale and zero point are buffers (they travel in ``state_dict``) and are
mirrored as Python numbers so ``forward`` does no tensor-to-number conversion.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
from torch import nn

from fxqbn.passes.registry import RANKS  # input ranks, by BN dim

from . import qops
from .errors import FxqbnError
from .qparams import QParams, observer_has_data, qparams_from_observer

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNReLU1d", "BNReLU2d", "BNReLU3d",
    "Quantize", "DeQuantize", "check_statistics", "check_many", "own_many", "check_shape",
]

SHAPES = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}  # input shape, by BN dim


def check_shape(who: str, x: torch.Tensor, dim: int, num_features: int) -> None:
    """Refuse an input of the wrong rank or channel count for a ``dim``-d BatchNorm, naming ``who``."""
    if x.dim() not in RANKS[dim]:
        raise FxqbnError(f"{who} expects input of shape {SHAPES[dim]}, got {tuple(x.shape)}")
    if x.shape[1] != num_features:
        raise FxqbnError(f"{who} has {num_features} channels, got input of shape {tuple(x.shape)} with {x.shape[1]} channels")


def _float32_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous float32 tensor (expanded or strided statistics are materialised)."""
    return t.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


def _first_bad(values: torch.Tensor, bad: torch.Tensor) -> str:
    channel = int(bad.nonzero()[0].item())
    return f"[{channel}] = {values[channel].item()!r}"


def check_statistics(
    name: str,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> None:
    """Refuse BN tensors the kernel would silently turn into saturated channels, naming the channel."""
    if not isinstance(eps, (int, float)) or not eps >= 0:  # catches NaN too
        raise FxqbnError(f"BatchNorm '{name}' has eps = {eps!r}: eps must be a non-negative number")
    n = running_mean.numel()
    present = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    if all(t.dim() == 1 and t.numel() == n for t in present):  # the common case, in three reductions
        var = running_var.detach().float()
        if bool(torch.isfinite(torch.stack([t.detach().float() for t in present])).all()) and bool((var >= 0).all()) and bool(((var + eps) > 0).all()):
            return
    # Something is wrong: find the first offender and name it.
    tensors = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for key, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1 or t.numel() != n:
            raise FxqbnError(f"BatchNorm '{name}' has {key} of shape {tuple(t.shape)}; expected ({n},)")
        values = t.detach().float()
        bad = ~torch.isfinite(values)
        if bad.any():
            raise FxqbnError(f"BatchNorm '{name}' has non-finite {key}{_first_bad(values, bad)}: fix or re-estimate the statistics")
    var = running_var.detach().float()
    negative = var < 0
    if negative.any():
        raise FxqbnError(f"BatchNorm '{name}' has negative running_var{_first_bad(var, negative)}: variances cannot be negative")
    degenerate = (var + eps) <= 0
    if degenerate.any():
        raise FxqbnError(
            f"BatchNorm '{name}' has running_var + eps <= 0 at channel {int(degenerate.nonzero()[0].item())} "
            f"(eps = {eps!r}): the channel would divide by zero; use eps > 0"
        )


def own_many(items: list[tuple[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """``check_many``, then every BN's (running_mean, running_var, weight, bias) as fresh contiguous
    float32 copies nobody else holds (what a quantized BN stores), one tensor operation each."""
    check_many(items)
    with torch.no_grad():  # a copy of a Parameter would otherwise record autograd history
        return [tuple(None if t is None else _fresh32(t) for t in _affine_tensors(b)) for _, b in items]  # type: ignore[misc]


def _fresh32(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous float32 copy of ``t`` (``clone`` when it is one already: a quarter faster)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t.clone()
    return t.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)


def _affine_tensors(b: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A BN's four tensors as the kernel takes them: a bias without a weight gets a unit weight."""
    weight = torch.ones_like(b.running_mean) if b.weight is None and b.bias is not None else b.weight
    return b.running_mean, b.running_var, weight, b.bias


def check_many(items: list[tuple[str, Any]]) -> None:
    """``check_statistics`` for many BNs ((name, tensors with running_mean, running_var, weight, bias,
    eps) pairs): in one float32 concatenation when every BN's layout is the common one (1-d tensors
    of one length, on one device), else BN by BN; the first offender is named as ``check_statistics`` names it."""
    layout = _common_layout(items)
    if layout is not None:
        tensors, channels, eps = layout
        try:
            with torch.no_grad():
                flat = torch.cat(tensors).to(torch.float32) if tensors else torch.zeros(0)
                var = torch.cat([b.running_var for _, b in items]).to(torch.float32) if items else torch.zeros(0)
        except RuntimeError:  # tensors on several devices: BN by BN
            flat = None
        if flat is not None:
            var_eps = var + torch.repeat_interleave(torch.tensor(eps, dtype=torch.float32), torch.tensor(channels, dtype=torch.long))
            if bool(torch.isfinite(flat).all()) and bool((var >= 0).all()) and bool((var_eps > 0).all()):
                return
    for name, b in items:
        check_statistics(name, b.running_mean, b.running_var, b.weight, b.bias, b.eps)


def _common_layout(items: list[tuple[str, Any]]) -> tuple[list[torch.Tensor], list[int], list[float]] | None:
    """(every BN's tensors in order, channels, eps) when every tensor is 1-d with its BN's channel
    count and every eps a number >= 0; None otherwise."""
    tensors: list[torch.Tensor] = []
    channels, eps = [], []
    for _, b in items:
        if not (isinstance(b.eps, (int, float)) and b.eps >= 0):
            return None
        n = b.running_mean.numel()
        for t in (b.running_mean, b.running_var, b.weight, b.bias):
            if t is not None:
                if t.dim() != 1 or t.numel() != n:
                    return None
                tensors.append(t)
        channels.append(n)
        eps.append(float(b.eps))
    return tensors, channels, eps


class _QuantizedBatchNorm(nn.Module):
    __constants__ = ["_DIM", "_RELU"]  # what torch.jit.script compiles in as constants
    _DIM: int = 0
    _RELU: bool = False
    _FLOAT_MODULE: type = nn.Module  # the float BN this class replaces
    _FUSED_MODULE: type | None = None  # torch.ao's fused BN+ReLU module of the same dim

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        ones, zeros = torch.ones(num_features, **factory), torch.zeros(num_features, **factory)
        self._setup(zeros, ones.clone(), ones if affine else None, zeros.clone() if affine else None, eps, momentum, 1.0, 0)

    def _setup(
        self,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        momentum: float | None,
        scale: float,
        zero_point: int,
    ) -> None:
        """Register the given tensors (taken as they are, not copied), through nn.Module's API."""
        affine = weight is not None
        device = running_mean.device
        if affine:
            bias = bias if bias is not None else torch.zeros_like(weight)
            weight, bias = nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)
            unit_weight = zero_bias = None
        else:  # what the kernel gets for an affine=False BN: not saved, rebuilt on construction
            unit_weight, zero_bias = torch.ones_like(running_mean), torch.zeros_like(running_mean)
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        self.register_buffer("_unit_weight", unit_weight, persistent=False)
        self.register_buffer("_zero_bias", zero_bias, persistent=False)
        self.register_buffer("running_mean", running_mean)
        self.register_buffer("running_var", running_var)
        self.register_buffer("scale", torch.scalar_tensor(float(scale), dtype=torch.float64, device=device))
        self.register_buffer("zero_point", torch.scalar_tensor(int(zero_point), dtype=torch.int64, device=device))
        self.num_features, self.eps, self.momentum, self.affine = running_mean.numel(), float(eps), momentum, affine
        self._scale, self._zero_point = float(scale), int(zero_point)
        self._has_clamp, self._clamp_lo, self._clamp_hi = False, 0.0, 0.0

    def _set_clamp(self, clamp: tuple[float, float] | None) -> None:
        """A quantized clamp of the output to the float bounds (lo, hi) after the kernel (e.g. ReLU6)."""
        if clamp is not None:
            lo, hi = float(clamp[0]), float(clamp[1])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise FxqbnError(f"{type(self).__name__} clamp must be finite bounds lo <= hi, got {clamp!r}")
            self._has_clamp, self._clamp_lo, self._clamp_hi = True, lo, hi

    # -- qparams ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = float(self.scale.item())
        self._zero_point = int(self.zero_point.item())

    # -- forward ---------------------------------------------------------------------------
    @torch.jit.unused  # torch.jit.script cannot compile these messages: forward uses _check_scripted_input
    def _check_input(self, x: torch.Tensor) -> None:
        check_shape(self._get_name(), x, self._DIM, self.num_features)
        if not x.is_quantized or x.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise FxqbnError(
                f"{self._get_name()} expects a per-tensor quantized input (torch.quint8 or torch.qint8), "
                f"got {x.dtype}" + ("" if not x.is_quantized else f" with {x.qscheme()}")
                + ": quantize it with torch.quantize_per_tensor first"
            )

    def _check_scripted_input(self, x: torch.Tensor) -> None:
        """The checks of ``_check_input`` in a form torch.jit.script compiles (shapes print as lists)."""
        rank_ok = x.dim() == self._DIM + 2 or (self._DIM == 1 and x.dim() == 2)
        if not rank_ok or not x.is_quantized or x.size(1) != self.num_features:
            raise FxqbnError(
                f"quantized BatchNorm{self._DIM}d with {self.num_features} channels expects a per-tensor quantized "
                f"{self._DIM}-d input (N, C, ...), got shape {x.shape} (quantized: {x.is_quantized})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            self._check_scripted_input(x)
            return self._kernel(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return qops.eagerly(self._forward_eager, x)
        self._check_input(x)
        return self._kernel(x)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # the kernel would return the input's qparams
            return qops.empty_quantized(x, self._scale, self._zero_point)
        weight = self.weight if self.weight is not None else self._unit_weight
        bias = self.bias if self.bias is not None else self._zero_bias
        y = qops.batch_norm(
            x, weight, bias, self.running_mean, self.running_var,
            self.eps, self._scale, self._zero_point, self._DIM, self._RELU,
        )
        return qops.clamp(y, self._clamp_lo, self._clamp_hi) if self._has_clamp else y

    @torch.jit.unused
    def between_floats(self, x: torch.Tensor, quantize: "Quantize") -> torch.Tensor:
        """``DeQuantize()(self(quantize(x)))`` as one op
        (``fxqbn.qops.batch_norm_between_floats``): what torch.compile, whose fake tensors have no
        quantized dtypes, runs for this BN between float code."""
        check_shape(self._get_name(), x, self._DIM, self.num_features)
        weight = self.weight if self.weight is not None else self._unit_weight
        bias = self.bias if self.bias is not None else self._zero_bias
        clamp = [self._clamp_lo, self._clamp_hi] if self._has_clamp else None
        return qops.batch_norm_between_floats(
            x, quantize._scale, quantize._zero_point, quantize.dtype, weight, bias, self.running_mean, self.running_var, self.eps,
            self._scale, self._zero_point, self._DIM, self._RELU, clamp,
        )

    # -- construction from float modules -----------------------------------------------------
    @classmethod
    def _unwrap(cls, mod: nn.Module) -> nn.Module:
        """The BatchNorm inside torch.ao's fused BN+ReLU module; ``mod`` itself otherwise."""
        return mod[0] if cls._FUSED_MODULE is not None and isinstance(mod, cls._FUSED_MODULE) else mod

    @classmethod
    def from_bn(cls, bn: nn.Module, qparams: QParams, name: str = "") -> "_QuantizedBatchNorm":
        """Build from a float BatchNorm (or torch.ao's fused BNReLU) and the output qparams.

        ``name`` (the module's qualified name) only makes error messages precise.
        """
        bn = cls._unwrap(bn)
        label = name or type(bn).__name__
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise FxqbnError(f"{cls.__name__}.from_bn expects a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise FxqbnError(
                f"BatchNorm '{label}' has track_running_stats=False: it normalises with batch statistics "
                "and cannot be quantized; keep it float"
            )
        return cls.from_tensors(
            bn.running_mean, bn.running_var, bn.weight if bn.affine else None, bn.bias if bn.affine else None,
            bn.eps, bn.momentum, qparams, name=label,
        )

    @classmethod
    def from_tensors(
        cls,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        momentum: float | None,
        qparams: QParams,
        name: str = "BatchNorm",
        clamp: tuple[float, float] | None = None,
        checked: bool = False,
    ) -> "_QuantizedBatchNorm":
        """Build from BN tensors (``weight``/``bias`` None: not affine) after checking them;
        ``clamp``: float bounds of a quantized clamp after the kernel (ReLU6: (0, 6)); ``checked``:
        the tensors are ``own_many``'s (checked float32 copies nobody else holds), taken as they are.

        Raises FxqbnError, naming ``name`` and the channel, for statistics the kernel would turn
        into silently saturated channels.
        """
        if not checked:
            check_statistics(name, running_mean, running_var, weight, bias, eps)
            # The kernel computes in float32: statistics are stored as float32 whatever the BN's dtype.
            if weight is None and bias is not None:
                weight = torch.ones_like(running_mean)
            running_mean, running_var = _float32_copy(running_mean), _float32_copy(running_var)
            weight = None if weight is None else _float32_copy(weight)
            bias = None if bias is None else _float32_copy(bias)
        qbn = cls.__new__(cls)  # nn.Module's own initial state, then the given tensors (not __init__'s placeholders)
        nn.Module.__init__(qbn)
        qbn._setup(running_mean, running_var, weight, bias, eps, momentum, qparams.scale, qparams.zero_point)
        qbn._set_clamp(clamp)
        return qbn

    @classmethod
    def from_reference(cls, bn: nn.Module, output_scale: Any, output_zero_point: Any) -> "_QuantizedBatchNorm":
        """torch.ao's entry point: a float BN and its output scale / zero point (numbers or tensors)."""
        scale = float(output_scale.item() if isinstance(output_scale, torch.Tensor) else output_scale)
        zero_point = int(output_zero_point.item() if isinstance(output_zero_point, torch.Tensor) else output_zero_point)
        # The output dtype is the input's; the guess below only picks the range the zero point is checked against.
        dtype = torch.qint8 if zero_point < 0 else torch.quint8
        return cls.from_bn(bn, QParams(scale, zero_point, dtype))

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "_QuantizedBatchNorm":
        """torch.ao's eager entry point: a float BN (or fused BN+ReLU) carrying ``activation_post_process``."""
        observer = getattr(mod, "activation_post_process", None)
        if observer is None:
            raise FxqbnError(
                f"{type(mod).__name__} has no activation_post_process observer: attach one and run "
                "calibration data through the module first"
            )
        if not observer_has_data(observer):
            raise FxqbnError(
                f"the activation_post_process observer of {type(mod).__name__} never saw data: run "
                "calibration data through the module first"
            )
        bn = cls._unwrap(mod)
        if type(bn) is not cls._FLOAT_MODULE:
            raise FxqbnError(f"{cls.__name__}.from_float expects {cls._FLOAT_MODULE.__name__}, got {type(bn).__name__}")
        return cls.from_bn(bn, qparams_from_observer(observer))

    # -- presentation -----------------------------------------------------------------------
    def _get_name(self) -> str:
        return "Quantized" + type(self).__name__

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"scale={self._scale:.6g}, zero_point={self._zero_point}"
            + (f", clamp=({self._clamp_lo:g}, {self._clamp_hi:g})" if self._has_clamp else "")
        )


class BatchNorm1d(_QuantizedBatchNorm):
    """Quantized :class:`torch.nn.BatchNorm1d` (``quantized::batch_norm1d``)."""

    _DIM, _RELU, _FLOAT_MODULE = 1, False, nn.BatchNorm1d


class BatchNorm2d(_QuantizedBatchNorm):
    """Quantized :class:`torch.nn.BatchNorm2d` (``quantized::batch_norm2d``)."""

    _DIM, _RELU, _FLOAT_MODULE = 2, False, nn.BatchNorm2d


class BatchNorm3d(_QuantizedBatchNorm):
    """Quantized :class:`torch.nn.BatchNorm3d` (``quantized::batch_norm3d``)."""

    _DIM, _RELU, _FLOAT_MODULE = 3, False, nn.BatchNorm3d


class BNReLU1d(_QuantizedBatchNorm):
    """Quantized BatchNorm1d followed by ReLU (``quantized::batch_norm1d_relu``)."""

    _DIM, _RELU, _FLOAT_MODULE = 1, True, nn.BatchNorm1d


class BNReLU2d(_QuantizedBatchNorm):
    """Quantized BatchNorm2d followed by ReLU (``quantized::batch_norm2d_relu``)."""

    _DIM, _RELU, _FLOAT_MODULE, _FUSED_MODULE = 2, True, nn.BatchNorm2d, nni.BNReLU2d


class BNReLU3d(_QuantizedBatchNorm):
    """Quantized BatchNorm3d followed by ReLU (``quantized::batch_norm3d_relu``)."""

    _DIM, _RELU, _FLOAT_MODULE, _FUSED_MODULE = 3, True, nn.BatchNorm3d, nni.BNReLU3d


class Quantize(nn.Module):
    """The float -> quantized boundary: ``torch.quantize_per_tensor`` with fixed qparams.

    A module (not a function node) so that the check of its input survives re-tracing, e.g.
    when a converted GraphModule is unpickled.
    """

    def __init__(self, scale: float = 1.0, zero_point: int = 0, dtype: torch.dtype = torch.quint8) -> None:
        super().__init__()
        QParams(scale, zero_point, dtype)  # validates
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int64))
        self.dtype = dtype
        self._scale, self._zero_point = float(scale), int(zero_point)

    @classmethod
    def from_qparams(cls, qparams: QParams) -> "Quantize":
        """The boundary for ``qparams``."""
        return cls(qparams.scale, qparams.zero_point, qparams.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = float(self.scale.item())
        self._zero_point = int(self.zero_point.item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return qops.quantize(x, self._scale, self._zero_point, self.dtype)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return qops.eagerly(self._forward_eager, x)
        return qops.quantize(x, self._scale, self._zero_point, self.dtype)

    def extra_repr(self) -> str:
        return f"scale={self._scale:.6g}, zero_point={self._zero_point}, dtype={self.dtype}"


class DeQuantize(nn.Module):
    """The quantized -> float boundary."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return qops.dequantize(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return qops.eagerly(self._forward_eager, x)
        return qops.dequantize(x)
