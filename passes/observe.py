"""Observers around matched patterns: fxqbn.prepare inserts them; a graph torch.ao observed has them.

Each pattern gets one observer on its input and one on its output (after the fused ReLU).
An input that is already observed with the same dtype (another pattern's output, or a value
two patterns read) shares that observer, so adjacent patterns hand over one set of qparams.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import fx, nn

from fxqbn.errors import FxqbnError

from .base import ensures
from .boundaries import AO_OBSERVED, observer_nodes
from .graph_facts import describe
from .match import find_patterns
from .records import Boundary, Dropped, Match, Observed, Prepared, observer_users

__all__ = ["insert_observers", "adopt_observers", "is_torch_ao_observed", "check_calibration_input", "OBSERVER_PREFIX"]

OBSERVER_PREFIX = "fxqbn_observer_"


def check_calibration_input(where: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of fxqbn's observers: refuse non-float and NaN/infinite calibration values
    (observers would fail in their own code, or compute scale NaN) with ``where`` in the message."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        return
    if not x.is_floating_point():
        raise FxqbnError(f"{where} got a {x.dtype} tensor: calibrate with the float inputs the model takes")
    lo, hi = torch.aminmax(x.detach())  # one pass; NaN propagates into both
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise FxqbnError(
            f"{where} got NaN or infinite values (range [{lo.item()}, {hi.item()}]): "
            "check the calibration batches (and the BatchNorm statistics, for an output)"
        )


class _Observers:
    """Observer nodes added to one graph, with the value and dtype each one watches."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.graph = graph
        self.root = root
        self.modules: dict[str, nn.Module] = {}  # target -> new observer
        self.dtype_of: dict[str, torch.dtype] = {}  # observer node name -> dtype
        self.by_value: dict[tuple[str, torch.dtype], fx.Node] = {}  # (observed node name, dtype) -> observer node
        self._count = 0

    def add(self, value: fx.Node, match: Match, role: str) -> fx.Node:
        while hasattr(self.root, f"{OBSERVER_PREFIX}{self._count}"):
            self._count += 1
        target = f"{OBSERVER_PREFIX}{self._count}"
        self._count += 1
        observer = match.observer.factory()
        where = f"observer '{target}' ({role} of BatchNorm '{match.module}', node '{match.bn_node}')"
        observer.register_forward_pre_hook(functools.partial(check_calibration_input, where))
        self.modules[target] = observer
        with self.graph.inserting_after(value):
            node = self.graph.call_module(target, (value,))
        self.dtype_of[node.name] = match.observer.dtype
        self.by_value[(value.name, match.observer.dtype)] = node
        return node

    def for_input(self, bn: fx.Node, match: Match) -> fx.Node:
        """The observer on ``bn``'s input, shared when one with the same dtype exists."""
        value = bn.args[0]
        assert isinstance(value, fx.Node)
        dtype = match.observer.dtype
        if self.dtype_of.get(value.name) == dtype:
            return value  # already an observer: another pattern's output
        observer = self.by_value.get((value.name, dtype)) or self.add(value, match, "input")
        bn.replace_input_with(value, observer)
        return observer

    def for_output(self, out: fx.Node, match: Match) -> fx.Node:
        """An observer after the pattern's output, which every user of the output now reads."""
        observer = self.add(out, match, "output")
        out.replace_all_uses_with(observer, delete_user_cb=lambda user: user is not observer)
        return observer


def insert_observers(graph: fx.Graph, root: nn.Module, matches: Sequence[Match]) -> Observed:
    """Add observer nodes for ``matches`` (in graph order) to ``graph``, whose targets resolve in
    ``root``. Returns the matches with their observer ``Boundary`` and the new observer modules by
    target, for the GraphModule.
    """
    nodes = {node.name: node for node in graph.nodes}
    observers = _Observers(graph, root)
    observed = []
    for match in matches:
        bn = nodes[match.bn_node]
        input_observer = observers.for_input(bn, match)
        output_observer = observers.for_output(nodes[match.output_node], match)
        observed.append(replace(match, boundary=Boundary(input=input_observer.name, output=output_observer.name)))
    ensures(graph)
    return Observed(tuple(observed), observers.modules)


def adopt_observers(gm: fx.GraphModule) -> Prepared:
    """The observed BN patterns of a graph torch.ao's ``prepare_fx`` observed (each with its observer
    ``Boundary``), the BNs it did not observe (as skips), and its other observers (``Dropped``: on a
    conv, an add, ...; ``convert`` removes them with a word in the report). The graph is not edited."""
    matches, skips = find_patterns(gm.graph, gm, AO_OBSERVED)
    used = observer_users(matches)
    nodes = {node.name: node for node in gm.graph.nodes}
    dropped = tuple(
        Dropped(observer=name, observed=describe(nodes[name].args[0]))
        for name in observer_nodes(gm)
        if name not in used and isinstance(nodes[name].args[0], fx.Node)
    )
    return Prepared(patterns=tuple(matches), skips=tuple(skips), dropped=dropped)


def is_torch_ao_observed(gm: nn.Module) -> bool:
    """Whether ``gm`` is a GraphModule with observer or fake-quant call_module nodes."""
    return isinstance(gm, fx.GraphModule) and bool(observer_nodes(gm))
