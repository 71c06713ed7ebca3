"""The only module that calls PyTorch's quantized op library.

Everything that creates quantized tensors or runs a quantized kernel goes through
these functions, so the deprecation of quantized dtypes (pytorch#184982) touches
one file.  Graph nodes created by the passes target these functions directly.
"""

from __future__ import annotations

import torch

from .errors import FxqbnError

__all__ = ["quantize", "dequantize", "batch_norm", "empty_quantized", "BN_OP_NAMES"]


# (spatial rank of the BN, fused ReLU) -> the kernel that computes it.
_BN_OPS = {
    (1, False): torch.ops.quantized.batch_norm1d,
    (1, True): torch.ops.quantized.batch_norm1d_relu,
    (2, False): torch.ops.quantized.batch_norm2d,
    (2, True): torch.ops.quantized.batch_norm2d_relu,
    (3, False): torch.ops.quantized.batch_norm3d,
    (3, True): torch.ops.quantized.batch_norm3d_relu,
}

BN_OP_NAMES = {key: f"quantized::{op._qualified_op_name.split('::')[1]}" for key, op in _BN_OPS.items()}


def quantize(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """Float -> quantized boundary: the same rounding as ``torch.quantize_per_tensor``.

    Refuses what the CPU-only kernels cannot take (another dtype or device) with an FxqbnError
    instead of the dispatcher's message.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise FxqbnError(
            f"fxqbn's quantized BatchNorm takes float32 CPU tensors, got {x.dtype} on {x.device}: "
            "pass x.float().cpu()"
        )
    return torch.quantize_per_tensor(x, scale, zero_point, dtype)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """Quantized -> float boundary."""
    return x.dequantize()


def empty_quantized(like: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """An empty quantized tensor shaped like ``like``, carrying the given qparams."""
    return torch._empty_affine_quantized(list(like.shape), scale=scale, zero_point=zero_point, dtype=like.dtype)


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    output_scale: float,
    output_zero_point: int,
    dim: int,
    relu: bool,
) -> torch.Tensor:
    """Run ``quantized::batch_norm{dim}d[_relu]`` on a per-tensor quantized input.

    Spelled as branches, not a lookup in ``_BN_OPS``, so that ``torch.jit.script`` compiles it.
    """
    args = (weight, bias, running_mean, running_var, eps, output_scale, output_zero_point)
    if dim == 1:
        return torch.ops.quantized.batch_norm1d_relu(x, *args) if relu else torch.ops.quantized.batch_norm1d(x, *args)
    if dim == 2:
        return torch.ops.quantized.batch_norm2d_relu(x, *args) if relu else torch.ops.quantized.batch_norm2d(x, *args)
    if dim == 3:
        return torch.ops.quantized.batch_norm3d_relu(x, *args) if relu else torch.ops.quantized.batch_norm3d(x, *args)
    raise ValueError(f"no quantized batch_norm kernel for dim={dim}")
