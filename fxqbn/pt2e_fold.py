"""Folding conv -> BN in exported (ATen) graphs, only where folding keeps the model's outputs.

torchao's ``prepare_pt2e`` folds every BN into the conv before it without asking who else reads the
conv's output or its weights (``../shared/repro/pt2e_fold.py``). Here a BN folds into its producer
exactly when the producer is a conv / transposed conv (groups 1) / Linear on 2-d input, its output
feeds that BN alone, and its weight and bias are read by it alone; every other BN stays standalone,
with the reason. Deciding (``plan_folds``) is separate from editing (``apply_folds``)::

    y = conv(x); return bn(y) + y          ->  kept: "the conv's output has 2 users (batch_norm, add)"
    return bn1(conv(x)) + bn2(conv(y))     ->  kept: "conv's weight is read by 2 calls"
    return relu(bn(conv(x)))               ->  folded into conv
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fxqbn.passes.reading import BnCall, arg

__all__ = ["Fold", "PRODUCERS", "fold_or_reason", "apply_fold"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Producer:
    """An op a BN may fold into: its name in reasons, the BN dim it feeds, whether it transposes."""

    name: str
    dim: int | None  # the BN kernel dim whose input it makes; None: Linear (BatchNorm1d on 2-d input)
    transposed: bool = False
    groups_arg: int | None = None  # position of ``groups`` (transposed convs fold only with groups 1)


PRODUCERS = {
    aten.conv1d.default: Producer("conv1d", 1),
    aten.conv2d.default: Producer("conv2d", 2),
    aten.conv3d.default: Producer("conv3d", 3),
    aten.conv_transpose1d.default: Producer("conv_transpose1d", 1, True, 6),
    aten.conv_transpose2d.input: Producer("conv_transpose2d", 2, True, 6),
    aten.conv_transpose3d.input: Producer("conv_transpose3d", 3, True, 6),
    aten.linear.default: Producer("linear", None),
}


@dataclass(frozen=True)
class Fold:
    """One BN to fold: the BN's call and the producer node it folds into (names, never nodes)."""

    bn: BnCall
    producer: str  # the conv / linear node
    into: str  # what the report names: the module owning the producer's weight, e.g. "features.conv0"


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def _param_reuse(node: fx.Node, value: object, graph: fx.Graph, what: str) -> str:
    """Why the producer's parameter ``value`` may not be changed for it alone ("" when it may)."""
    if value is None:
        return ""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return f"its {what} is not a constant of the model"
    calls = {u.name for n in graph.nodes if n.op == "get_attr" and n.target == value.target for u in n.users}
    if calls != {node.name}:
        return f"its {what} '{value.target}' is read by {len(calls)} calls ({', '.join(sorted(calls))})"
    return ""


def fold_or_reason(call: BnCall, dim: int, nodes: dict[str, fx.Node], graph: fx.Graph) -> Fold | str:
    """The fold of the BN ``call`` (of kernel dim ``dim``) into the node feeding it, or why it stays standalone."""
    source = nodes[call.input]
    producer = PRODUCERS.get(source.target) if source.op == "call_function" else None
    if producer is None:
        return f"its input comes from {source.name} ({getattr(source.target, '__name__', source.target)}), not a conv or Linear"
    if len(source.users) != 1:
        users = ", ".join(u.name for u in source.users)
        return f"the {producer.name}'s output has {len(source.users)} users ({users}): folding would change the others"
    if producer.dim is None and (dim != 1 or _rank(nodes[str(arg(source, 0, 'input'))]) != 2):
        return "a Linear folds only into a BatchNorm1d on 2-d input"
    if producer.dim is not None and producer.dim != dim:
        return f"a {producer.name} feeds a {dim}d BatchNorm"
    if producer.groups_arg is not None and arg(source, producer.groups_arg, "groups", 1) != 1:
        return f"a {producer.name} with groups > 1 does not fold"
    for what, value in (("weight", arg(source, 1, "weight")), ("bias", arg(source, 2, "bias"))):
        reason = _param_reuse(source, value, graph, what)
        if reason:
            return f"the {producer.name} cannot change for this BN alone: {reason}"
    return Fold(bn=call, producer=source.name, into=str(arg(source, 1, "weight").target).rpartition(".")[0] or source.name)


def _tensor(gm: fx.GraphModule, target: str | None) -> torch.Tensor | None:
    return None if target is None else gm.get_parameter(target) if _is_param(gm, target) else gm.get_buffer(target)


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    owner, _, name = target.rpartition(".")
    return name in dict(gm.get_submodule(owner).named_parameters(recurse=False))


def _set(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value.detach(), requires_grad=False)
    else:
        module.register_buffer(name, value.detach())


def _bias_node(gm: fx.GraphModule, source: fx.Node, weight_target: str, channels: int) -> fx.Node:
    """The producer's bias get_attr, made (zeros, next to its weight) where the producer has none."""
    bias = arg(source, 2, "bias")
    if isinstance(bias, fx.Node):
        return bias
    owner, _, name = weight_target.rpartition(".")
    module = gm.get_submodule(owner)
    attribute = next(f"{name}_folded_bias{i or ''}" for i in range(len(module._parameters) + 2) if not hasattr(module, f"{name}_folded_bias{i or ''}"))
    module.register_parameter(attribute, torch.nn.Parameter(torch.zeros(channels), requires_grad=False))
    with gm.graph.inserting_before(source):
        node = gm.graph.get_attr(f"{owner}.{attribute}" if owner else attribute)
    args = list(source.args) + [None] * max(0, 3 - len(source.args))
    args[2] = node
    source.args = tuple(args)
    return node


def apply_fold(gm: fx.GraphModule, fold: Fold) -> None:
    """Fold one planned BN into its producer, in place: new weight and bias, the BN's uses read the producer."""
    nodes = {n.name: n for n in gm.graph.nodes}
    source, call = nodes[fold.producer], fold.bn
    producer = PRODUCERS[source.target]
    weight_target = str(arg(source, 1, "weight").target)
    weight = gm.get_parameter(weight_target) if _is_param(gm, weight_target) else gm.get_buffer(weight_target)
    channels = weight.shape[1] if producer.transposed else weight.shape[0]
    bias_node = _bias_node(gm, source, weight_target, channels)
    stats = [_tensor(gm, t) for t in (call.running_mean, call.running_var, call.weight, call.bias)]
    mean, var, bn_w, bn_b = stats
    bn_w = torch.ones_like(mean) if bn_w is None else bn_w
    bn_b = torch.zeros_like(mean) if bn_b is None else bn_b
    bias = _tensor(gm, str(bias_node.target))
    with torch.no_grad():
        if producer.dim is None:
            new_w, new_b = fuse_linear_bn_weights(weight, bias, mean, var, call.eps, bn_w, bn_b)
        else:
            new_w, new_b = fuse_conv_bn_weights(weight, bias, mean, var, call.eps, bn_w, bn_b, transpose=producer.transposed)
    _set(gm, weight_target, new_w)
    _set(gm, str(bias_node.target), new_b)
    nodes[call.output].replace_all_uses_with(source)
    bn = nodes[call.node]
    for item in [u for u in bn.users if not u.users]:  # the ATen forms' getitems of the normalised output and saved statistics
        gm.graph.erase_node(item)
    if not bn.users:
        gm.graph.erase_node(bn)
