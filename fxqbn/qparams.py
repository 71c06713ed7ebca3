"""Quantization parameters: a frozen record, and the pure function that reads one off an observer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.ao.quantization import MinMaxObserver, MovingAverageMinMaxObserver

from .errors import FxqbnError

__all__ = [
    "QParams", "Observation", "DTYPE_RANGES", "PLAIN_TO_QUANTIZED",
    "observer_has_data", "range_holder", "qparams_from_observer", "read_observer", "read_many",
]

# The activation dtypes the quantized BatchNorm kernel takes, with their integer range.
DTYPE_RANGES = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
}

PLAIN_TO_QUANTIZED = {torch.uint8: torch.quint8, torch.int8: torch.qint8}  # the dtype of plain codes -> their quantized dtype

_FLOAT32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization parameters, as Python numbers.

    scale: the float step between consecutive integers; finite, positive and normal.
    zero_point: the integer that represents 0.0; inside the dtype's range.
    dtype: ``torch.quint8`` or ``torch.qint8``.
    """

    scale: float
    zero_point: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_RANGES:
            raise FxqbnError(f"dtype {self.dtype} is not supported: use torch.quint8 or torch.qint8")
        if not (math.isfinite(self.scale) and self.scale >= _FLOAT32_TINY):
            raise FxqbnError(f"scale {self.scale!r} is not a finite, positive, normal float32 number")
        lo, hi = DTYPE_RANGES[self.dtype]
        if not lo <= self.zero_point <= hi:
            raise FxqbnError(f"zero point {self.zero_point} is outside [{lo}, {hi}] for {self.dtype}")


def range_holder(observer: torch.nn.Module) -> torch.nn.Module:
    """The module keeping the observed range: a FakeQuantize's (QAT) ``activation_post_process``,
    else the observer itself."""
    inner = getattr(observer, "activation_post_process", None)
    return inner if isinstance(inner, torch.nn.Module) and inner is not observer else observer


def observer_has_data(observer: torch.nn.Module) -> bool:
    """False when the observer keeps a running range that was never set.

    torch.ao's observers start at min=+inf, max=-inf: min > max means no batch was seen.
    (Non-finite data leaves a range that is not of that form; its qparams are refused later.)
    A FakeQuantize (QAT) module is judged by the observer inside it.
    """
    holder = range_holder(observer)
    if holder is not observer:
        return observer_has_data(holder)
    min_val = getattr(observer, "min_val", None)
    max_val = getattr(observer, "max_val", None)
    if not isinstance(min_val, torch.Tensor) or not isinstance(max_val, torch.Tensor):
        return True  # an observer without a range (e.g. fixed qparams) needs no data
    if min_val.numel() == 0 or max_val.numel() == 0:
        return False
    return not bool((min_val > max_val).any())


def qparams_from_observer(observer: torch.nn.Module) -> QParams:
    """Read per-tensor qparams off an observer that has seen data (pure: the observer is unchanged)."""
    scale, zero_point = observer.calculate_qparams()
    if scale.numel() != 1 or zero_point.numel() != 1:
        raise FxqbnError(
            f"{type(observer).__name__} returned {scale.numel()} scales; quantized BatchNorm takes "
            "per-tensor input: use a per-tensor observer"
        )
    return QParams(float(scale.item()), int(zero_point.item()), observer.dtype)


@dataclass(frozen=True)
class Observation:
    """What one observer tells after calibration: its qparams, its kind and the float range it saw."""

    qparams: QParams
    observer: str  # the observer's class name
    min_val: float | None  # observed float range; None for observers that keep none
    max_val: float | None


def read_observer(observer: torch.nn.Module) -> Observation:
    """The Observation of an observer that has seen data (pure: the observer is unchanged)."""
    qparams = qparams_from_observer(observer)
    ranged = range_holder(observer)
    lo, hi = getattr(ranged, "min_val", None), getattr(ranged, "max_val", None)
    has_range = isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) and lo.numel() == hi.numel() == 1
    return Observation(
        qparams=qparams,
        observer=type(observer).__name__,
        min_val=float(lo.item()) if has_range else None,
        max_val=float(hi.item()) if has_range else None,
    )


# Observers whose calculate_qparams is torch.ao's min/max formula, computed here for many at once.
_MIN_MAX_OBSERVERS = (MinMaxObserver, MovingAverageMinMaxObserver)


def _min_max_key(observer: torch.nn.Module) -> tuple | None:
    """What the min/max formula depends on besides the range; None when the observer is not eligible."""
    if type(observer) not in _MIN_MAX_OBSERVERS or observer.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return None
    buffers = observer._buffers  # nn.Module.__getattr__ per buffer costs more than the formula
    if buffers["min_val"].numel() != 1 or buffers["max_val"].numel() != 1 or observer.dtype not in DTYPE_RANGES:
        return None
    if buffers["eps"].numel() != 1:
        return None
    return (observer.qscheme, observer.dtype, observer.quant_min, observer.quant_max, observer.has_customized_qrange)


def _min_max_qparams(key: tuple, min_val: torch.Tensor, max_val: torch.Tensor, eps_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ao's ``UniformQuantizationObserverBase._calculate_qparams`` for per-tensor schemes, on
    stacked ranges (and each observer's eps): the same float32 operations element by element, so the same bits."""
    qscheme, dtype, quant_min, quant_max, customized = key
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    if qscheme == torch.per_tensor_symmetric:
        max_pos = torch.max(-min_neg, max_pos)
        scale = torch.max(max_pos / (float(quant_max - quant_min) / 2), eps_t)
        midpoint = (quant_min + quant_max) // 2 if customized else 128
        zero_point = torch.full_like(scale, midpoint if dtype == torch.quint8 else 0, dtype=torch.int64)
    else:
        scale = torch.max((max_pos - min_neg) / float(quant_max - quant_min), eps_t)
        zero_point = quant_min - torch.round(min_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)
    return scale, zero_point


def read_many(observers: dict[str, torch.nn.Module]) -> dict[str, Observation | FxqbnError | None]:
    """``read_observer`` for many observers: MinMax-style ones in one vectorised computation per
    configuration, the others one by one. A failure is returned, not raised; an observer that never
    saw data (``observer_has_data``) maps to None."""
    groups: dict[tuple, list[str]] = {}
    result: dict[str, Observation | FxqbnError | None] = {}
    for name, observer in observers.items():
        key = _min_max_key(observer)
        if key is not None:
            groups.setdefault(key, []).append(name)
        elif not observer_has_data(observer):
            result[name] = None
        else:
            try:
                result[name] = read_observer(observer)
            except FxqbnError as exc:
                result[name] = exc
    for key, names in groups.items():
        result.update(_read_group(key, {name: observers[name] for name in names}))
    return {name: result[name] for name in observers}


def _one_each(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One-element tensors (0-d or 1-d) as one 1-d tensor, in one tensor operation when their ranks agree."""
    ranks = {t.dim() for t in tensors}
    if ranks == {0}:
        return torch.stack(tensors)
    if ranks == {1}:
        return torch.cat(tensors)
    return torch.stack([t.reshape(()) for t in tensors])


def _read_group(key: tuple, observers: dict[str, torch.nn.Module]) -> dict[str, Observation | FxqbnError | None]:
    """One configuration's MinMax-style observers (one range element each), read at once."""
    lows, highs, eps = (_one_each([observer._buffers[b] for observer in observers.values()]) for b in ("min_val", "max_val", "eps"))
    scales, zero_points = _min_max_qparams(key, lows, highs, eps.to(torch.float32))
    result: dict[str, Observation | FxqbnError | None] = {}
    rows = zip(observers.items(), lows.tolist(), highs.tolist(), scales.tolist(), zero_points.tolist())
    for (name, observer), lo, hi, scale, zero_point in rows:
        if lo > hi:  # still (+inf, -inf): no batch seen (observer_has_data's test)
            result[name] = None
            continue
        try:
            qparams = QParams(scale, int(zero_point), key[1])
        except FxqbnError as exc:
            result[name] = exc
            continue
        result[name] = Observation(qparams, type(observer).__name__, lo, hi)
    return result
