"""Rewriting: each planned pattern becomes one call of its int8 BN module, in a new graph built in one
pass over the old one (which is not changed). Rewriting decides nothing about what matches or what
kernel runs: the plans and the modules built for them say.

An observed graph (fxqbn.prepare's, or torch.ao's ``prepare_fx``), two patterns, the first reading
float code, the second reading the first and read by float code::

    x_obs = fxqbn_observer_0(x)
    bn1 = bn1(x_obs)
    drop = drop(bn1)                # Identity / eval Dropout, fused
    relu = relu(drop)               # the activation (ReLU, ReLU6, ...), fused
    mid_obs = fxqbn_observer_1(relu)
    bn2 = bn2(mid_obs)
    out_obs = fxqbn_observer_2(bn2)
    y = add(out_obs, 1)

becomes, with quantize/dequantize only where float and int8 values meet::

    q = fxqbn_quantize_0(x)         # fxqbn.nn.Quantize(0.02, 128, torch.quint8)
    bn1 = bn1(q)                    # fxqbn.nn.BNReLU2d holding the output qparams
    bn2 = bn2(bn1)                  # reads bn1's int8 value: no dequantize/quantize between
    dq = fxqbn_dequantize_0(bn2)    # fxqbn.nn.DeQuantize, one module for every such node
    y = add(dq, 1)

A pattern between float code (its input read by no other pattern, its output by none: a BN between
convs) is one node, with ``float_io``: a ``fxqbn.float_io.FloatIO`` holding its quantize, its int8
module and its dequantize::

    bn = bn(x)                      # FloatIO(Quantize(0.02, 128, torch.quint8), BNReLU2d, DeQuantize)

An int8 graph (torch.ao ``convert_fx``'s quantized tensors; PT2E's plain codes, shown here) already
holds int8 values at the pattern's edges: its dequantize, float BN, activation and quantize become
one call that reads the int8 value and gives the quantize's codes::

    dq = dequantize_per_tensor(codes, s_in, z_in, 0, 255, torch.uint8)
    bn = aten.batch_norm(dq, w, b, mean, var, False, 0.1, 1e-5, False)
    relu = aten.relu_(bn)
    q = quantize_per_tensor(relu, s_out, z_out, 0, 255, torch.uint8)

becomes ``bn = fxqbn_lowered_bn(codes)``; the dequantize stays where something else reads it, and
attributes only the removed nodes read go with them.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import Protocol

from torch import fx, nn

from fxqbn.errors import FxqbnError
from fxqbn.float_io import FloatIO
from fxqbn.qparams import QParams

from .base import ensures
from .records import FLOAT, Converted, Dropped, Match, Plan, Rewrite, Rewritten

__all__ = ["Boundaries", "rewrite_patterns", "NewModules", "QUANTIZE_PREFIX", "DEQUANTIZE_PREFIX", "LOWERED_PREFIX"]

QUANTIZE_PREFIX = "fxqbn_quantize_"  # float -> int8 boundary modules, one per distinct input
DEQUANTIZE_PREFIX = "fxqbn_dequantize_"  # int8 -> float boundary modules (one shared, when int8 values carry their qparams)
LOWERED_PREFIX = "fxqbn_lowered_"  # int8 graphs: the int8 BN modules, fxqbn_lowered_<BN node name>


class Boundaries(Protocol):
    """What rewriting asks of a backend (``fxqbn.backends.Backend``): its boundary modules."""

    name: str
    dequantize_shared: bool  # one dequantize module serves every boundary

    def quantize(self, qparams: QParams) -> nn.Module: ...

    def dequantize(self, qparams: QParams) -> nn.Module: ...


def _call(graph: fx.Graph, target: str, args: tuple, name: str | None = None) -> fx.Node:
    return graph.create_node("call_module", target, args, name=name)


def _has(root: nn.Module, target: str) -> bool:
    try:
        operator.attrgetter(target)(root)
    except AttributeError:
        return False
    return True


class NewModules:
    """Targets for the modules a rewrite adds, unique against ``root``'s attributes and each other."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        self._next: dict[str, int] = {}

    def _free(self, name: str) -> bool:
        return name not in self.modules and not _has(self.root, name)

    def add(self, prefix: str, module: nn.Module) -> str:
        """Under the first free ``prefix<k>``."""
        k = self._next.get(prefix, 0)
        while not self._free(f"{prefix}{k}"):
            k += 1
        self._next[prefix] = k + 1
        self.modules[f"{prefix}{k}"] = module
        return f"{prefix}{k}"

    def named(self, name: str, module: nn.Module, replacing: bool = False) -> str:
        """Under ``name``, or the first free ``name_<k>`` (k = 1, 2, ...); ``replacing``: ``name`` may be a
        module of ``root`` (the one this one replaces), just not one added already."""
        target, k = name, 0
        while target in self.modules or ((k or not replacing) and not self._free(target)):
            k += 1
            target = f"{name}_{k}"
        self.modules[target] = module
        return target

    def replace(self, match: Match, module: nn.Module) -> str:
        """Observed graphs: where the float BN module was (a BN called twice: a fresh name beside it), an
        F.batch_norm's at the root, named after its node. Int8 graphs: ``fxqbn_lowered_<node>``."""
        if match.boundary.holds != FLOAT:
            return self.named(LOWERED_PREFIX + match.bn_node, module)
        name = match.module if match.bn.module is not None else f"fxqbn_{match.bn_node}"
        return self.named(name, module, replacing=True)


class _Roles:
    """What each node of the old graph is to the rewrite, by name (planning, no graph edits)."""

    def __init__(self, graph: fx.Graph, plans: Sequence[Plan], dropped: Sequence[Dropped], float_io: bool) -> None:
        matches = [p.match for p in plans]
        observed = [m for m in matches if m.boundary.holds == FLOAT]
        self.plan_of = {p.match.bn_node: p for p in plans}  # BN node -> its plan
        self.outputs = {m.boundary.output for m in observed}  # observers read as the pattern's int8 value
        self.passed = ({m.boundary.input for m in observed} | {d.observer for d in dropped}) - self.outputs  # -> their input
        self.gone = {n for m in matches for n in (*m.nodes, *m.boundary.between)}  # fused into the int8 BN
        self.gone |= self._unread(graph, [m.boundary.input for m in matches if m.boundary.holds != FLOAT])
        self.gone |= {n.name for n in graph.nodes if n.op == "get_attr" and n.users and all(u.name in self.gone for u in n.users)}
        self.between_float = self._between_float(observed) if float_io else set()

    def _unread(self, graph: fx.Graph, dequantizes: list[str]) -> set[str]:
        """The dequantizes of int8 graphs that nothing but the rewritten patterns reads."""
        nodes = {n.name: n for n in graph.nodes}
        return {d for d in dequantizes if all(u.name in self.gone for u in nodes[d].users)}

    def _between_float(self, observed: Sequence[Match]) -> set[str]:
        """BN nodes of observed patterns whose input is a float value read by no other pattern and whose
        output no pattern reads: each becomes one FloatIO call."""
        readers: dict[str, int] = {}
        for m in observed:
            readers[m.boundary.input] = readers.get(m.boundary.input, 0) + 1
        return {
            m.bn_node for m in observed
            if readers[m.boundary.input] == 1 and m.boundary.input not in self.outputs and m.boundary.output not in readers
        }


class _Rewriter:
    """Builds the new graph in one pass over the old one: other nodes are copied, each pattern becomes
    one call of its int8 module, boundaries are added where float and int8 values meet."""

    def __init__(self, source: fx.Graph, root: nn.Module, backend: Boundaries) -> None:
        self.graph = fx.Graph(tracer_cls=source._tracer_cls)
        self.graph.set_codegen(copy.copy(source._codegen))  # the old graph's calling convention (pytree specs of exported graphs)
        self.backend, self.new = backend, NewModules(root)
        self.old = {node.name: node for node in source.nodes}
        self.env: dict[str, fx.Node] = {}  # old node name -> its value (as the old graph held it) in the new graph
        self.quantized: dict[str, fx.Node] = {}  # observer name -> new node holding the int8 value
        self.dequantized: dict[str, fx.Node] = {}  # output observer name -> its dequantize node
        self.dequantizers: dict[object, str] = {}  # one module, or one per qparams (plain codes)
        self.quantize_nodes: list[str] = []
        self.float_io: list[str] = []  # targets of the FloatIO modules installed
        self.qparams: dict[str, QParams] = {}  # observer name -> its qparams

    def value(self, node: fx.Node) -> fx.Node:
        """``node``'s value for float code: an observed pattern's output is dequantized once, after it."""
        if node.name not in self.quantized or node.name in self.env:
            return self.env[node.name]
        qparams = self.qparams[node.name]
        key = None if self.backend.dequantize_shared else qparams
        if key not in self.dequantizers:
            self.dequantizers[key] = self.new.add(DEQUANTIZE_PREFIX, self.backend.dequantize(qparams))
        with self.graph.inserting_after(self.quantized[node.name]):
            self.env[node.name] = _call(self.graph, self.dequantizers[key], (self.quantized[node.name],))
        self.dequantized[node.name] = self.env[node.name]
        return self.env[node.name]

    def quantized_input(self, observer: str, qparams: QParams) -> fx.Node:
        """The int8 value of an input observer: another pattern's output, or a new quantize."""
        if observer not in self.quantized:
            boundary = self.new.add(QUANTIZE_PREFIX, self.backend.quantize(qparams))
            node = _call(self.graph, boundary, (self.env[observer],))
            self.quantized[observer] = node
            self.qparams[observer] = qparams
            self.quantize_nodes.append(node.name)
        return self.quantized[observer]

    def install(self, bn: fx.Node, plan: Plan, module: nn.Module, between_float: bool) -> Rewrite:
        """One pattern: its int8 module's call, named as the BN was."""
        b = plan.match.boundary
        entry = bn.args[0]
        if not isinstance(entry, fx.Node) or entry.name != b.input:
            raise FxqbnError(f"the graph changed since fxqbn.prepare: BatchNorm node '{bn.name}' no longer reads its observer")
        if b.holds != FLOAT:  # the int8 value the dequantize read, in and out
            target = self.new.replace(plan.match, module)
            node = _call(self.graph, target, (self.env[entry.args[0].name],), name=bn.name)
            node.meta.update({k: v for k, v in self.old[b.output].meta.items() if k in ("val", "tensor_meta", "stack_trace")})
            self.env[b.output] = node
            return Rewrite(plan, target, self.backend.name)
        self.qparams[b.output] = plan.output.qparams
        if between_float:  # its own dequantize: a module shared with a node's target would be named once by named_modules()
            io = FloatIO(self.backend.quantize(plan.input.qparams), module, self.backend.dequantize(plan.output.qparams))
            target = self.new.replace(plan.match, io)
            self.env[b.output] = _call(self.graph, target, (self.env[b.input],), name=bn.name)
            self.float_io.append(target)
            return Rewrite(plan, f"{target}.bn", self.backend.name)
        q_in = self.quantized_input(b.input, plan.input.qparams)
        target = self.new.replace(plan.match, module)
        self.quantized[b.output] = _call(self.graph, target, (q_in,), name=bn.name)
        return Rewrite(plan, target, self.backend.name)

    def copy(self, node: fx.Node, roles: _Roles) -> None:
        """A node that is no part of a pattern: copied, or passed through (observers), or left out."""
        if node.name in roles.passed:
            self.env[node.name] = self.value(node.args[0])  # type: ignore[arg-type]
        elif node.name not in roles.gone and node.name not in roles.outputs:
            self.env[node.name] = self.graph.node_copy(node, self.value)


def rewrite_patterns(
    graph: fx.Graph, root: nn.Module, plans: Sequence[Plan], modules: Sequence[nn.Module], backend: Boundaries,
    dropped: Sequence[Dropped] = (), float_io: bool = True,
) -> Rewritten:
    """A new graph: ``graph`` with each planned pattern replaced by a call of its module (``modules``, in
    the plans' order), observers (the patterns' and ``dropped``) removed, and ``backend``'s boundaries
    where float and int8 values meet. ``graph`` and ``root`` are not changed.

    Returns the new graph (its targets resolve in the returned modules first, then in ``root``), the
    record (rewrites, boundaries added) and the modules it needs beyond ``root``'s, by target. The
    caller builds or updates the GraphModule. ``float_io``: observed patterns between float code become
    FloatIO calls (False: quantize, module and dequantize nodes, as files of format 1 hold).
    """
    roles, rewriter = _Roles(graph, plans, dropped, float_io), _Rewriter(graph, root, backend)
    built = dict(zip((p.match.bn_node for p in plans), modules, strict=True))
    rewrites = []
    for node in graph.nodes:
        plan = roles.plan_of.get(node.name)
        if plan is None:
            rewriter.copy(node, roles)
        else:
            rewrites.append(rewriter.install(node, plan, built[node.name], node.name in roles.between_float))
    dequantize_nodes = tuple(n.name for n in rewriter.dequantized.values())
    converted = Converted(tuple(rewrites), tuple(rewriter.quantize_nodes), dequantize_nodes, tuple(rewriter.float_io))
    return Rewritten(ensures(rewriter.graph), converted, rewriter.new.modules)
