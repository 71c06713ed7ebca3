"""Quantization parameters: a frozen record, and the pure function that reads one off an observer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def read_many(observers: dict[str, torch.nn.Module]) -> dict[str, Observation | FxqbnError | None]:
    """``read_observer`` of each observer: an observer that never saw data (``observer_has_data``) maps to
    None, and a failure is returned, not raised, so that the caller can name every idle observer at once."""
    result: dict[str, Observation | FxqbnError | None] = {}
    for name, observer in observers.items():
        if not observer_has_data(observer):
            result[name] = None
            continue
        try:
            result[name] = read_observer(observer)
        except FxqbnError as exc:
            result[name] = exc
    return result
