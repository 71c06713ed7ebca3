"""Adopt a graph observed by torch.ao's ``prepare_fx``: find its observed BN patterns.

torch.ao leaves the same shape fxqbn's own ``observe`` pass leaves: an observer node feeding each
BN (or fused BNReLU module) and one observer node that every reader of the pattern's output reads.
Those become ``Observed`` records; every other observer (on a conv, an add, ...) is listed, so
that ``convert`` removes it with a word in the report. The graph is not edited here.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx, nn
from torch.ao.quantization import ObserverBase
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from fxqbn.qconfig import ActivationSpec
from fxqbn.qparams import DTYPE_RANGES

from .graph_facts import describe
from .match import find_patterns
from .records import Dropped, Observed, Prepared, Skip, observer_users

__all__ = ["is_torch_ao_observed", "adopt_observers", "observer_nodes"]

_OBSERVERS = (ObserverBase, FakeQuantizeBase)


def observer_nodes(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The observer and fake-quant modules that ``gm``'s call_module nodes call, by node name, in graph order."""
    modules = dict(gm.named_modules(remove_duplicate=False))  # torch.ao shares one observer between names
    return {
        node.name: modules[node.target]
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(modules.get(node.target), _OBSERVERS)
    }


def is_torch_ao_observed(gm: nn.Module) -> bool:
    """Whether ``gm`` is a GraphModule with observer or fake-quant call_module nodes."""
    return isinstance(gm, fx.GraphModule) and bool(observer_nodes(gm))


class _ObservedEverywhere:
    """Stands in for a qconfig: every BN is a candidate; its observers decide later."""

    def spec_for(self, module_name: str, object_type: object, first_component: object = None) -> ActivationSpec:
        return ActivationSpec(factory=nn.Identity, dtype=torch.quint8)


def adopt_observers(gm: fx.GraphModule) -> Prepared:
    """The observed BN patterns of a torch.ao-prepared graph, the BNs it did not observe (as
    skips), and the other observers (as ``Dropped``)."""
    observers = observer_nodes(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    # Calibration already happened: a BN left in training mode is refused by convert, naming it.
    matches, skips = find_patterns(gm.graph, gm, _ObservedEverywhere(), refuse_training=False)  # type: ignore[arg-type]
    patterns: list[Observed] = []
    for match in matches:
        bn, out = nodes[match.bn_node], nodes[match.output_node]
        in_obs = bn.args[0]
        users = list(out.users)
        out_obs = users[0] if len(users) == 1 else None
        reason = ""
        if not (isinstance(in_obs, fx.Node) and in_obs.name in observers):
            reason = "torch.ao put no observer on its input"
        elif out_obs is None or out_obs.name not in observers:
            reason = "torch.ao put no observer on its output"
        else:
            dtypes = {getattr(observers[in_obs.name], "dtype", None), getattr(observers[out_obs.name], "dtype", None)}
            if len(dtypes) != 1 or not dtypes <= set(DTYPE_RANGES):
                reason = f"torch.ao observes it as {', '.join(sorted(map(str, dtypes)))}; the kernel takes quint8 or qint8"
        if reason:
            skips.append(Skip(match.position, match.bn_node, match.module, match.rule.name, reason, match.source))
            continue
        observer = observers[out_obs.name]
        match = replace(match, activation=ActivationSpec(factory=type(observer), dtype=observer.dtype))
        patterns.append(Observed(match, in_obs.name, out_obs.name))
    used = observer_users(patterns)
    dropped = tuple(
        Dropped(observer=name, observed=describe(nodes[name].args[0]))
        for name in observers
        if name not in used and isinstance(nodes[name].args[0], fx.Node)
    )
    return Prepared(patterns=tuple(patterns), skips=tuple(sorted(skips, key=lambda s: s.position)), dropped=dropped)
