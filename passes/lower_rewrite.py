"""Rewriting for ``fxqbn.lower``: each ``LowerMatch`` becomes one int8 BN node.

Before (PT2E; torch.ao graphs read the same with quantized tensors)::

    dq = dequantize_per_tensor(codes, s_in, z_in, 0, 255, torch.uint8)
    bn = aten.batch_norm(dq, w, b, mean, var, False, 0.1, 1e-5, False)
    relu = aten.relu_(bn)
    q = quantize_per_tensor(relu, s_out, z_out, 0, 255, torch.uint8)
    y = dequantize_per_tensor(q, s_out, z_out, 0, 255, torch.uint8)

After::

    q = fxqbn_lowered_batch_norm(codes)   # codes in, the quantize's codes out
    y = dequantize_per_tensor(q, s_out, z_out, 0, 255, torch.uint8)

The dequantize stays where something else still reads it; statistics and qparams attributes
nothing reads any more are removed. The caller builds the modules (``fxqbn.lower``): rewriting
decides nothing about what matches or what kernel runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from .lower import LowerMatch
from .new_modules import NewModules

__all__ = ["LOWERED_PREFIX", "rewrite_lowerable"]

LOWERED_PREFIX = "fxqbn_lowered_"  # the installed int8 BN modules: fxqbn_lowered_<BN node name>


def _erase_unused_attrs(graph: fx.Graph, root: nn.Module, candidates: list[fx.Node]) -> None:
    """Erase get_attr nodes nothing reads; drop their attribute when no other node names it
    (another get_attr of it, or a call of a module that owns it)."""
    unused = [node for node in candidates if node.op == "get_attr" and not node.users]
    for node in unused:
        graph.erase_node(node)
    read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for target in dict.fromkeys(str(node.target) for node in unused):
        parent, _, leaf = target.rpartition(".")
        owners = {".".join(target.split(".")[:k]) for k in range(1, target.count(".") + 1)}
        if target in read or owners & called:
            continue
        owner = root.get_submodule(parent)
        if hasattr(owner, leaf):
            delattr(owner, leaf)


def _rewrite_one(graph: fx.Graph, nodes: dict[str, fx.Node], match: LowerMatch, target: str) -> list[fx.Node]:
    """Install ``target`` in place of one pattern; returns the attribute nodes it may have orphaned."""
    dequantize, quantize, output = nodes[match.dequantize], nodes[match.quantize], nodes[match.output]
    with graph.inserting_before(quantize):
        lowered = graph.create_node("call_module", target, (dequantize.args[0],))  # the module is added later
    lowered.meta.update({k: v for k, v in output.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
    output.replace_all_uses_with(lowered)
    orphans = [arg for name in match.nodes for arg in nodes[name].all_input_nodes if arg.op == "get_attr"]
    for name in match.nodes:
        graph.erase_node(nodes[name])
    if not dequantize.users:
        orphans += [arg for arg in dequantize.all_input_nodes if arg.op == "get_attr"]
        graph.erase_node(dequantize)
    return orphans


def rewrite_lowerable(
    graph: fx.Graph, root: nn.Module, matches: Sequence[LowerMatch], modules: Sequence[nn.Module]
) -> dict[str, nn.Module]:
    """Replace each match (in graph order) by a call of its module, in ``graph`` of ``root``.

    Returns the new modules by target; the caller adds them to the GraphModule. Attributes of
    ``root`` that only the removed nodes read are deleted from it (pass a copy).
    """
    nodes = {node.name: node for node in graph.nodes}
    new = NewModules(root)
    orphans: list[fx.Node] = []
    for match, module in zip(matches, modules, strict=True):
        orphans += _rewrite_one(graph, nodes, match, new.named(LOWERED_PREFIX + match.bn.node, module))
    _erase_unused_attrs(graph, root, list(dict.fromkeys(orphans)))
    return new.modules
