"""Turn the user's ``qconfig`` argument into one validated activation spec per BatchNorm module.

Accepted forms (see ``fxqbn.prepare``):

* ``None``: ``DEFAULT_OBSERVER``, a ``HistogramObserver`` over the full quint8 range;
* a ``torch.ao.quantization.QConfig``: its ``activation`` is used (weights are not quantized);
* an observer class or a ``with_args`` partial;
* a ``QConfigMapping``: looked up per module with torch.ao's precedence (module name, its
  parents' names, name regex, module type, global); ``None`` leaves that BN float. A torch.ao
  fused BNReLU module takes its BatchNorm type's entry when that is not None, as torch.ao does.
  ``set_module_name_object_type_order`` entries are not consulted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.ao.quantization import HistogramObserver, QConfig, QConfigMapping

from .errors import FxqbnError
from .qparams import DTYPE_RANGES

__all__ = ["DEFAULT_OBSERVER", "ActivationSpec", "ActivationConfig"]

DEFAULT_OBSERVER = HistogramObserver.with_args(
    dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False, quant_min=0, quant_max=255
)

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)


@dataclass(frozen=True)
class ActivationSpec:
    """A validated activation observer for one BN pattern.

    factory: builds a fresh observer (an observer class or ``with_args`` partial).
    dtype: the quantized dtype the observer targets (``torch.quint8`` or ``torch.qint8``).
    """

    factory: Callable[[], nn.Module]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_RANGES:
            raise FxqbnError(f"activation dtype {self.dtype} is not supported: use torch.quint8 or torch.qint8")


def _describe(factory: Any) -> str:
    inner = getattr(factory, "p", None)  # torch.ao's _PartialWrapper keeps the partial in .p
    func = getattr(inner, "func", factory)
    return getattr(func, "__name__", repr(factory))


def _validate(factory: Any) -> ActivationSpec | str:
    """An ActivationSpec, or the reason the factory cannot observe a quantized BN's activations."""
    name = _describe(factory)
    try:
        observer = factory()
    except Exception as exc:  # the user's factory: report whatever it raised
        return f"the activation observer {name} could not be built: {exc}"
    dtype = getattr(observer, "dtype", None)
    if getattr(observer, "is_dynamic", False):
        return f"the activation observer {name} is dynamic; quantized BatchNorm needs a static observer"
    if dtype not in DTYPE_RANGES:
        return f"the activation observer {name} targets {dtype}; quantized BatchNorm takes 8-bit torch.quint8 or torch.qint8"
    qscheme = getattr(observer, "qscheme", torch.per_tensor_affine)
    if qscheme not in _PER_TENSOR:
        return f"the activation observer {name} is {qscheme}; quantized BatchNorm takes per-tensor input"
    if not callable(getattr(observer, "calculate_qparams", None)):
        return f"{name} is not an observer (it has no calculate_qparams)"
    lo, hi = DTYPE_RANGES[dtype]
    qmin, qmax = getattr(observer, "quant_min", lo), getattr(observer, "quant_max", hi)
    if qmin is not None and qmax is not None and not lo <= qmin < qmax <= hi:
        return f"the activation observer {name} has quant range [{qmin}, {qmax}], outside {dtype}'s [{lo}, {hi}]"
    return ActivationSpec(factory, dtype)


def _factory_of(qconfig: Any) -> Any:
    """The activation factory of one QConfig-like value, or None for 'leave float'."""
    if qconfig is None:
        return None
    if isinstance(qconfig, QConfig):
        return qconfig.activation
    return qconfig


class ActivationConfig:
    """Answers: which activation observer does the BN at this qualified name get (None: stay float)?"""

    def __init__(self, qconfig: Any = None) -> None:
        if isinstance(qconfig, QConfigMapping):
            self._mapping: QConfigMapping | None = qconfig
            self._single = None
        elif qconfig is None or isinstance(qconfig, QConfig) or callable(qconfig):
            self._mapping = None
            self._single = _factory_of(qconfig) if qconfig is not None else DEFAULT_OBSERVER
        else:
            raise FxqbnError(
                f"qconfig must be None, a QConfig, an observer class or with_args partial, or a QConfigMapping; "
                f"got {type(qconfig).__name__}"
            )
        self._specs: dict[int, ActivationSpec | str] = {}

    def _lookup(self, module_name: str, object_type: object, first_component: object = None) -> Any:
        mapping = self._mapping
        if mapping is None:
            return self._single
        types = mapping.object_type_qconfigs
        qconfig = types.get(object_type, mapping.global_qconfig)
        if types.get(first_component) is not None:  # torch.ao's rule for fused modules (_update_qconfig_for_fusion)
            qconfig = types[first_component]
        for pattern, regex_qconfig in mapping.module_name_regex_qconfigs.items():
            if re.match(pattern, module_name):
                qconfig = regex_qconfig
                break
        parts = module_name.split(".")
        for end in range(len(parts), 0, -1):  # the module's own name first, then its parents'
            prefix = ".".join(parts[:end])
            if prefix in mapping.module_name_qconfigs:
                qconfig = mapping.module_name_qconfigs[prefix]
                break
        return _factory_of(qconfig)

    def spec_for(self, module_name: str, object_type: object, first_component: object = None) -> ActivationSpec | None:
        """The validated spec for a BN (its module name, and its module type or ``F.batch_norm``).

        ``first_component``: for torch.ao's fused BNReLU module, the type of its BatchNorm; as in
        torch.ao, a type entry for it (when not None) wins over the fused type's.

        None when the qconfig leaves it float. Raises FxqbnError naming the module when its
        qconfig cannot drive a quantized BN.
        """
        factory = self._lookup(module_name, object_type, first_component)
        if factory is None:
            return None
        key = id(factory)
        if key not in self._specs:
            self._specs[key] = _validate(factory)
        spec = self._specs[key]
        if isinstance(spec, str):
            raise FxqbnError(f"BatchNorm '{module_name}': {spec}. Give it a per-tensor 8-bit observer, or None to keep it float")
        return spec
