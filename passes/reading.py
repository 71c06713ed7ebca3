"""Readers: one call of a BatchNorm or clamp spelling, normalised into a record (or why it cannot be).

``passes.registry`` names, for each spelling, the reader here that understands its arguments. Readers
only read the graph (and, for modules, the module the node calls).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

from torch import fx, nn

__all__ = [
    "BnCall", "ActivationCall", "arg", "bn_inside", "module_bn", "already_int8", "f_batch_norm", "aten_batch_norm", "aten_legit",
    "hardtanh_module", "hardtanh_args", "clamp_args",
]


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
    module: str | None = None  # the BatchNorm module itself (inside torch.ao's BNReLU too); None: functional


@dataclass(frozen=True)
class ActivationCall:
    """One activation call: the tensor it reads and the float clamp it computes."""

    node: str
    input: str
    lo: float  # -inf when unbounded below
    hi: float  # +inf when unbounded above


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
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


def bn_inside(module: nn.Module | None) -> tuple[nn.Module | None, str]:
    """(the BatchNorm a module spelling computes with, its name relative to the module): torch.ao's
    fused BNReLU holds it as ``[0]`` (a Sequential); every other BN module is its own."""
    return (module[0], ".0") if isinstance(module, nn.Sequential) else (module, "")


def module_bn(node: fx.Node, module: nn.Module) -> BnCall | str:
    """A BatchNorm module's call (torch.ao's fused BNReLU: its BatchNorm, ``module[0]``)."""
    name = str(node.target)
    bn, inside = bn_inside(module)
    where = name + inside
    kind = type(bn).__name__
    if bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: normalises with batch statistics"
    if bn.training:
        return f"{kind} is in training mode (batch statistics): call model.eval() before converting"
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "unsupported call: expected one positional tensor argument"
    return BnCall(
        node=node.name, output=node.name, input=node.args[0].name,
        running_mean=f"{where}.running_mean", running_var=f"{where}.running_var",
        weight=f"{where}.weight" if bn.affine else None, bias=f"{where}.bias" if bn.affine else None,
        eps=float(bn.eps), owner=name, spelling=kind, module=where,
    )


def already_int8(node: fx.Node, module: nn.Module) -> str:
    return f"already int8 (torch.ao {module._get_name()}): nothing to lower"


def _functional(node: fx.Node, spelling: str, x: object, tensors: tuple, training: object, eps: object) -> BnCall | str:
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
        bias=bias, eps=float(eps), owner=owner, spelling=spelling,
    )


def f_batch_norm(node: fx.Node, module: None) -> BnCall | str:
    # F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    tensors = (arg(node, 3, "weight"), arg(node, 4, "bias"), arg(node, 1, "running_mean"), arg(node, 2, "running_var"))
    return _functional(node, "F.batch_norm", arg(node, 0, "input"), tensors, arg(node, 5, "training", False), arg(node, 7, "eps", 1e-5))


def _aten_tensors(node: fx.Node) -> tuple:
    return tuple(arg(node, i, key) for i, key in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))


def aten_batch_norm(node: fx.Node, module: None) -> BnCall | str:
    # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
    return _functional(node, "aten.batch_norm", arg(node, 0, "input"), _aten_tensors(node), arg(node, 5, "training"), arg(node, 7, "eps"))


def aten_legit(node: fx.Node, module: None) -> BnCall | str:
    # aten._native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
    # -> (out, save_mean, save_rstd); the graph reads out through getitem 0
    spelling = "aten._native_batch_norm_legit_no_training"
    call = _functional(node, spelling, arg(node, 0, "input"), _aten_tensors(node), False, arg(node, 6, "eps"))
    if isinstance(call, str):
        return call
    items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
    if len(items) != len(node.users) or len(items) != 1 or items[0].args[1] != 0:
        return f"{spelling} whose saved statistics (outputs 1 and 2) are read"
    return replace(call, output=items[0].name)


# -- constant clamps ------------------------------------------------------------------------------


def _bounds(lo: object, hi: object) -> tuple[float, float] | None:
    """(lo, hi) as floats (None: unbounded); None when not constants or empty."""
    lo_f = -float("inf") if lo is None else _number(lo)
    hi_f = float("inf") if hi is None else _number(hi)
    if lo_f is None or hi_f is None or not lo_f <= hi_f:
        return None
    return lo_f, hi_f


def hardtanh_args(node: fx.Node, module: None) -> tuple[float, float] | None:
    return _bounds(arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0))


def hardtanh_module(node: fx.Node, module: nn.Module) -> tuple[float, float] | None:
    return _bounds(module.min_val, module.max_val)


def clamp_args(node: fx.Node, module: None) -> tuple[float, float] | None:
    if arg(node, 1, "min") is None and arg(node, 2, "max") is None:
        return None
    return _bounds(arg(node, 1, "min"), arg(node, 2, "max"))
