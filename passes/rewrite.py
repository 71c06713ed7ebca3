"""Rewrite observed patterns into quantized modules, with quantize/dequantize only at boundaries.

Before (one pattern, input x from float code, output read by float code)::

    x_obs = fxqbn_observer_0(x)
    bn = bn(x_obs)
    relu = relu(bn)
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
from fxqbn.qparams import Observation, observer_has_data, read_many

from .records import Dropped, Match, Observed, Rewrite

__all__ = ["read_observers", "rewrite_patterns", "bn_tensors", "remove_observers", "QUANTIZE_PREFIX", "DEQUANTIZE_PREFIX"]

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


def bn_tensors(root: nn.Module, match: Match) -> BnTensors:
    """The BN's tensors: from its module (inside torch.ao's fused BNReLU too) or its F.batch_norm call."""
    f = match.functional
    if f is None:
        bn = match.rule.qmodule._unwrap(root.get_submodule(match.module))
        if bn.running_mean is None or bn.running_var is None:
            raise FxqbnError(f"BatchNorm '{match.module}' has track_running_stats=False: it cannot be quantized; keep it float")
        affine = bn.affine
        return BnTensors(bn.running_mean, bn.running_var, bn.weight if affine else None, bn.bias if affine else None, bn.eps, bn.momentum)

    def tensor(target: str | None) -> torch.Tensor | None:
        return None if target is None else operator.attrgetter(target)(root)

    return BnTensors(tensor(f.running_mean), tensor(f.running_var), tensor(f.weight), tensor(f.bias), f.eps, f.momentum)


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
        name = match.module if match.functional is None else f"fxqbn_{match.bn_node}"
        target, k = name, 0
        while target in self.modules or (k and not self._free(target)):
            k += 1
            target = f"{name}_{k}"
        self.modules[target] = module
        return target


def rewrite_patterns(
    graph: fx.Graph,
    root: nn.Module,
    patterns: Sequence[Observed],
    readings: Mapping[str, Observation],
    backend: Backend = NATIVE,
) -> tuple[tuple[Rewrite, ...], dict[str, nn.Module]]:
    """Replace every observed pattern (in graph order) in ``graph`` with ``backend``'s modules and
    remove their observers.

    ``graph``'s targets resolve in ``root``, which is not changed. Returns the records and the
    modules the rewritten graph needs beyond ``root``'s, by target (a replaced BN's target maps
    to its quantized module). The caller builds or updates the GraphModule.
    """
    nodes = {node.name: node for node in graph.nodes}
    quantized: dict[fx.Node, fx.Node] = {}  # observer node -> node holding the quantized value
    new = _NewModules(root)
    rewrites = []

    # 0. Every replacement is built (and its statistics checked) before the graph changes.
    qmodules = [
        backend.module_for(
            p.match.rule, bn_tensors(root, p.match), readings[p.input_observer].qparams,
            readings[p.output_observer].qparams, p.match.module,
        )
        for p in patterns
    ]

    # 1. A quantized twin for every pattern, reading quantized inputs.
    for pattern, qmodule in zip(patterns, qmodules):
        match = pattern.match
        bn = nodes[match.bn_node]
        in_obs, out_obs = nodes[pattern.input_observer], nodes[pattern.output_observer]
        if bn.args[0] is not in_obs:
            raise FxqbnError(f"the graph changed since fxqbn.prepare: BatchNorm node '{bn.name}' no longer reads its observer")
        q_in = quantized.get(in_obs)
        if q_in is None:
            boundary = new.add(QUANTIZE_PREFIX, backend.quantize(readings[in_obs.name].qparams))
            with graph.inserting_before(bn):
                q_in = graph.create_node("call_module", boundary, (in_obs,))  # the module is added later
            quantized[in_obs] = q_in
        target = new.replace(match, qmodule)
        with graph.inserting_before(out_obs):
            quantized[out_obs] = graph.create_node("call_module", target, (q_in,))
        rewrites.append(
            Rewrite(pattern, target, readings[in_obs.name], readings[out_obs.name], backend.name)
        )

    # 2. Last to first, so later patterns' BN nodes are gone: whatever still reads a pattern's
    #    output observer is float code and gets one dequantize. Then the float nodes go.
    dequantizers: dict[object, str] = {}  # one module, or one per qparams (fused: plain codes)
    for pattern in reversed(patterns):
        out_obs = nodes[pattern.output_observer]
        readers = list(out_obs.users)
        if readers:
            qparams = readings[out_obs.name].qparams
            key = None if backend.dequantize_shared else qparams
            if key not in dequantizers:
                dequantizers[key] = new.add(DEQUANTIZE_PREFIX, backend.dequantize(qparams))
            dequantize = dequantizers[key]
            q_out = quantized[out_obs]
            with graph.inserting_after(q_out):
                dq = graph.create_node("call_module", dequantize, (q_out,))
            for reader in readers:
                reader.replace_input_with(out_obs, dq)
        statistics = [arg for arg in nodes[pattern.match.bn_node].all_input_nodes if arg.op == "get_attr"]
        for name in (pattern.output_observer, pattern.match.relu_node, pattern.match.bn_node):
            if name is not None:
                graph.erase_node(nodes[name])
        for node in statistics:  # F.batch_norm's get_attr nodes, unless something else reads them
            if not node.users:
                graph.erase_node(node)

    # 3. Input observers that no pattern produced: their readers get the float value back.
    outputs = {pattern.output_observer for pattern in patterns}
    for name in dict.fromkeys(pattern.input_observer for pattern in patterns):
        if name not in outputs:
            observer = nodes[name]
            observer.replace_all_uses_with(observer.args[0])
            graph.erase_node(observer)
    return tuple(rewrites), new.modules


def remove_observers(graph: fx.Graph, dropped: Sequence[Dropped]) -> None:
    """Remove observer nodes that belong to no pattern; their readers get the observed value."""
    nodes = {node.name: node for node in graph.nodes}
    for item in dropped:
        node = nodes[item.observer]
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
