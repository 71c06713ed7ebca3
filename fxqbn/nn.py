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

from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
from torch import nn

from . import qops
from .errors import FxqbnError
from .qparams import QParams, observer_has_data, qparams_from_observer

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BNReLU1d", "BNReLU2d", "BNReLU3d"]

_SHAPES = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_RANKS = {1: (2, 3), 2: (4,), 3: (5,)}


def _float32_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=torch.float32, copy=True).contiguous()


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
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # What the kernel gets for an affine=False BN: not saved, rebuilt on construction.
        self.register_buffer("_unit_weight", torch.ones(num_features, **factory), persistent=False)
        self.register_buffer("_zero_bias", torch.zeros(num_features, **factory), persistent=False)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64, device=device))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64, device=device))
        self._scale = 1.0
        self._zero_point = 0

    # -- qparams ---------------------------------------------------------------------------
    def set_output_qparams(self, scale: float, zero_point: int) -> None:
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)
        self._scale = float(scale)
        self._zero_point = int(zero_point)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._scale = float(self.scale.item())
        self._zero_point = int(self.zero_point.item())

    # -- forward ---------------------------------------------------------------------------
    @torch.jit.unused  # torch.jit.script cannot compile these messages: forward uses _check_scripted_input
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in _RANKS[self._DIM]:
            raise FxqbnError(
                f"{self._get_name()} expects input of shape {_SHAPES[self._DIM]}, got {tuple(x.shape)}"
            )
        if not x.is_quantized or x.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise FxqbnError(
                f"{self._get_name()} expects a per-tensor quantized input (torch.quint8 or torch.qint8), "
                f"got {x.dtype}" + ("" if not x.is_quantized else f" with {x.qscheme()}")
                + ": quantize it with torch.quantize_per_tensor first"
            )
        if x.shape[1] != self.num_features:
            raise FxqbnError(
                f"{self._get_name()} has {self.num_features} channels, got input of shape {tuple(x.shape)} "
                f"with {x.shape[1]} channels"
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
        else:
            self._check_input(x)
        weight = self.weight if self.weight is not None else self._unit_weight
        bias = self.bias if self.bias is not None else self._zero_bias
        return qops.batch_norm(
            x, weight, bias, self.running_mean, self.running_var,
            self.eps, self._scale, self._zero_point, self._DIM, self._RELU,
        )

    # -- construction from float modules -----------------------------------------------------
    @classmethod
    def _unwrap(cls, mod: nn.Module) -> nn.Module:
        """The BatchNorm inside torch.ao's fused BN+ReLU module; ``mod`` itself otherwise."""
        return mod[0] if cls._FUSED_MODULE is not None and isinstance(mod, cls._FUSED_MODULE) else mod

    @classmethod
    def from_bn(cls, bn: nn.Module, qparams: QParams) -> "_QuantizedBatchNorm":
        """Build from a float BatchNorm (or torch.ao's fused BNReLU) and the output qparams."""
        bn = cls._unwrap(bn)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise FxqbnError(f"{cls.__name__}.from_bn expects a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise FxqbnError(
                f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it normalises with "
                "batch statistics and cannot be quantized; keep it float"
            )
        # The kernel computes in float32: statistics are stored as float32 whatever the BN's dtype.
        device = bn.running_mean.device
        qbn = cls(bn.num_features, bn.eps, bn.momentum, affine=bn.affine, device=device, dtype=torch.float32)
        with torch.no_grad():
            if bn.affine:
                qbn.weight = nn.Parameter(_float32_copy(bn.weight), requires_grad=False)
                qbn.bias = nn.Parameter(_float32_copy(bn.bias), requires_grad=False)
            qbn.running_mean = _float32_copy(bn.running_mean)
            qbn.running_var = _float32_copy(bn.running_var)
        qbn.set_output_qparams(qparams.scale, qparams.zero_point)
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
