"""Frozen records that flow one way through the passes: graph -> ``Match`` / ``Skip`` -> ``Plan`` ->
``Rewrite`` -> report rows.

Nodes are referred to by name, never held: ``copy.deepcopy`` of a GraphModule rebuilds
its nodes, and names are what survives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from torch import fx

from fxqbn.qconfig import ActivationSpec
from fxqbn.qparams import Observation, QParams

from .reading import BnCall
from .registry import Activation, Rule

__all__ = [
    "FLOAT", "QUANTIZED", "CODES", "Boundary", "Match", "Skip", "Folded", "Dropped", "Prepared", "Plan", "Rewrite", "Converted",
    "observer_users", "Found", "Observed", "Rewritten",
]

# What a graph holds at a BN pattern's edges.
FLOAT = "float"  # observed graphs: float values, observers on them; int8 code exists only between the boundaries fxqbn adds
QUANTIZED = "quantized"  # torch.ao convert_fx graphs: quint8/qint8 tensors, dequantized for the float BN
CODES = "codes"  # torchao convert_pt2e graphs: plain uint8/int8 codes, dequantized for the float BN


@dataclass(frozen=True)
class Boundary:
    """Where a matched BN pattern meets the rest of its graph: the one thing that differs between the
    kinds of graph (``passes.boundaries``). Observed graphs mark a pattern's edges with observers, int8
    graphs with a dequantize before it and a quantize after it."""

    input: str  # the node the BN reads: an observer (its argument is the float value) or a dequantize (its argument is int8)
    output: str  # the node whose readers get the pattern's value: an observer, or the quantize (or the last op absorbed after it)
    holds: str = FLOAT  # FLOAT, QUANTIZED or CODES
    between: tuple[str, ...] = ()  # int8 graphs: the quantize and the ops after it that the int8 BN replaces
    input_qparams: QParams | None = None  # int8 graphs: as the graph shows them (None: observed, or known at run time only)
    output_qparams: QParams | None = None
    codes: tuple[int, int] | None = None  # int8 graphs: the output codes the quantize and the activation allow
    clamp: tuple[float, float] | None = None  # int8 graphs: the activation's float clamp, fused before or after the quantize

    def __post_init__(self) -> None:
        if self.holds not in (FLOAT, QUANTIZED, CODES):
            raise ValueError(f"boundary holds {self.holds!r}: one of {FLOAT!r}, {QUANTIZED!r}, {CODES!r}")
        if (self.holds == FLOAT) != (self.output_qparams is None):
            raise ValueError("an int8 graph's boundary shows its output qparams; an observed graph's observers give them")


@dataclass(frozen=True)
class Match:
    """A BN pattern the rules accept (matching never edits the graph)."""

    position: int  # the BN node's index in graph order, for the report
    bn: BnCall  # the BN, normalised: node, input, statistics (attribute targets), eps
    pattern: str  # what the report calls it, e.g. "BatchNorm2d+ReLU" (a rule's name) or "aten.batch_norm+ReLU6"
    dim: int | None  # the kernel dim; None: picked by the input's rank at run time
    activation: Activation  # what the pattern computes after the BN (a rule's, or any constant clamp in int8 graphs)
    chain: tuple[str, ...]  # nodes fused after the BN output, in order: pass-throughs, then the activation
    module: str  # qualified name of the BatchNorm module (functional: of the statistics' owner)
    rule: Rule | None = None  # observed graphs: the rule that matched
    boundary: Boundary | None = None  # None until fxqbn.prepare puts observers around the pattern
    observer: ActivationSpec | None = None  # observed graphs: the observer for the pattern's input and output
    momentum: float | None = None  # the BN's, kept on the quantized module
    source: str = ""  # "file.py:123" of the BN call in the user's code ("" when unknown)
    note: str = ""  # why an activation after the BN was left unfused, when one was

    @property
    def bn_node(self) -> str:
        """Name of the BatchNorm node (call_module, or the functional / ATen call)."""
        return self.bn.node

    @property
    def input_node(self) -> str:
        """Name of the node the BN normalises."""
        return self.bn.input

    @property
    def output_node(self) -> str:
        """The node whose value the pattern produces: the last fused node, else the BN's output."""
        return self.chain[-1] if self.chain else self.bn.output

    @property
    def nodes(self) -> tuple[str, ...]:
        """The pattern's own nodes, in graph order: the BN, its getitem 0, the fused chain."""
        return (self.bn.node, *((self.bn.output,) if self.bn.output != self.bn.node else ()), *self.chain)


@dataclass(frozen=True)
class Skip:
    """A BatchNorm found in the graph and left float, with the reason (shown in the report)."""

    position: int  # the BN node's index in graph order
    node: str  # name of the BatchNorm node
    module: str  # qualified name of the BatchNorm module
    pattern: str  # e.g. "BatchNorm2d"
    reason: str  # why it stays float
    source: str = ""  # "file.py:123" of the BN call in the user's code ("" when unknown)

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError(f"skip of {self.node} has no reason")


@dataclass(frozen=True)
class Folded:
    """A BatchNorm folded into (a copy of) the conv / linear that feeds it (``passes.fold``): gone from the graph."""

    position: int  # the BN node's index in graph order (of the graph before the fold)
    node: str  # name of the BatchNorm node
    module: str  # qualified name of the BatchNorm module
    pattern: str  # the BN's spelling, e.g. "BatchNorm2d" (an activation after it stays float)
    into: str  # what it was folded into, as the report says it: "conv1" (and what stays float after it)
    source: str = ""  # "file.py:123" of the BN call in the user's code ("" when unknown)


def observer_users(patterns: Iterable[Match]) -> dict[str, list[str]]:
    """Each observer node the patterns read (input or output) -> the BN modules of the patterns using
    it, in pattern order (an output observer is the next pattern's input observer too)."""
    users: dict[str, list[str]] = {}
    for pattern in patterns:
        for name in (pattern.boundary.input, pattern.boundary.output):
            users.setdefault(name, []).append(pattern.module)
    return users


@dataclass(frozen=True)
class Dropped:
    """An observer that belongs to no BN pattern (e.g. torch.ao's on a conv): removed, left float."""

    observer: str  # name of the observer node
    observed: str  # what it observed: "conv1 (call_module conv1)"


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` leaves in ``gm.meta`` for ``convert`` (or what adopting a torch.ao graph finds)."""

    patterns: tuple[Match, ...]  # each with its observer boundary
    skips: tuple[Skip, ...]
    dropped: tuple[Dropped, ...] = ()  # observers convert removes without converting anything
    folded: tuple[Folded, ...] = ()  # BNs fxqbn.prepare folded into the conv before them


@dataclass(frozen=True)
class Plan:
    """How one match becomes an int8 BN: its qparams, its kernel, the op the report names."""

    match: Match
    input: Observation | None  # None: a torch.ao tensor's, read off the tensor at run time
    output: Observation
    relu: bool  # the kernel's ReLU variant (a clamp at the output zero point)
    clamp: tuple[float, float] | None  # float bounds of a clamp after the kernel, or None
    op: str  # the kernel the module runs, as the report names it


@dataclass(frozen=True)
class Rewrite:
    """A pattern replaced by an int8 BN module."""

    plan: Plan
    qmodule: str  # qualified name of the installed int8 BN module
    backend: str  # the fxqbn.backends record that built it

    @property
    def match(self) -> Match:
        return self.plan.match


@dataclass(frozen=True)
class Converted:
    """What ``rewrite`` did to a graph: the rewrites and the boundaries it added (nodes, and FloatIO
    modules holding a quantize and a dequantize each)."""

    rewrites: tuple[Rewrite, ...]
    quantize_nodes: tuple[str, ...] = ()  # float -> quantized boundary nodes
    dequantize_nodes: tuple[str, ...] = ()  # quantized -> float boundary nodes
    float_io: tuple[str, ...] = ()  # targets of the FloatIO modules (their .quantize and .dequantize are boundaries)

    def boundary_counts(self) -> tuple[int, int]:
        """(quantize, dequantize) boundaries inserted, in nodes or inside FloatIO modules."""
        return len(self.quantize_nodes) + len(self.float_io), len(self.dequantize_nodes) + len(self.float_io)

    def boundary_targets(self, graph: fx.Graph) -> list[str]:
        """The targets of every boundary module in ``graph`` (the converted one), in graph order."""
        nodes = {*self.quantize_nodes, *self.dequantize_nodes}
        ios = set(self.float_io)
        targets = []
        for node in graph.nodes:
            if node.name in nodes:
                targets.append(str(node.target))
            elif node.op == "call_module" and node.target in ios:
                targets += [f"{node.target}.quantize", f"{node.target}.dequantize"]
        return targets


# What each pass returns (named, and unpackable as the tuples they are).


class Found(NamedTuple):
    """``match.find_patterns``: every BN of a graph, matched or skipped, each in graph order."""

    matches: list[Match]
    skips: list[Skip]


class Observed(NamedTuple):
    """``observe.insert_observers``: the matches with their observer boundaries, the observers by target."""

    patterns: tuple[Match, ...]
    modules: dict


class Rewritten(NamedTuple):
    """``rewrite.rewrite_patterns``: the new graph, what it did, the modules it needs beyond the root's."""

    graph: fx.Graph
    converted: Converted
    modules: dict
