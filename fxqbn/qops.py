"""The only module that calls PyTorch's quantized op library.

Everything that creates quantized tensors or runs a quantized kernel goes through
these functions, so the deprecation of quantized dtypes (pytorch#184982) touches
one file. The graph reaches them through the modules of ``fxqbn.nn`` (Quantize, DeQuantize and the
quantized BatchNorms); ``fxqbn.fused`` calls them to build its reference tables and where it hands
an input to torch's own op.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import torch

from .errors import FxqbnError

__all__ = [
    "CHANNELS_LAST", "quantize", "dequantize", "batch_norm", "empty_quantized", "empty_quantized_as", "BN_OP_NAMES",
    "codes", "quantizer", "from_codes", "quantize_decomposed", "clamp", "clamp_bounds", "eagerly", "batch_norm_between_floats",
]

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # a tensor's rank -> its channels-last memory format

# pytorch#184982: quantized tensors are deprecated; fxqbn creates them knowingly, here only. The filter
# matches that one message, raised by this module's calls, and leaves every other warning alone.
warnings.filterwarnings(
    "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation",
    category=UserWarning, module=re.escape(__name__) + "$",
)


# (spatial rank of the BN, fused ReLU) -> the name of the kernel ``batch_norm`` runs for it.
BN_OP_NAMES = {(dim, relu): f"quantized::batch_norm{dim}d" + ("_relu" if relu else "") for dim in (1, 2, 3) for relu in (False, True)}


def _saturates(dtype: torch.dtype) -> bool:
    """Whether this torch's ``quantize_per_tensor`` already gives what ``quantize`` promises: +inf, huge
    values (past 2**31 steps too) and NaN the highest code, -inf and huge negatives the lowest. Probed
    on a tensor long enough for its vector path and a tail, at three sets of qparams."""
    qmin, qmax = (0, 255) if dtype == torch.quint8 else (-128, 127)
    special = torch.tensor([math.inf, -math.inf, math.nan, 1e30, -1e30, 1e10, -1e10, 3e9, -3e9])
    x = special.repeat(512)[:-3]
    expected = torch.where(torch.isnan(x) | (x > 0), qmax, qmin)
    for scale, zero_point in ((1.0, qmin), (0.0117, (qmin + qmax) // 2), (1e-6, qmax)):
        codes = torch.quantize_per_tensor(x, scale, zero_point, dtype).int_repr().long()
        if not torch.equal(codes, expected):
            return False
    return True


@functools.lru_cache(maxsize=1)
def _torch_saturates() -> bool:
    """Whether this torch's ``quantize_per_tensor`` saturates as ``quantize`` promises, for both dtypes:
    True on torch 2.13.0, False on 2.14.1, where ``quantize`` clamps first (one more pass over the
    input). Probed on first use, not at import, then remembered."""
    return _saturates(torch.quint8) and _saturates(torch.qint8)


def quantize(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """Float -> quantized boundary: ``torch.quantize_per_tensor``, defined alike on every supported
    torch: values beyond the codes' float range saturate, and NaN takes the highest code (as on
    torch 2.13.0; 2.14.1 maps +inf, NaN and values past about 2**31 steps to code 0 for quint8).

    Refuses what the CPU-only kernels cannot take (another dtype or device) with an FxqbnError
    instead of the dispatcher's message.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise FxqbnError(
            f"fxqbn's quantized BatchNorm takes float32 CPU tensors, got {x.dtype} on {x.device}: "
            "pass x.float().cpu()"
        )
    if torch.jit.is_scripting():
        guard = True  # a scripted model may run on another torch than the one that scripted it
    else:
        guard = not _torch_saturates()  # TorchScript compiles only the branch above
    if guard and x.numel() > 0:
        qmin, qmax = (0, 255) if dtype == torch.quint8 else (-128, 127)
        low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        lo, hi = torch.aminmax(x.detach())  # one pass; NaN propagates into both
        if bool(torch.isnan(lo)):
            x = torch.nan_to_num(x, nan=high, posinf=high, neginf=low)
            lo, hi = torch.aminmax(x.detach())
        if float(lo) < low or float(hi) > high:
            x = x.clamp(low, high)  # the same codes as unclamped, where torch's own arithmetic is exact
    return torch.quantize_per_tensor(x, scale, zero_point, dtype)


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """Quantized -> float boundary."""
    return x.dequantize()


def codes(x: torch.Tensor) -> torch.Tensor:
    """The integer codes of a quantized tensor, as a plain uint8/int8 tensor."""
    return x.int_repr()


def quantizer(x: torch.Tensor) -> tuple:
    """A quantized tensor's scheme and qparams as plain data: (scheme, scale, zero point), per channel
    (scheme, scales, zero points, axis), the lists exact (float64 scales, int zero points)."""
    scheme = x.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return (str(scheme), x.q_scale(), x.q_zero_point())
    return (str(scheme), x.q_per_channel_scales().tolist(), x.q_per_channel_zero_points().tolist(), x.q_per_channel_axis())


def from_codes(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The per-tensor quantized tensor whose ``int_repr()`` is ``codes`` (uint8 -> quint8, int8 -> qint8)."""
    return torch._make_per_tensor_quantized_tensor(codes, scale, zero_point)


def quantize_decomposed(
    x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: torch.dtype
) -> torch.Tensor:
    """PT2E's quantize (``quantized_decomposed.quantize_per_tensor``) to plain uint8/int8 codes."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

    return torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)


def empty_quantized(like: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """An empty quantized tensor shaped like ``like``, carrying the given qparams."""
    return torch._empty_affine_quantized(list(like.shape), scale=scale, zero_point=zero_point, dtype=like.dtype)


def empty_quantized_as(x: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty quantized tensor of ``x``'s shape and layout (``x`` dense: contiguous, or channels innermost)."""
    if x.is_contiguous():
        return torch._empty_affine_quantized(list(x.shape), scale=scale, zero_point=zero_point, dtype=dtype)
    last = CHANNELS_LAST.get(x.dim())
    if last is not None and x.is_contiguous(memory_format=last):
        return torch._empty_affine_quantized(list(x.shape), scale=scale, zero_point=zero_point, dtype=dtype, memory_format=last)
    last = torch._empty_affine_quantized(list(x.movedim(1, -1).shape), scale=scale, zero_point=zero_point, dtype=dtype)
    return last.movedim(-1, 1)


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

    Spelled as branches, not a table lookup, so that ``torch.jit.script`` compiles it.
    """
    args = (weight, bias, running_mean, running_var, eps, output_scale, output_zero_point)
    if dim == 1:
        return torch.ops.quantized.batch_norm1d_relu(x, *args) if relu else torch.ops.quantized.batch_norm1d(x, *args)
    if dim == 2:
        return torch.ops.quantized.batch_norm2d_relu(x, *args) if relu else torch.ops.quantized.batch_norm2d(x, *args)
    if dim == 3:
        return torch.ops.quantized.batch_norm3d_relu(x, *args) if relu else torch.ops.quantized.batch_norm3d(x, *args)
    raise ValueError(f"no quantized batch_norm kernel for dim={dim}")


def clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The quantized clamp of a per-tensor quantized tensor to the float bounds [lo, hi] (what torch.ao
    runs for ReLU6 / hardtanh / clamp on quantized tensors: the bounds quantized with ``x``'s qparams)."""
    return torch.clamp(x, lo, hi)


def clamp_bounds(lo: float, hi: float, scale: float, zero_point: int, dtype: torch.dtype) -> tuple[int, int]:
    """The code range ``clamp`` leaves of every code of ``dtype`` with these qparams: the same clamp
    on plain codes. Found by running the installed torch's quantized clamp on all 256 codes."""
    every = torch.arange(256, dtype=torch.int32) + (0 if dtype == torch.quint8 else -128)
    q = from_codes(every.to(torch.uint8 if dtype == torch.quint8 else torch.int8), scale, zero_point)
    out = codes(torch.clamp(q, lo, hi)).to(torch.int32)
    return int(out.min()), int(out.max())


@torch.compiler.disable(recursive=True)
def eagerly(forward, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``forward(x)`` run eagerly under torch.compile, which cannot trace quantized tensors (fake
    tensors have no quantized dtypes): one clean graph break instead of tracing in and failing op by
    op. Modules call it only while compiling, so eager calls skip the disabled frame's overhead."""
    return forward(x)


# -- one op for torch.compile ------------------------------------------------------------------------
# Fake tensors have no quantized dtypes, so torch.compile cannot trace a quantized tensor: a quantized
# BN between float code (``fxqbn.float_io.FloatIO`` on the native backend) is given to it as this one
# opaque op, float in, float out, which runs the same calls as the eager modules.


@torch.library.custom_op("fxqbn::native_batch_norm_between_floats", mutates_args=())
def batch_norm_between_floats(
    x: torch.Tensor, input_scale: float, input_zero_point: int, dtype: torch.dtype, weight: torch.Tensor,
    bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, output_scale: float,
    output_zero_point: int, dim: int, relu: bool, clamp_bounds: list[float] | None,
) -> torch.Tensor:
    """``dequantize(clamp(batch_norm(quantize(x))))`` as ``fxqbn.nn``'s Quantize, quantized BatchNorm and
    DeQuantize compute it, in the layout ``_between_floats_layout`` declares."""
    q = quantize(x, input_scale, input_zero_point, dtype)
    if q.numel() == 0:
        y = empty_quantized(q, output_scale, output_zero_point)
    else:
        y = batch_norm(q, weight, bias, running_mean, running_var, eps, output_scale, output_zero_point, dim, relu)
        y = clamp(y, clamp_bounds[0], clamp_bounds[1]) if clamp_bounds is not None else y
    return dequantize(y).contiguous(memory_format=_between_floats_layout(x))


def _between_floats_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout the native kernels return: channels last for 4-d and 5-d input, contiguous otherwise."""
    return CHANNELS_LAST.get(x.dim(), torch.contiguous_format)


@batch_norm_between_floats.register_fake
def _(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x, memory_format=_between_floats_layout(x))
