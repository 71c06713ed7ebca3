"""Rewrite observed patterns into quantized modules, with quantize/dequantize only at boundaries.

Before (one pattern, input x from float code, output read by float code)::

    x_obs = fxqbn_observer_0(x)
    bn = bn(x_obs)
    drop = drop(bn)                 # Identity / eval Dropout, fused
    relu = relu(drop)               # the activation (ReLU, ReLU6, ...), fused
    out_obs = fxqbn_observer_1(relu)
    y = add(out_obs, 1)

After::

    q = fxqbn_quantize_0(x)         # fxqbn.nn.Quantize(0.02, 128, torch.quint8)
    bn = bn(q)                      # fxqbn.nn.BNReLU2d holding the output qparams
    dq = fxqbn_dequantize_0(bn)     # fxqbn.nn.DeQuantize, one module for every such node
    y = add(dq, 1)

A pattern reading another pattern's output takes its quantized tensor directly: no
dequantize/quantize pair between them. The ``Backend`` record (``fxqbn.backends``) supplies the
replacement and boundary modules; the default is the native one above.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from fxqbn.backends import NATIVE, Backend, BnTensors
from fxqbn.errors import FxqbnError
from fxqbn.nn import check_many
from fxqbn.qparams import Observation, observer_has_data, read_many

from .records import Converted, Dropped, Match, Observed, Rewrite

__all__ = ["read_observers", "build_replacements", "rewrite_patterns", "remove_observers", "QUANTIZE_PREFIX", "DEQUANTIZE_PREFIX"]

QUANTIZE_PREFIX = "fxqbn_quantize_"  # float -> quantized boundary modules, one per distinct input
DEQUANTIZE_PREFIX = "fxqbn_dequantize_"  # the quantized -> float boundary module, one shared by all


def read_observers(gm: fx.GraphModule, patterns: Sequence[Observed]) -> dict[str, Observation]:
    """The Observation (qparams, range) of every observer node the patterns use, each read once.

    Raises FxqbnError listing the BN modules whose observers never saw data, or naming the
    observer whose qparams the kernel cannot take.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    users: dict[str, list[str]] = {}
    for pattern in patterns:
        for name in (pattern.input_observer, pattern.output_observer):
            users.setdefault(name, []).append(pattern.match.module)
    observers = {name: gm.get_submodule(str(nodes[name].target)) for name in users}
    idle = [name for name, observer in observers.items() if not observer_has_data(observer)]
    if idle:
        modules = sorted({module for name in idle for module in users[name]})
        raise FxqbnError(
            f"observers never saw data for BatchNorm {', '.join(repr(m) for m in modules)}: run calibration "
            "batches through the prepared model (in eval mode, under torch.no_grad()) before fxqbn.convert"
        )
    readings = read_many(observers)
    for name, reading in readings.items():
        if isinstance(reading, FxqbnError):
            raise FxqbnError(
                f"observer '{name}' (for BatchNorm {', '.join(repr(m) for m in users[name])}): {reading}. "
                "Check the calibration data for NaN or infinite values"
            )
    return readings  # type: ignore[return-value]


def _bn_tensors(root: nn.Module, match: Match) -> BnTensors:
    """The BN's tensors, from the attribute targets its normalised record names (module or functional)."""

    def tensor(target: str | None) -> torch.Tensor | None:
        return None if target is None else operator.attrgetter(target)(root)

    b, eps, momentum = match.bn, match.bn.eps, match.momentum
    if match.bn_module is not None:  # a module's constants as they are now, not as at prepare
        module = root.get_submodule(match.bn_module)
        eps, momentum = module.eps, module.momentum
    return BnTensors(tensor(b.running_mean), tensor(b.running_var), tensor(b.weight), tensor(b.bias), eps, momentum)


class _NewModules:
    """Targets for the modules a rewrite adds, unique against ``root``'s attributes and each other."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        self._next: dict[str, int] = {}

    def _free(self, name: str) -> bool:
        if name in self.modules:
            return False
        try:
            operator.attrgetter(name)(self.root)
        except AttributeError:
            return True
        return False

    def add(self, prefix: str, module: nn.Module) -> str:
        """Under the first free ``prefix<k>``."""
        k = self._next.get(prefix, 0)
        while not self._free(f"{prefix}{k}"):
            k += 1
        self._next[prefix] = k + 1
        self.modules[f"{prefix}{k}"] = module
        return f"{prefix}{k}"

    def replace(self, match: Match, module: nn.Module) -> str:
        """Where the float BN module was (a BN called twice: a fresh name beside it); an
        F.batch_norm's replacement at the root, named after its node."""
        name = match.module if match.bn_module is not None else f"fxqbn_{match.bn_node}"
        target, k = name, 0
        while target in self.modules or (k and not self._free(target)):
            k += 1
            target = f"{name}_{k}"
        self.modules[target] = module
        return target


class _Rewriter:
    """One rewrite of one graph: the nodes by name, the modules added, the boundaries inserted."""

    def __init__(self, graph: fx.Graph, root: nn.Module, readings: Mapping[str, Observation], backend: Backend) -> None:
        self.graph, self.backend, self.readings = graph, backend, readings
        self.nodes = {node.name: node for node in graph.nodes}
        self.new = _NewModules(root)
        self.quantized: dict[fx.Node, fx.Node] = {}  # observer node -> node holding the quantized value
        self.quantize_nodes: list[str] = []
        self.dequantize_nodes: list[str] = []

    def quantized_input(self, observer: fx.Node, before: fx.Node) -> fx.Node:
        """The quantized value of an input observer: another pattern's output, or a new quantize."""
        q_in = self.quantized.get(observer)
        if q_in is None:
            boundary = self.new.add(QUANTIZE_PREFIX, self.backend.quantize(self.readings[observer.name].qparams))
            with self.graph.inserting_before(before):
                q_in = self.graph.create_node("call_module", boundary, (observer,))  # the module is added later
            self.quantized[observer] = q_in
            self.quantize_nodes.append(q_in.name)
        return q_in

    def install(self, pattern: Observed, qmodule: nn.Module) -> Rewrite:
        """Step 1 for one pattern: its quantized twin after the output observer, reading quantized input."""
        match = pattern.match
        bn = self.nodes[match.bn_node]
        in_obs, out_obs = self.nodes[pattern.input_observer], self.nodes[pattern.output_observer]
        if bn.args[0] is not in_obs:
            raise FxqbnError(f"the graph changed since fxqbn.prepare: BatchNorm node '{bn.name}' no longer reads its observer")
        q_in = self.quantized_input(in_obs, bn)
        target = self.new.replace(match, qmodule)
        with self.graph.inserting_before(out_obs):
            self.quantized[out_obs] = self.graph.create_node("call_module", target, (q_in,))
        op = self.backend.op_for(match.rule)
        return Rewrite(pattern, target, self.readings[in_obs.name], self.readings[out_obs.name], self.backend.name, op)

    def dequantize_readers(self, pattern: Observed, dequantizers: dict[object, str]) -> None:
        """Step 2a: whatever still reads the pattern's output observer is float code: one dequantize."""
        out_obs = self.nodes[pattern.output_observer]
        readers = list(out_obs.users)
        if not readers:
            return
        qparams = self.readings[out_obs.name].qparams
        key = None if self.backend.dequantize_shared else qparams
        if key not in dequantizers:
            dequantizers[key] = self.new.add(DEQUANTIZE_PREFIX, self.backend.dequantize(qparams))
        with self.graph.inserting_after(self.quantized[out_obs]):
            dq = self.graph.create_node("call_module", dequantizers[key], (self.quantized[out_obs],))
        self.dequantize_nodes.append(dq.name)
        for reader in readers:
            reader.replace_input_with(out_obs, dq)

    def erase_float(self, pattern: Observed) -> None:
        """Step 2b: the pattern's float nodes (output observer, activation chain, BN) and the
        statistics' get_attr nodes nothing else reads."""
        match = pattern.match
        bn = self.nodes[match.bn_node]
        statistics = [arg for arg in bn.all_input_nodes if arg.op == "get_attr"]
        getitem = (match.bn.output,) if match.bn.output != match.bn_node else ()
        for name in (pattern.output_observer, *reversed(match.chain), *getitem, match.bn_node):
            self.graph.erase_node(self.nodes[name])
        for node in statistics:
            if not node.users:
                self.graph.erase_node(node)

    def drop_input_observers(self, patterns: Sequence[Observed]) -> None:
        """Step 3: input observers no pattern produced: their readers get the float value back."""
        outputs = {pattern.output_observer for pattern in patterns}
        for name in dict.fromkeys(pattern.input_observer for pattern in patterns):
            if name not in outputs:
                observer = self.nodes[name]
                observer.replace_all_uses_with(observer.args[0])
                self.graph.erase_node(observer)


def build_replacements(
    root: nn.Module, patterns: Sequence[Observed], readings: Mapping[str, Observation], backend: Backend
) -> list[nn.Module]:
    """Step 0: every replacement module, its statistics checked (all at once), before the graph changes."""
    tensors = [_bn_tensors(root, p.match) for p in patterns]
    check_many([(p.match.module, t) for p, t in zip(patterns, tensors)])
    return [
        backend.module_for(
            p.match.rule, t, readings[p.input_observer].qparams, readings[p.output_observer].qparams,
            p.match.module, checked=True,
        )
        for p, t in zip(patterns, tensors)
    ]


def rewrite_patterns(
    graph: fx.Graph,
    root: nn.Module,
    patterns: Sequence[Observed],
    readings: Mapping[str, Observation],
    backend: Backend = NATIVE,
) -> tuple[Converted, dict[str, nn.Module]]:
    """Replace every observed pattern (in graph order) in ``graph`` with ``backend``'s modules and
    remove their observers.

    ``graph``'s targets resolve in ``root``, which is not changed. Returns the record (rewrites and
    the boundary nodes added) and the modules the rewritten graph needs beyond ``root``'s, by target
    (a replaced BN's target maps to its quantized module). The caller builds or updates the GraphModule.
    """
    qmodules = build_replacements(root, patterns, readings, backend)
    rewriter = _Rewriter(graph, root, readings, backend)
    rewrites = tuple(rewriter.install(p, m) for p, m in zip(patterns, qmodules))
    dequantizers: dict[object, str] = {}  # one module, or one per qparams (fused: plain codes)
    for pattern in reversed(patterns):  # last to first, so later patterns' BN nodes are gone
        rewriter.dequantize_readers(pattern, dequantizers)
        rewriter.erase_float(pattern)
    rewriter.drop_input_observers(patterns)
    converted = Converted(rewrites, tuple(rewriter.quantize_nodes), tuple(rewriter.dequantize_nodes))
    return converted, rewriter.new.modules


def remove_observers(graph: fx.Graph, dropped: Sequence[Dropped]) -> None:
    """Remove observer nodes that belong to no pattern; their readers get the observed value."""
    nodes = {node.name: node for node in graph.nodes}
    for item in dropped:
        node = nodes[item.observer]
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
