"""Adding nodes to a graph that a pass is building, one call each.

``fx.Graph.create_node`` walks every argument with pytree, looking for raw SymInt/SymFloat/SymBool
values to warn about; a graph traced by ``torch.fx.symbolic_trace`` never holds one, and on 1,000
BNs the walk was a fifth of the rewrite. These create the node without arguments (no walk), then
give it its arguments through ``Node.args`` / ``Node.kwargs``, which record the users as
``create_node`` does. Same graph, same names, same insert point.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

__all__ = ["call_module", "copy_node"]


def call_module(graph: fx.Graph, target: str, args: tuple, name: str | None = None) -> fx.Node:
    """``graph.create_node("call_module", target, args, name=name)``."""
    node = graph.create_node("call_module", target, name=name)
    node.args = args
    return node


def copy_node(graph: fx.Graph, node: fx.Node, transform: Callable[[fx.Node], fx.Node]) -> fx.Node:
    """``graph.node_copy(node, transform)``: ``node`` with its argument nodes mapped by ``transform``,
    its name (unless taken), type and a shallow copy of its meta."""
    new = graph.create_node(node.op, node.target, name=node.name, type_expr=node.type)
    if node.args:
        new.args = fx.map_arg(node.args, transform)
    if node.kwargs:
        new.kwargs = fx.map_arg(node.kwargs, transform)
    new.meta.update(node.meta)  # a shallow copy, into the node's own empty dict (assigning one costs more)
    return new
