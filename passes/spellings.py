"""How traced graphs spell a BatchNorm, an activation and a pass-through op, declared once, as data.

Each table maps a spelling (``node.op`` and target) to a reader that normalises the call into one
record, or says why it cannot (the reason reaches the report). Readers only read the graph.

* ``BN_SPELLINGS``: BatchNorm modules (any ``_BatchNorm``, torch.ao's fused float ``BNReLU``),
  ``F.batch_norm``, ``aten.batch_norm`` and ``aten._native_batch_norm_legit_no_training`` (read through
  its ``getitem 0``) -> ``BnCall`` (input, statistics as attribute targets, eps, built-in activation).
  Already quantized BNs are listed too, so every BN of a graph can be reported.
* ``ACTIVATION_SPELLINGS``: ReLU, ReLU6, Hardtanh and clamp in module, functional, method and ATen
  spellings -> ``ActivationCall`` with the clamp ``(lo, hi)`` it means in float.
* ``PASSTHROUGH_SPELLINGS``: what may sit between a BN and its activation (Identity, eval Dropout).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "BnCall", "ActivationCall", "BN_SPELLINGS", "ACTIVATION_SPELLINGS", "PASSTHROUGH_SPELLINGS", "NAMED_CLAMPS",
    "read_bn", "read_activation", "passthrough_input", "activation_name",
]

aten = torch.ops.aten
Modules = dict[str, nn.Module]


@dataclass(frozen=True)
class BnCall:
    """One float BatchNorm call, whatever its spelling. Tensors are attribute targets of the root."""

    node: str  # the BN node
    output: str  # the node holding the normalised tensor (the BN node, or its getitem 0)
    input: str  # the node the BN normalises
    running_mean: str
    running_var: str
    weight: str | None  # None: not affine (ones)
    bias: str | None  # None: no bias (zeros)
    eps: float
    owner: str  # the BN module's qualified name (functional: the statistics' owner), for the report
    spelling: str  # e.g. "BatchNorm2d", "F.batch_norm", "aten.batch_norm"
    dim: int | None  # the kernel dim its type says (BatchNorm2d: 2); None: the input's rank decides
    activation: str = ""  # an activation inside the spelling (torch.ao's BNReLU2d: "ReLU")


@dataclass(frozen=True)
class ActivationCall:
    """One activation call: the tensor it reads and the float clamp it computes."""

    node: str
    input: str
    lo: float  # -inf when unbounded below
    hi: float  # +inf when unbounded above


# (lo, hi) -> the name the report gives a clamp; any other clamp is named "clamp(lo, hi)".
NAMED_CLAMPS = {(0.0, math.inf): "ReLU", (0.0, 6.0): "ReLU6"}


def activation_name(lo: float, hi: float) -> str:
    return NAMED_CLAMPS.get((lo, hi), f"clamp({lo:g}, {hi:g})")


# -- argument helpers ------------------------------------------------------------------------------


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    """Positional argument ``index`` or keyword ``name`` of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attr(value: object) -> str | None:
    """The attribute target of a get_attr node; None for anything else."""
    return str(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# -- BatchNorm spellings ---------------------------------------------------------------------------

_MODULE_DIMS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))
_QUANTIZED_BN_TYPES = (nnq.BatchNorm2d, nnq.BatchNorm3d, nniq.BNReLU2d, nniq.BNReLU3d)  # torch.ao's int8 BNs


def _module_bn(node: fx.Node, bn: nn.Module, name: str, activation: str = "") -> BnCall | str:
    kind = type(bn).__name__
    if bn.running_mean is None or bn.running_var is None:
        return f"{kind} with track_running_stats=False normalises with batch statistics"
    if bn.training:
        return f"{kind} is in training mode (batch statistics): call model.eval() before converting"
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "unsupported call: expected one positional tensor argument"
    dim = next((d for t, d in _MODULE_DIMS if isinstance(bn, t)), None)
    prefix = f"{name}." if name else ""
    return BnCall(
        node=node.name, output=node.name, input=node.args[0].name,
        running_mean=prefix + "running_mean", running_var=prefix + "running_var",
        weight=prefix + "weight" if bn.affine else None, bias=prefix + "bias" if bn.affine else None,
        eps=float(bn.eps), owner=str(node.target), spelling=type(bn).__name__, dim=dim, activation=activation,
    )


def _read_bn_module(node: fx.Node, modules: Modules) -> BnCall | str | None:
    module = modules.get(str(node.target))
    if isinstance(module, _QUANTIZED_BN_TYPES):
        return f"already int8 (torch.ao {module._get_name()}): nothing to lower"
    if type(module) in (nni.BNReLU2d, nni.BNReLU3d):
        return _module_bn(node, module[0], f"{node.target}.0", activation="ReLU")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _module_bn(node, module, str(node.target))
    return None


def _functional_bn(node: fx.Node, spelling: str, x: object, tensors: tuple, training: object, eps: object) -> BnCall | str:
    """The record of a functional BN given its arguments (tensors: weight, bias, mean, var)."""
    weight, bias, mean, var = (_attr(t) for t in tensors)
    owner = (_attr(tensors[2]) or "").rpartition(".")[0]
    if training is not False:
        return f"{spelling} with training=True (or not a constant) normalises with batch statistics"
    if not isinstance(x, fx.Node):
        return f"unsupported {spelling} call: its input is not a tensor of the graph"
    if mean is None or var is None or any(t is not None and _attr(t) is None for t in tensors[:2]):
        return f"{spelling} whose statistics or affine tensors are not module attributes (get_attr)"
    if _number(eps) is None:
        return f"{spelling} whose eps is not a constant"
    return BnCall(
        node=node.name, output=node.name, input=x.name, running_mean=mean, running_var=var, weight=weight,
        bias=bias, eps=float(eps), owner=owner, spelling=spelling, dim=None,
    )


def _read_f_batch_norm(node: fx.Node, modules: Modules) -> BnCall | str:
    # F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    tensors = (_arg(node, 3, "weight"), _arg(node, 4, "bias"), _arg(node, 1, "running_mean"), _arg(node, 2, "running_var"))
    return _functional_bn(node, "F.batch_norm", _arg(node, 0, "input"), tensors, _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5))


def _read_aten_batch_norm(node: fx.Node, modules: Modules) -> BnCall | str:
    # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
    tensors = tuple(_arg(node, i, key) for i, key in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    return _functional_bn(node, "aten.batch_norm", _arg(node, 0, "input"), tensors, _arg(node, 5, "training"), _arg(node, 7, "eps"))


def _read_aten_legit(node: fx.Node, modules: Modules) -> BnCall | str:
    # aten._native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
    # -> (out, save_mean, save_rstd); the graph reads out through getitem 0
    spelling = "aten._native_batch_norm_legit_no_training"
    tensors = tuple(_arg(node, i, key) for i, key in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    call = _functional_bn(node, spelling, _arg(node, 0, "input"), tensors, False, _arg(node, 6, "eps"))
    if isinstance(call, str):
        return call
    items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
    if len(items) != len(node.users) or len(items) != 1 or items[0].args[1] != 0:
        return f"{spelling} whose saved statistics (outputs 1 and 2) are read"
    return replace(call, output=items[0].name)


# Functional spelling -> the position of its momentum argument (the keyword is "momentum" in each).
MOMENTUM_ARG = {"F.batch_norm": 6, "aten.batch_norm": 6, "aten._native_batch_norm_legit_no_training": 5}


# (node.op, target, reader): reader(node, modules) -> BnCall, a reason it cannot be lowered, or None (no BN).
BN_SPELLINGS: tuple[tuple[str, object, Callable[[fx.Node, Modules], BnCall | str | None]], ...] = (
    ("call_module", None, _read_bn_module),  # self.bn(x): any _BatchNorm, torch.ao's float BNReLU, quantized BNs
    ("call_function", F.batch_norm, _read_f_batch_norm),  # F.batch_norm(x, mean, var, w, b, False, m, eps) (timm)
    ("call_function", aten.batch_norm.default, _read_aten_batch_norm),  # torch.export's eval BN
    ("call_function", aten._native_batch_norm_legit_no_training.default, _read_aten_legit),  # after decompositions
)


def read_bn(node: fx.Node, modules: Modules) -> BnCall | str | None:
    """``node`` as a BN record, the reason it is a BN that cannot be lowered, or None if no BN."""
    for op, target, reader in BN_SPELLINGS:
        if node.op == op and (target is None or node.target is target):
            return reader(node, modules)
    return None


# -- activation spellings --------------------------------------------------------------------------


def _fixed(lo: float, hi: float) -> Callable[[fx.Node, Modules], tuple[float, float] | None]:
    return lambda node, modules: (lo, hi)


def _bounds(lo: object, hi: object) -> tuple[float, float] | None:
    """(lo, hi) as floats (None: unbounded); None when not constants or empty."""
    lo_f = -math.inf if lo is None else _number(lo)
    hi_f = math.inf if hi is None else _number(hi)
    if lo_f is None or hi_f is None or not lo_f <= hi_f:
        return None
    return lo_f, hi_f


def _hardtanh_args(node: fx.Node, modules: Modules) -> tuple[float, float] | None:
    return _bounds(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))


def _hardtanh_module(node: fx.Node, modules: Modules) -> tuple[float, float] | None:
    module = modules[str(node.target)]
    return _bounds(module.min_val, module.max_val)


def _clamp_args(node: fx.Node, modules: Modules) -> tuple[float, float] | None:
    if _arg(node, 1, "min") is None and _arg(node, 2, "max") is None:
        return None
    return _bounds(_arg(node, 1, "min"), _arg(node, 2, "max"))


_RELU, _RELU6 = _fixed(0.0, math.inf), _fixed(0.0, 6.0)

# (node.op, target, bounds): bounds(node, modules) -> the float clamp (lo, hi), or None when the call
# is not a constant clamp. call_module targets match by module type (exactly).
ACTIVATION_SPELLINGS: tuple[tuple[str, object, Callable[[fx.Node, Modules], tuple[float, float] | None]], ...] = (
    ("call_module", nn.ReLU, _RELU),  # self.relu = nn.ReLU(inplace=...)
    ("call_function", F.relu, _RELU),  # F.relu(x), F.relu(x, inplace=True)
    ("call_function", torch.relu, _RELU),
    ("call_function", torch.relu_, _RELU),
    ("call_method", "relu", _RELU),  # x.relu()
    ("call_method", "relu_", _RELU),
    ("call_function", aten.relu.default, _RELU),  # torch.export
    ("call_function", aten.relu_.default, _RELU),
    ("call_module", nn.ReLU6, _RELU6),
    ("call_module", nnq.ReLU6, _RELU6),  # what torch.ao's convert_fx makes of nn.ReLU6 (on quint8)
    ("call_function", F.relu6, _RELU6),
    ("call_function", aten.relu6.default, _RELU6),
    ("call_module", nn.Hardtanh, _hardtanh_module),  # nn.Hardtanh(0, 6)
    ("call_function", F.hardtanh, _hardtanh_args),  # F.hardtanh(x, 0.0, 6.0): what export makes of relu6
    ("call_function", F.hardtanh_, _hardtanh_args),
    ("call_function", aten.hardtanh.default, _hardtanh_args),
    ("call_function", aten.hardtanh_.default, _hardtanh_args),
    ("call_function", torch.clamp, _clamp_args),  # torch.clamp(x, 0, 6)
    ("call_method", "clamp", _clamp_args),  # x.clamp(0, 6)
    ("call_method", "clamp_", _clamp_args),
    ("call_function", aten.clamp.default, _clamp_args),
    ("call_function", aten.clamp_.default, _clamp_args),
)

_INPLACE_OK = {"inplace", "input", "min_val", "max_val", "min", "max"}


def read_activation(node: fx.Node, modules: Modules) -> ActivationCall | None:
    """``node`` as an activation on one tensor, or None when it is none (or not a constant clamp)."""
    target: object = type(modules.get(str(node.target))) if node.op == "call_module" else node.target
    x = _arg(node, 0, "input") if node.op != "call_method" else (node.args[0] if node.args else None)
    if not isinstance(x, fx.Node) or set(node.kwargs) - _INPLACE_OK:
        return None
    for op, spelled, bounds in ACTIVATION_SPELLINGS:
        if node.op == op and (target is spelled or target == spelled):
            found = bounds(node, modules)
            return None if found is None else ActivationCall(node.name, x.name, *found)
    return None


# -- pass-through spellings ------------------------------------------------------------------------

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# (node.op, target, test): test(node, modules) -> True when the call returns its input unchanged.
PASSTHROUGH_SPELLINGS: tuple[tuple[str, object, Callable[[fx.Node, Modules], bool]], ...] = (
    ("call_module", nn.Identity, lambda node, modules: True),  # timm's BatchNormAct2d drop = nn.Identity()
    *(("call_module", kind, lambda node, modules: not modules[str(node.target)].training) for kind in _DROPOUTS),  # eval Dropout
    ("call_function", F.dropout, lambda node, modules: _arg(node, 2, "training", True) is False),
    ("call_function", aten.dropout.default, lambda node, modules: _arg(node, 2, "train") is False),
)


def passthrough_input(node: fx.Node, modules: Modules) -> fx.Node | None:
    """The tensor ``node`` returns unchanged (Identity, eval Dropout, ...); None when it is no pass-through."""
    target: object = type(modules.get(str(node.target))) if node.op == "call_module" else node.target
    x = _arg(node, 0, "input")
    if not isinstance(x, fx.Node):
        return None
    for op, spelled, test in PASSTHROUGH_SPELLINGS:
        if node.op == op and target is spelled and test(node, modules):
            return x
    return None
