"""Rewrite observed patterns into quantized modules, with quantize/dequantize only at boundaries.

Before (two patterns, the first reading float code, the second reading the first and read by
float code)::

    x_obs = fxqbn_observer_0(x)
    bn1 = bn1(x_obs)
    drop = drop(bn1)                # Identity / eval Dropout, fused
    relu = relu(drop)               # the activation (ReLU, ReLU6, ...), fused
    mid_obs = fxqbn_observer_1(relu)
    bn2 = bn2(mid_obs)
    out_obs = fxqbn_observer_2(bn2)
    y = add(out_obs, 1)

After::

    q = fxqbn_quantize_0(x)         # fxqbn.nn.Quantize(0.02, 128, torch.quint8)
    bn1 = bn1(q)                    # fxqbn.nn.BNReLU2d holding the output qparams
    bn2 = bn2(bn1)                  # reads bn1's quantized tensor: no dequantize/quantize between
    dq = fxqbn_dequantize_0(bn2)    # fxqbn.nn.DeQuantize, one module for every such node
    y = add(dq, 1)

A pattern between float code (its input read by no other pattern, its output by none: a BN between
convs) is one node, with ``float_io``: a ``fxqbn.float_io.FloatIO`` holding its quantize, its
quantized module and its dequantize::

    bn = bn(x)                      # FloatIO(Quantize(0.02, 128, torch.quint8), BNReLU2d, DeQuantize)

The new graph is built in one pass over the observed one, which is not changed (``_Roles`` plans
from the records, ``_Rewriter`` emits, through ``emit``). The ``Backend`` record
(``fxqbn.backends``) supplies the replacement and boundary modules; the default is the native one above.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import fx, nn

from fxqbn.backends import NATIVE, Backend, BnTensors
from fxqbn.errors import FxqbnError
from fxqbn.float_io import FloatIO
from fxqbn.nn import own_many
from fxqbn.qparams import Observation, read_many

from . import emit
from .modules import ModuleIndex
from .new_modules import NewModules as _NewModules
from .records import Converted, Dropped, Match, Observed, Rewrite, observer_users

__all__ = ["read_observers", "bn_tensors", "build_replacements", "rewrite_patterns", "QUANTIZE_PREFIX", "DEQUANTIZE_PREFIX"]

QUANTIZE_PREFIX = "fxqbn_quantize_"  # float -> quantized boundary modules, one per distinct input
DEQUANTIZE_PREFIX = "fxqbn_dequantize_"  # the quantized -> float boundary module, one shared by all


def read_observers(gm: fx.GraphModule, patterns: Sequence[Observed], index: ModuleIndex | None = None) -> dict[str, Observation]:
    """The Observation (qparams, range) of every observer node the patterns use, each read once
    (``index``: ``gm``'s modules, when the caller has it).

    Raises FxqbnError listing the BN modules whose observers never saw data, or naming the
    observer whose qparams the kernel cannot take.
    """
    index = index or ModuleIndex(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    users = observer_users(patterns)
    observers = {name: index.module(str(nodes[name].target)) for name in users}
    readings = read_many(observers)
    idle = [name for name, reading in readings.items() if reading is None]
    if idle:
        modules = sorted({module for name in idle for module in users[name]})
        raise FxqbnError(
            f"observers never saw data for BatchNorm {', '.join(repr(m) for m in modules)}: run calibration "
            "batches through the prepared model (in eval mode, under torch.no_grad()) before fxqbn.convert"
        )
    for name, reading in readings.items():
        if isinstance(reading, FxqbnError):
            raise FxqbnError(
                f"observer '{name}' (for BatchNorm {', '.join(repr(m) for m in users[name])}): {reading}. "
                "Check the calibration data for NaN or infinite values"
            )
    return readings  # type: ignore[return-value]


def bn_tensors(root: nn.Module, match: Match, index: ModuleIndex | None = None) -> BnTensors:
    """The BN's tensors, from the attribute targets its normalised record names (module or functional);
    ``index``: ``root``'s modules, when the caller has it (one lookup per tensor instead of a walk)."""
    index = index or ModuleIndex(root)
    b = match.bn
    mean, var = index.attr(b.running_mean), index.attr(b.running_var)
    weight = None if b.weight is None else index.attr(b.weight)
    bias = None if b.bias is None else index.attr(b.bias)
    if match.bn_module is None:
        return BnTensors(mean, var, weight, bias, b.eps, match.momentum)
    module = index.module(match.bn_module)  # a module's constants as they are now, not as at prepare
    return BnTensors(mean, var, weight, bias, module.eps, module.momentum)


class _Roles:
    """What each node of the observed graph is to the rewrite, by name (planning, no graph edits)."""

    def __init__(self, patterns: Sequence[Observed], dropped: Sequence[Dropped], float_io: bool = True) -> None:
        self.pattern_of = {p.match.bn_node: p for p in patterns}  # BN node -> its pattern
        self.outputs = {p.output_observer for p in patterns}  # read as the pattern's quantized value
        self.passed = {p.input_observer for p in patterns} | {d.observer for d in dropped}  # -> their input
        self.passed -= self.outputs
        self.gone = {n for p in patterns for n in (*p.match.chain, p.match.bn.output)}  # fused into the BN
        self.bn_inputs = set(self.pattern_of)
        self.between_float = self._between_float(patterns) if float_io else set()

    def _between_float(self, patterns: Sequence[Observed]) -> set[str]:
        """BN nodes of the patterns whose input is a float value read by no other pattern and whose
        output no pattern reads: each becomes one FloatIO call."""
        readers: dict[str, int] = {}
        for p in patterns:
            readers[p.input_observer] = readers.get(p.input_observer, 0) + 1
        return {
            p.match.bn_node for p in patterns
            if readers[p.input_observer] == 1 and p.input_observer not in self.outputs and p.output_observer not in readers
        }

    def statistics_only(self, node: fx.Node) -> bool:
        """A get_attr read by replaced BNs alone (F.batch_norm's statistics)."""
        return node.op == "get_attr" and bool(node.users) and all(u.name in self.bn_inputs for u in node.users)


class _Rewriter:
    """Builds the rewritten graph in one pass over the observed one: float nodes are copied, each
    pattern becomes one call of its quantized module, boundaries are added where values cross."""

    def __init__(
        self, source: fx.Graph, root: nn.Module, readings: Mapping[str, Observation], backend: Backend, index: ModuleIndex | None = None
    ) -> None:
        self.graph = fx.Graph(tracer_cls=source._tracer_cls)
        self.graph._codegen = copy.deepcopy(source._codegen)  # as Graph.__deepcopy__ does
        self.backend, self.readings = backend, readings
        self.new = _NewModules(root, index)
        self.env: dict[str, fx.Node] = {}  # observed node name -> its float value in the new graph
        self.quantized: dict[str, fx.Node] = {}  # observer name -> new node holding the quantized value
        self.dequantized: dict[str, fx.Node] = {}  # output observer name -> its dequantize node
        self.dequantizers: dict[object, str] = {}  # one module, or one per qparams (fused: plain codes)
        self.quantize_nodes: list[str] = []
        self.float_io: list[str] = []  # targets of the FloatIO modules installed

    def value(self, node: fx.Node) -> fx.Node:
        """``node``'s value for float code: a pattern's output is dequantized once, after it."""
        if node.name not in self.quantized or node.name in self.env:
            return self.env[node.name]
        qparams = self.readings[node.name].qparams
        key = None if self.backend.dequantize_shared else qparams
        if key not in self.dequantizers:
            self.dequantizers[key] = self.new.add(DEQUANTIZE_PREFIX, self.backend.dequantize(qparams))
        with self.graph.inserting_after(self.quantized[node.name]):
            self.env[node.name] = emit.call_module(self.graph, self.dequantizers[key], (self.quantized[node.name],))
        self.dequantized[node.name] = self.env[node.name]
        return self.env[node.name]

    def quantized_input(self, observer: fx.Node) -> fx.Node:
        """The quantized value of an input observer: another pattern's output, or a new quantize."""
        if observer.name not in self.quantized:
            boundary = self.new.add(QUANTIZE_PREFIX, self.backend.quantize(self.readings[observer.name].qparams))
            node = emit.call_module(self.graph, boundary, (self.env[observer.name],))  # module added later
            self.quantized[observer.name] = node
            self.quantize_nodes.append(node.name)
        return self.quantized[observer.name]

    def install(self, bn: fx.Node, pattern: Observed, qmodule: nn.Module, between_float: bool = False) -> Rewrite:
        """One pattern: its quantized module's call, reading the quantized input, named as the BN was;
        ``between_float``: a FloatIO's call instead, reading and giving the float values."""
        match = pattern.match
        in_obs = bn.args[0]
        if not isinstance(in_obs, fx.Node) or in_obs.name != pattern.input_observer:
            raise FxqbnError(f"the graph changed since fxqbn.prepare: BatchNorm node '{bn.name}' no longer reads its observer")
        qin, qout = self.readings[in_obs.name], self.readings[pattern.output_observer]
        if between_float:
            # its own dequantize: a module shared with a node's target would be named once by named_modules()
            boundaries = FloatIO(self.backend.quantize(qin.qparams), qmodule, self.backend.dequantize(qout.qparams))
            target = self.new.replace(match, boundaries)
            self.env[pattern.output_observer] = emit.call_module(self.graph, target, (self.env[in_obs.name],), name=bn.name)
            self.float_io.append(target)
            installed = f"{target}.bn"
        else:
            q_in = self.quantized_input(in_obs)
            installed = target = self.new.replace(match, qmodule)
            self.quantized[pattern.output_observer] = emit.call_module(self.graph, target, (q_in,), name=bn.name)
        return Rewrite(pattern, installed, qin, qout, self.backend.name, self.backend.op_for(match.rule))

    def copy(self, node: fx.Node, roles: _Roles) -> None:
        """A node that is no part of a pattern: copied, or passed through (observers), or left out."""
        if node.name in roles.passed:
            self.env[node.name] = self.value(node.args[0])  # type: ignore[arg-type]
        elif node.name not in roles.gone and node.name not in roles.outputs and not roles.statistics_only(node):
            self.env[node.name] = emit.copy_node(self.graph, node, self.value)


def build_replacements(
    root: nn.Module, patterns: Sequence[Observed], readings: Mapping[str, Observation], backend: Backend,
    index: ModuleIndex | None = None,
) -> list[nn.Module]:
    """Step 0: every replacement module, its statistics checked (all at once), before the graph changes."""
    index = index or ModuleIndex(root)
    tensors = [bn_tensors(root, p.match, index) for p in patterns]
    owned = own_many([(p.match.module, t) for p, t in zip(patterns, tensors)])  # checked float32 copies
    return [
        backend.module_for(
            p.match.rule, BnTensors(mean, var, weight, bias, t.eps, t.momentum),
            readings[p.input_observer].qparams, readings[p.output_observer].qparams, p.match.module, checked=True,
        )
        for p, t, (mean, var, weight, bias) in zip(patterns, tensors, owned)
    ]


def rewrite_patterns(
    graph: fx.Graph,
    root: nn.Module,
    patterns: Sequence[Observed],
    readings: Mapping[str, Observation],
    backend: Backend = NATIVE,
    dropped: Sequence[Dropped] = (),
    index: ModuleIndex | None = None,
    float_io: bool = True,
) -> tuple[fx.Graph, Converted, dict[str, nn.Module]]:
    """A new graph: ``graph`` with every observed pattern replaced by ``backend``'s module and the
    observers (the patterns' and ``dropped``) removed. ``graph`` and ``root`` are not changed.

    Returns the new graph (its targets resolve in the returned modules first, then in ``root``), the
    record (rewrites, boundaries added) and the modules it needs beyond ``root``'s, by target (a
    replaced BN's target maps to its quantized module, or to the FloatIO holding it). The caller builds or updates the GraphModule.
    ``index``: ``root``'s modules, when the caller has it; ``float_io``: patterns between float code
    become FloatIO calls (False: quantize, module and dequantize nodes, as files of format 1 hold).
    """
    index = index or ModuleIndex(root)
    qmodules = dict(zip((p.match.bn_node for p in patterns), build_replacements(root, patterns, readings, backend, index)))
    roles, rewriter = _Roles(patterns, dropped, float_io), _Rewriter(graph, root, readings, backend, index)
    rewrites = []
    for node in graph.nodes:
        pattern = roles.pattern_of.get(node.name)
        if pattern is None:
            rewriter.copy(node, roles)
        else:
            rewrites.append(rewriter.install(node, pattern, qmodules[node.name], node.name in roles.between_float))
    dequantize_nodes = tuple(n.name for n in rewriter.dequantized.values())
    converted = Converted(tuple(rewrites), tuple(rewriter.quantize_nodes), dequantize_nodes, tuple(rewriter.float_io))
    return rewriter.graph, converted, rewriter.new.modules
