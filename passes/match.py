"""Matching: find every BatchNorm of a graph and decide, with a reason, what becomes of it.

One matcher for every kind of graph (``passes.boundaries.GraphKind``): a BatchNorm is any spelling of
``passes.registry`` (read into one ``BnCall``); the activation after it (through Identity / eval
Dropout) is read as its float clamp; the kind says how the pattern's edges are marked (``Boundary``)
and what it may fuse. Matching reads the graph (and, for ranks, the ``tensor_meta`` / ``val`` left on
its nodes) and never edits it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import fx, nn

from fxqbn.errors import FxqbnError
from fxqbn.qconfig import ActivationSpec
from fxqbn.source import source_of

from . import registry
from .boundaries import GraphKind
from .graph_facts import rank, tensor_problem
from .reading import BnCall, bn_inside
from .records import FLOAT, Boundary, Found, Match, Skip
from .registry import NO_ACTIVATION, RANK_TO_DIM, Activation, BnSpelling

__all__ = ["find_patterns", "needs_shapes", "shapes_needed_by", "Choose"]

# (module name, module type or function, the type of a fused module's BatchNorm or None) -> the observer
# for a pattern, or why the BN stays float (fxqbn.prepare's skip argument and qconfig).
Choose = Callable[[str, object, object], "ActivationSpec | str"]


def _is_bn_module(module: object) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def shapes_needed_by(graph: fx.Graph, root: nn.Module) -> tuple[str, ...]:
    """The BNs (their owners, as the report names them) whose kernel dim depends on their input's rank
    (F.batch_norm, SyncBatchNorm, ATen forms): a run on example inputs must record it."""
    modules = dict(root.named_modules(remove_duplicate=False))
    calls = ((n, spelling.read(n, _module(n, modules))) for n in graph.nodes for spelling in (registry.bn_spelling(n, modules),)
             if spelling is not None and spelling.dim is None)
    return tuple(call.owner or n.name for n, call in calls if not isinstance(call, str))


def needs_shapes(graph: fx.Graph, root: nn.Module) -> bool:
    """Whether some BN's kernel dim depends on its input's rank (F.batch_norm, SyncBatchNorm, ATen forms)."""
    return bool(shapes_needed_by(graph, root))


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


@dataclass(frozen=True)
class _Chain:
    """What follows a BN output: the nodes fused (pass-throughs, the activation), the clamp, a note."""

    nodes: tuple[str, ...] = ()
    clamp: tuple[float, float] | None = None
    note: str = ""


def _walk(output: fx.Node, modules: dict[str, nn.Module], any_clamp: bool, clamp: tuple[float, float] | None = None) -> tuple[_Chain, fx.Node]:
    """The chain after a BN output and the node it ends on. Each node is its predecessor's only user:
    pass-throughs, then one activation; int8 graphs (``any_clamp``) take any constant clamp and
    pass-throughs after it, observed graphs only an activation of the rules, fusing pass-throughs
    only before one (a note says why an activation was left unfused). ``clamp``: one inside the BN."""
    value, passed = output, []
    while True:
        users = list(value.users)
        found = [c for c in (registry.read_activation(u, modules) for u in users) if c is not None and c.input == value.name]
        if len(users) == 1 and registry.passthrough_input(users[0], modules) is value:
            passed.append(users[0].name)
        elif len(users) == 1 and found and clamp is None and (any_clamp or registry.activation_for(found[0].lo, found[0].hi)):
            passed.append(users[0].name)
            clamp = (found[0].lo, found[0].hi)
            if not any_clamp:
                return _Chain(tuple(passed), clamp), users[0]
        elif any_clamp:
            return _Chain(tuple(passed), clamp), value
        else:
            return _Chain(note=_unfused(users, found)), output
        value = users[0]


def _unfused(users: list[fx.Node], found: list) -> str:
    """Why the activation after a BN (if any) is not fused, in an observed graph."""
    if not found:
        return ""
    what = registry.activation_name(found[0].lo, found[0].hi)
    if len(users) != 1:
        return f"{what} not fused: the BN output has {len(users)} users"
    return f"{what} not fused: no rule has that activation"


def _activation(clamp: tuple[float, float] | None) -> Activation:
    """The Activation of a float clamp: a named one of the table, or an unnamed constant clamp."""
    if clamp is None:
        return NO_ACTIVATION
    return registry.activation_for(*clamp) or Activation(registry.activation_name(*clamp), *clamp)


class _Matcher:
    def __init__(self, graph: fx.Graph, root: nn.Module, kind: GraphKind, choose: Choose | None) -> None:
        self.root, self.kind, self.choose = root, kind, choose
        self.modules = dict(root.named_modules(remove_duplicate=False))
        self.modules.setdefault("", root)
        self.nodes = {node.name: node for node in graph.nodes}

    def skip(self, position: int, node: fx.Node, module: str, pattern: str, reason: str) -> Skip:
        return Skip(position=position, node=node.name, module=module, pattern=pattern, reason=reason, source=source_of(node))

    def match(self, position: int, node: fx.Node) -> Match | Skip | None:
        module = _module(node, self.modules)
        spelling = registry.bn_spelling(node, self.modules)
        if spelling is None:
            if _is_bn_module(module):
                name = type(module).__name__
                return self.skip(position, node, str(node.target), name, f"no quantized rule for {name}")
            return None
        dim = self._dim(node, spelling)
        names = self._names(node, module, spelling, dim)
        chosen = self._chosen(position, node, module, spelling, names)
        if isinstance(chosen, Skip):
            return chosen
        if isinstance(dim, str) or (dim is None and self.kind.needs_dim):
            return self.skip(position, node, *names, dim if isinstance(dim, str) else _rank_reason(None, names[1]))
        return self._pattern(position, node, spelling, dim, names, *chosen)

    def _dim(self, node: fx.Node, spelling: BnSpelling) -> int | None | str:
        """The kernel dim: the spelling's, checked against the input's rank where the graph shows it on
        the input or on the BN's output (a BN keeps the shape; PT2E's dequantize nodes carry none),
        None where it does not and the spelling fixes none, or why no kernel takes that rank."""
        value = node.args[0] if node.args else node.kwargs.get("input")
        found = rank(value) if isinstance(value, fx.Node) else None
        found = found if found is not None else _output_rank(node)
        if found is None:
            return spelling.dim
        dim = RANK_TO_DIM.get(found)
        if dim is None or (spelling.dim is not None and spelling.dim != dim):
            return _rank_reason(found, spelling.name)
        return dim

    def _names(self, node: fx.Node, module: nn.Module | None, spelling: BnSpelling, dim: object) -> tuple[str, str]:
        """(module, pattern) as a skip of this BN is reported: observed graphs name rules, int8 graphs spellings."""
        if module is not None:
            return str(node.target), type(module).__name__
        owner = _statistics_owner(node) or node.name
        if self.kind.holds == FLOAT:
            return owner, f"F.batch_norm{dim}d" if isinstance(dim, int) else "F.batch_norm"
        return owner, spelling.name

    def _chosen(self, position, node, module, spelling, names) -> tuple[BnCall, ActivationSpec | None] | Skip:
        """The BN's record and observer, once the user's choices (``choose``: skip, qconfig) and its state allow it."""
        name, pattern = names
        spec = None
        if self.choose is not None:
            spec = self.choose(name, type(module) if module is not None else spelling.user_type, _component(module))
            if isinstance(spec, str):
                return self.skip(position, node, name, pattern, spec)
        bn = bn_inside(module)[0]
        if self.kind.refuse_training and bn is not None and bn.training and bn.running_mean is not None:
            raise FxqbnError(self.kind.refuse_training.format(name=name))
        call = spelling.read(node, module)
        if isinstance(call, str):
            return self.skip(position, node, name, pattern, call)
        problem = tensor_problem(operator.attrgetter(call.running_mean)(self.root))
        if problem and self.kind.refuse_training:
            who = f"BatchNorm '{name}'" if module is not None else f"F.batch_norm node '{node.name}' ({name})"
            raise FxqbnError(f"{who} {problem}")
        return self.skip(position, node, name, pattern, problem) if problem else (call, spec)

    def _pattern(self, position, node, spelling: BnSpelling, dim, names, call: BnCall, spec) -> Match | Skip:
        inner = (spelling.inner.lo, spelling.inner.hi) if spelling.inner.name else None
        if inner is not None and not self.kind.any_clamp:
            chain, end = _Chain(clamp=inner), self.nodes[call.output]
        else:
            chain, end = _walk(self.nodes[call.output], self.modules, self.kind.any_clamp, inner)
        if self.kind.holds != FLOAT:
            boundary = self.kind.boundary(self.nodes, self.modules, call, end, chain.clamp)
            if isinstance(boundary, str):
                return self.skip(position, node, *names, boundary)
            return self._int8_match(position, node, call, dim, chain, boundary)
        found = self._rule_match(position, node, spelling, call, dim, chain, names[1], spec)
        if isinstance(found, Skip) or self.kind.boundary is None:
            return found  # fxqbn.prepare's graphs: observe puts the boundary in
        boundary = self.kind.boundary(self.nodes, self.modules, call, self.nodes[found.output_node], chain.clamp)
        if isinstance(boundary, str):  # a pattern torch.ao did not observe, named by its rule
            return self.skip(position, node, found.module, found.pattern, boundary)
        return replace(found, boundary=boundary, observer=self._observer(boundary))

    def _rule_match(self, position, node, spelling, call, dim, chain: _Chain, pattern, spec) -> Match | Skip:
        """Observed graphs: the rule for (kind, dim, activation); without one, the BN alone, with a note."""
        activation, note = _activation(chain.clamp), chain.note
        rule = registry.find_rule(spelling.kind, dim, activation)
        if rule is None and activation != NO_ACTIVATION and not spelling.inner.name:
            note = f"{activation.name} not fused: no rule for {spelling.kind} {dim}d + {activation.name}"
            chain, rule, activation = _Chain(), registry.find_rule(spelling.kind, dim, NO_ACTIVATION), NO_ACTIVATION
        if rule is None:
            return self.skip(position, node, call.owner or node.name, pattern, f"no quantized rule for {pattern} ({dim}d)")
        return Match(
            position=position, bn=call, pattern=rule.name, dim=dim, activation=activation, chain=chain.nodes,
            module=call.owner or node.name, rule=rule, observer=spec,
            momentum=self._momentum(node, spelling, call), source=source_of(node), note=note,
        )

    def _int8_match(self, position, node, call, dim, chain: _Chain, boundary: Boundary) -> Match:
        """Int8 graphs: whatever clamp the pattern computes, in code space; named by spelling."""
        activation = _activation(boundary.clamp)
        return Match(
            position=position, bn=call, pattern=call.spelling + (f"+{activation.name}" if activation.name else ""),
            dim=dim, activation=activation, chain=chain.nodes, module=call.owner, boundary=boundary, source=source_of(node),
        )

    def _observer(self, boundary: Boundary) -> ActivationSpec:
        """The observer spec of a pattern torch.ao observed: its output observer's kind and dtype."""
        observer = self.modules[str(self.nodes[boundary.output].target)]
        return ActivationSpec(factory=type(observer), dtype=observer.dtype)

    def _momentum(self, node: fx.Node, spelling: BnSpelling, call: BnCall) -> float | None:
        if call.module is not None:
            return self.modules[call.module].momentum
        at = spelling.momentum_arg
        value = node.args[at] if len(node.args) > at else node.kwargs.get("momentum", 0.1)
        return float(value) if isinstance(value, (int, float)) else None

    def hidden(self, position: int, node: fx.Node) -> list[Skip]:
        """The BNs inside a module the tracer kept as one node (e.g. a block timm declares
        untraceable): skipped, as nothing of the graph reaches them."""
        module = _module(node, self.modules)
        if module is None or _is_bn_module(module) or registry.bn_spelling(node, self.modules) is not None:
            return []
        where = f"inside {type(module).__name__} '{node.target}', which the tracer keeps as one call (a leaf module)"
        inside = sorted((name, type(bn).__name__) for name, bn in module.named_modules() if name and _is_bn_module(bn))
        return [self.skip(position, node, f"{node.target}.{name}", kind, f"{where}: kept float") for name, kind in inside]


def _output_rank(node: fx.Node) -> int | None:
    """The rank of a BN node's normalised output: its own, or its getitem 0's (the ATen forms with saved statistics)."""
    items = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    return rank(node) if rank(node) is not None or not items else rank(items[0])


def _rank_reason(found: int | None, pattern: str) -> str:
    if found is None:
        return f"its input's rank is not recorded in the graph: the int8 {pattern} kernel cannot be picked (2 to 5 dims)"
    return f"its input has rank {found}: no int8 {pattern} kernel takes it (2 to 5 dims)"


def _component(module: nn.Module | None) -> type | None:
    """The type of the BatchNorm inside torch.ao's fused BNReLU module; None for anything else."""
    bn = bn_inside(module)[0]
    return type(bn) if bn is not module else None


def _statistics_owner(node: fx.Node) -> str:
    """The module owning a functional BN's running mean (its get_attr's parent), or ""."""
    for arg in node.all_input_nodes:
        if arg.op == "get_attr" and str(arg.target).endswith("running_mean"):
            return str(arg.target).rpartition(".")[0]
    return ""


def find_patterns(graph: fx.Graph, root: nn.Module, kind: GraphKind, choose: Choose | None = None) -> Found:
    """Every BatchNorm call in ``graph`` (whose targets resolve in ``root``), in graph order: matched,
    or skipped with a reason. ``kind`` says what kind of graph it is; ``choose`` gives the observer of
    each BN of a graph fxqbn.prepare traced (or why it stays float). A BN whose dim the input's rank
    decides needs ``tensor_meta`` (``fxqbn.tracing.propagate_shapes``) or ``val`` (torch.export) on its input.

    Raises FxqbnError, in observed graphs, for a matched BN that must not be calibrated or converted
    (training mode) or whose statistics are not float32 on the CPU.
    """
    matcher = _Matcher(graph, root, kind, choose)
    matches: list[Match] = []
    skips: list[Skip] = []
    for position, node in enumerate(graph.nodes):
        found = matcher.match(position, node)
        if found is not None:
            (matches if isinstance(found, Match) else skips).append(found)
        else:
            skips.extend(matcher.hidden(position, node))
    return Found(matches, skips)
