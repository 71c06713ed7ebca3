"""Folding: a BatchNorm right after the conv / linear that feeds it alone becomes part of that conv.

The rule, declared once as data (``FOLDS``): a BN folds into the producer of its input when

* the producer is a spelling of the table (module types matched exactly, as torch.ao's fuser does:
  a subclass may compute something else; or the ATen op torch.export leaves), and the BN is a
  spelling that entry takes (``Linear`` feeds ``BatchNorm1d`` only, a ``Conv2d`` ``BatchNorm2d``...);
* the producer's output feeds that BN alone, and has the rank the entry needs where the BN does not
  fix it (``Linear -> BatchNorm1d`` folds on 2-d values only: on 3-d ones BN1d's channels are not
  the linear's features);
* the producer's weight and bias are used by that call alone (a module called twice, or a weight
  tied to another module, would change every call: torch.ao folds those wrongly);
* the BN normalises with running statistics (eval mode, ``track_running_stats=True``).

``decide`` reads a graph and returns a ``Fold`` record (what to fold into what) or the reason why
not; ``fold_modules`` / ``fold_attributes`` apply the records (the rewrite), on graphs whose
producers are modules (fxqbn.prepare's traces) or ATen calls on attributes (torch.export graphs).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

from . import registry
from .graph_facts import describe, rank
from .reading import BnCall, arg
from .records import Folded, Match
from .registry import RANKS

__all__ = ["FoldRule", "FOLDS", "Fold", "GraphIndex", "index_of", "fold_rule", "decide", "fold_modules", "fold_attributes", "needs_ranks", "fold_patterns"]

aten = torch.ops.aten
_ATEN_BNS = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training")


@dataclass(frozen=True)
class FoldRule:
    """A producer a BN may fold into: its spelling, the BN spellings it takes, the output rank it needs."""

    name: str  # as the report says it: "Conv2d", "aten.conv2d"
    op: str  # "call_module" (``target``: the module type, matched exactly) or "call_function" (an ATen overload)
    target: object
    bns: tuple[str, ...]  # BnSpelling names that fold into it
    rank: int  # the rank of the producer's output the fold is right for
    linear: bool = False  # weight (out, in): the BN scales its rows (fuse_linear_bn_*)
    transpose: bool = False  # weight (in, out / groups, ...): the BN scales dim 1 (fuse_conv_bn_* transpose)
    groups_arg: int | None = None  # ATen transposed convs: position of ``groups`` (folds only with groups=1)


def _modules(types: tuple[type, ...], transpose: bool = False) -> tuple[FoldRule, ...]:
    return tuple(
        FoldRule(t.__name__, "call_module", t, (f"BatchNorm{dim}d",), dim + 2, transpose=transpose)
        for dim, t in enumerate(types, start=1)
    )


def _aten(ops: tuple, transpose: bool = False) -> tuple[FoldRule, ...]:
    """One entry per overload (``aten.conv2d.default`` and ``.padding`` alike: weight at 1, bias at 2)."""
    return tuple(
        FoldRule(f"aten.{op.overloadpacket.__name__}", "call_function", op, _ATEN_BNS, dim + 2, transpose=transpose,
                 groups_arg=6 if transpose else None)
        for dim, overloads in enumerate(ops, start=1) for op in overloads
    )


FOLDS: tuple[FoldRule, ...] = (
    *_modules((nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    *_modules((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), transpose=True),
    FoldRule("Linear", "call_module", nn.Linear, ("BatchNorm1d",), 2, linear=True),
    *_aten(((aten.conv1d.default, aten.conv1d.padding), (aten.conv2d.default, aten.conv2d.padding),
            (aten.conv3d.default, aten.conv3d.padding))),
    # aten.conv_transpose2d.input(input, weight, bias, stride, padding, output_padding, groups, dilation)
    *_aten(((aten.conv_transpose1d.default,), (aten.conv_transpose2d.input,), (aten.conv_transpose3d.input,)), transpose=True),
    FoldRule("aten.linear", "call_function", aten.linear.default, _ATEN_BNS, 2, linear=True),
)


@dataclass(frozen=True)
class Fold:
    """The decision to fold one BN into the producer of its input (nodes and attributes by name)."""

    bn: BnCall  # the BN: node, output, statistics
    producer: str  # the producer's node
    rule: FoldRule
    module: str | None  # call_module producers: the module's target (replaced by a folded copy)
    weight: str | None = None  # ATen producers: the weight's attribute target
    bias: str | None = None  # ATen producers: the bias's attribute target; None: the conv has none

    @property
    def into(self) -> str:
        """The producer as the report names it: its module, or (ATen) the module owning its weight, or its node."""
        if self.module is not None:
            return self.module
        return self.weight.rpartition(".")[0] if self.weight and "." in self.weight else self.producer


def fold_rule(node: fx.Node, modules: dict[str, nn.Module]) -> FoldRule | None:
    """The FOLDS entry of ``node``'s call, or None when it is no producer of the table."""
    called = type(modules.get(str(node.target))) if node.op == "call_module" else node.target
    return next((r for r in FOLDS if r.op == node.op and r.target is called), None)


def _bn_call(node: fx.Node, modules: dict[str, nn.Module]) -> BnCall | str:
    call = registry.read_bn(node, modules)
    return "not a BatchNorm" if call is None else call


def _who(rule: FoldRule, producer: fx.Node) -> str:
    return f"{rule.name} '{producer.target if producer.op == 'call_module' else producer.name}'"


@dataclass(frozen=True)
class GraphIndex:
    """What ``decide`` looks up about a graph and its root, counted once (deciding every BN of a graph
    stays linear in its size); valid until a fold is applied."""

    modules: dict[str, nn.Module]
    nodes: dict[str, fx.Node]
    calls: Counter  # id(module) -> call_module nodes calling it
    readers: Counter  # id(tensor) -> get_attr nodes reading it
    holders: Counter  # id(tensor) -> modules holding it as a parameter or buffer


def index_of(graph: fx.Graph, root: nn.Module) -> GraphIndex:
    modules = dict(root.named_modules(remove_duplicate=False))
    held = (t for m in root.modules() for t in {id(v): v for v in (*m._parameters.values(), *m._buffers.values())})
    return GraphIndex(
        modules=modules,
        nodes={node.name: node for node in graph.nodes},
        calls=Counter(id(modules.get(str(n.target))) for n in graph.nodes if n.op == "call_module"),
        readers=Counter(id(_attribute(root, str(n.target))) for n in graph.nodes if n.op == "get_attr"),
        holders=Counter(held),
    )


def decide(graph: fx.Graph, root: nn.Module, bn: BnCall | Match | fx.Node | str, index: GraphIndex | None = None) -> Fold | str:
    """Whether the BN (a match, its record, its node or node name) folds into the producer of its
    input: the ``Fold`` to apply, or why it stays a BN. ``index``: ``index_of(graph, root)``, when
    deciding many BNs of one graph."""
    index = index or index_of(graph, root)
    modules, nodes = index.modules, index.nodes
    call = bn.bn if isinstance(bn, Match) else bn
    if not isinstance(call, BnCall):
        call = _bn_call(nodes[call] if isinstance(call, str) else call, modules)
        if isinstance(call, str):
            return call
    problem = _bn_problem(call, modules)
    if problem:
        return problem
    producer = nodes[call.input]
    rule = fold_rule(producer, modules)
    if rule is None:
        return f"its input {describe(producer)} is not a conv / linear that BNs fold into (passes.fold.FOLDS)"
    if call.spelling not in rule.bns:
        return f"{_who(rule, producer)} feeds {call.spelling}: only {' or '.join(rule.bns)} folds into a {rule.name}"
    users = len(producer.users)
    if users != 1:
        return f"{_who(rule, producer)}'s output has {users} users (the BN must be its only one)"
    return _rank_problem(rule, producer, call) or _producer_fold(index, root, rule, producer, call)


def _bn_problem(call: BnCall, modules: dict[str, nn.Module]) -> str:
    """Why the BN cannot fold, whatever feeds it: it normalises with batch statistics."""
    module = modules.get(call.module) if call.module is not None else None
    if module is not None and (module.training or module.running_mean is None):
        return "the BN is training / track_running_stats=False: it normalises with batch statistics"
    return ""


def _rank_problem(rule: FoldRule, producer: fx.Node, call: BnCall) -> str:
    """The producer's output rank must be the rule's; a BN spelling that takes one rank only fixes it."""
    spelling = next((s for s in registry.BN_SPELLINGS if s.name == call.spelling), None)
    found = rank(producer)
    if found is None and spelling is not None and spelling.dim is not None and RANKS[spelling.dim] == (rule.rank,):
        return ""
    if found is None:
        return f"the rank of {_who(rule, producer)}'s output is not recorded: a {rule.name} folds on {rule.rank}-d values only"
    if found != rule.rank:
        return f"{_who(rule, producer)}'s output has rank {found}: a {rule.name} folds into {call.spelling} on {rule.rank}-d values only"
    return ""


def _producer_fold(index: GraphIndex, root: nn.Module, rule: FoldRule, producer: fx.Node, call: BnCall) -> Fold | str:
    if rule.op == "call_module":
        return _module_fold(index, rule, producer, call)
    return _aten_fold(index, root, rule, producer, call)


def _attribute(root: nn.Module, target: str) -> object:
    try:
        return operator.attrgetter(target)(root)
    except AttributeError:
        return None


def _module_fold(index: GraphIndex, rule: FoldRule, producer: fx.Node, call: BnCall) -> Fold | str:
    module = index.modules[str(producer.target)]
    who = _who(rule, producer)
    calls = index.calls[id(module)]
    if calls != 1:
        return f"{who} is called {calls} times (folding would change every call)"
    if module.training:
        return f"{who} is in training mode: folds are made in eval mode (call .eval() on the model)"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{who} has forward hooks, which would see the folded weights"
    if rule.transpose and module.groups != 1:
        return f"{who} has groups={module.groups}: fxqbn folds transposed convs with groups=1 only"
    for name in ("weight", "bias"):
        tensor = getattr(module, name)
        if tensor is not None and (index.holders[id(tensor)] > 1 or index.readers[id(tensor)] > 0):
            return f"{who}'s {name} is shared with another module or read elsewhere in the graph"
    return Fold(bn=call, producer=producer.name, rule=rule, module=str(producer.target))


def _aten_fold(index: GraphIndex, root: nn.Module, rule: FoldRule, producer: fx.Node, call: BnCall) -> Fold | str:
    who = _who(rule, producer)
    if rule.groups_arg is not None and arg(producer, rule.groups_arg, "groups", 1) != 1:
        return f"{who} has groups={arg(producer, rule.groups_arg, 'groups', 1)}: fxqbn folds transposed convs with groups=1 only"
    targets = []
    for position, name in ((1, "weight"), (2, "bias")):
        value = arg(producer, position, name)
        if value is None and name == "bias":
            targets.append(None)
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return f"{who}'s {name} is not a module attribute (get_attr)"
        tensor = _attribute(root, str(value.target))
        if len(value.users) != 1 or index.readers[id(tensor)] != 1 or index.holders[id(tensor)] > 1:
            return f"{who}'s {name} '{value.target}' is used by other calls too (folding would change them)"
        targets.append(str(value.target))
    return Fold(bn=call, producer=producer.name, rule=rule, module=None, weight=targets[0], bias=targets[1])


def needs_ranks(graph: fx.Graph, root: nn.Module) -> tuple[str, ...]:
    """The BNs whose fold depends on a producer output rank the graph does not record (run
    ``fxqbn.tracing.propagate_shapes`` first to decide it); empty when none."""
    modules = dict(root.named_modules(remove_duplicate=False))
    calls = [c for c in (registry.read_bn(node, modules) for node in graph.nodes) if isinstance(c, BnCall)]
    return tuple(c.owner for c in calls if "is not recorded" in (_rank_problem_of(graph, modules, c) or ""))


def _rank_problem_of(graph: fx.Graph, modules: dict[str, nn.Module], call: BnCall) -> str:
    producer = next(n for n in graph.nodes if n.name == call.input)
    rule = fold_rule(producer, modules)
    return "" if rule is None or call.spelling not in rule.bns else _rank_problem(rule, producer, call)


# -- the rewrite ----------------------------------------------------------------------------------


def _bn_tensors(root: nn.Module, call: BnCall) -> tuple:
    """(mean, var, weight, bias) of the BN; ones / zeros where it is not affine."""
    mean, var = operator.attrgetter(call.running_mean)(root), operator.attrgetter(call.running_var)(root)
    weight = torch.ones_like(mean) if call.weight is None else operator.attrgetter(call.weight)(root)
    bias = torch.zeros_like(mean) if call.bias is None else operator.attrgetter(call.bias)(root)
    return mean, var, weight, bias


def _drop_bn(graph: fx.Graph, fold: Fold) -> None:
    """The BN's readers read the producer; the BN's nodes (its getitem 0 too) leave the graph."""
    nodes = {node.name: node for node in graph.nodes}
    producer, output, bn = nodes[fold.producer], nodes[fold.bn.output], nodes[fold.bn.node]
    output.replace_all_uses_with(producer)
    for node in dict.fromkeys((output, bn)):
        graph.erase_node(node)


def fold_modules(graph: fx.Graph, root: nn.Module, folds: list[Fold]) -> None:
    """Apply module folds in place: each producer module of ``root`` becomes a folded copy (the
    original is not changed), each BN leaves ``graph``. ``root`` must be a model nobody else holds."""
    for fold in folds:
        conv = root.get_submodule(fold.module)
        bn = root.get_submodule(fold.bn.module)
        folded = fuse_linear_bn_eval(conv, bn) if fold.rule.linear else fuse_conv_bn_eval(conv, bn, fold.rule.transpose)
        parent, _, leaf = fold.module.rpartition(".")
        setattr(root.get_submodule(parent), leaf, folded)
        _drop_bn(graph, fold)


def fold_attributes(graph: fx.Graph, root: nn.Module, folds: list[Fold]) -> None:
    """Apply ATen folds in place: each producer's weight (and bias, added where it had none) becomes
    the folded tensor, set on ``root`` at its attribute target; each BN leaves ``graph``."""
    nodes = {node.name: node for node in graph.nodes}
    for fold in folds:
        weight = operator.attrgetter(fold.weight)(root)
        bias = None if fold.bias is None else operator.attrgetter(fold.bias)(root)
        mean, var, bn_w, bn_b = _bn_tensors(root, fold.bn)
        if fold.rule.linear:
            new_w, new_b = fuse_linear_bn_weights(weight, bias, mean, var, fold.bn.eps, bn_w, bn_b)
        else:
            new_w, new_b = fuse_conv_bn_weights(weight, bias, mean, var, fold.bn.eps, bn_w, bn_b, fold.rule.transpose)
        _set(root, fold.weight, new_w)
        producer = nodes[fold.producer]
        if fold.bias is not None:
            _set(root, fold.bias, new_b)
        else:
            target = _free(root, fold.weight.rpartition(".")[0], "folded_bias")
            _set(root, target, new_b)
            with graph.inserting_before(producer):
                _set_bias(producer, graph.get_attr(target))
        _drop_bn(graph, fold)


def _set_bias(producer: fx.Node, bias: fx.Node) -> None:
    """The bias argument (position 2, or the keyword) of an ATen conv / linear that had none."""
    if "bias" in producer.kwargs or len(producer.args) < 2:
        producer.update_kwarg("bias", bias)
    elif len(producer.args) == 2:
        producer.args = (*producer.args, bias)
    else:
        producer.update_arg(2, bias)


def _set(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """``value`` at ``target``: a buffer stays a buffer, anything else is a parameter."""
    parent, _, leaf = target.rpartition(".")
    owner = root.get_submodule(parent)
    if leaf in owner._buffers:
        owner._buffers[leaf] = value.detach()
    else:
        owner.register_parameter(leaf, nn.Parameter(value.detach(), value.requires_grad))


def _free(root: nn.Module, parent: str, stem: str) -> str:
    owner, i = root.get_submodule(parent), 0
    while hasattr(owner, f"{stem}{i or ''}"):
        i += 1
    return f"{parent}.{stem}{i or ''}".lstrip(".")


# -- fxqbn.prepare's patterns ------------------------------------------------------------------------


def _folded(match: Match, fold: Fold) -> Folded:
    after = f"; the {match.activation.name} after it stays float" if match.activation.name else ""
    return Folded(match.position, match.bn_node, match.module, match.bn.spelling, f"{fold.into}{after}", match.source)


def _noted(match: Match, reason: str) -> Match:
    """A match that stays a BN although a conv / linear feeds it: the reason, in its report row."""
    note = f"not folded: {reason}"
    return replace(match, note=f"{match.note}; {note}" if match.note else note)


def _near_miss(rule: FoldRule | None, match: Match) -> bool:
    """Whether a BN that stays is one the rule takes after its producer (so its row says why it stays):
    not a BN spelling that never folds (F.batch_norm, SyncBatchNorm, torch.ao's BNReLU) or a non-producer."""
    return rule is not None and match.bn.spelling in rule.bns


def fold_patterns(graph: fx.Graph, root: nn.Module, matches: list[Match], wanted: Callable[[Match], bool]) -> tuple[list[Match], list[Folded]]:
    """Fold each match ``wanted`` picks whose BN folds into the module that feeds it (every decision
    made before any fold is applied); ``root`` (a model nobody else holds) gets the folded copies.
    Returns the matches that stay BNs (a note says why one that a conv / linear of its kind feeds was not
    folded) and the folded ones."""
    index = index_of(graph, root)
    kept, folds, folded = [], [], []
    for match in matches:
        decision = decide(graph, root, match, index) if wanted(match) else None
        if isinstance(decision, Fold):
            folds.append(decision)
            folded.append(_folded(match, decision))
        elif decision is not None and _near_miss(fold_rule(index.nodes[match.input_node], index.modules), match):
            kept.append(_noted(match, decision))
        else:
            kept.append(match)
    fold_modules(graph, root, [f for f in folds if f.module is not None])
    fold_attributes(graph, root, [f for f in folds if f.module is None])  # a torch.export graph handed to prepare
    return kept, folded
