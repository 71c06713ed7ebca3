"""Frozen records that flow one way through the passes.

Nodes are referred to by name, never held: ``copy.deepcopy`` of a GraphModule rebuilds
its nodes, and names are what survives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import fx

from fxqbn.qconfig import ActivationSpec
from fxqbn.qparams import Observation

from .patterns import Rule
from .spellings import BnCall

__all__ = ["Match", "Skip", "Observed", "Dropped", "Prepared", "Rewrite", "Converted", "observer_users"]


@dataclass(frozen=True)
class Match:
    """A BN pattern the rules accept (matching never edits the graph)."""

    rule: Rule  # which pattern matched
    position: int  # the BN node's index in graph order, for the report
    bn: BnCall  # the BN, normalised: node, input, statistics (attribute targets), eps
    chain: tuple[str, ...]  # nodes fused after the BN output, in order: pass-throughs, then the activation
    module: str  # qualified name of the BatchNorm module (functional: of the statistics' owner)
    activation: ActivationSpec  # observer for the pattern's input and output
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
    def bn_module(self) -> str | None:
        """Qualified name of the BatchNorm module itself (inside torch.ao's BNReLU too); None for a functional BN."""
        return None if self.rule.kind == "F.batch_norm" else self.bn.running_mean.rpartition(".")[0]


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
class Observed:
    """A matched pattern with its observers in the graph."""

    match: Match
    input_observer: str  # name of the observer node (and submodule) on the pattern's input
    output_observer: str  # name of the observer node (and submodule) on the pattern's output


def observer_users(patterns: Iterable[Observed]) -> dict[str, list[str]]:
    """Each observer node the patterns read (input or output) -> the BN modules of the patterns using
    it, in pattern order (an output observer is the next pattern's input observer too)."""
    users: dict[str, list[str]] = {}
    for pattern in patterns:
        for name in (pattern.input_observer, pattern.output_observer):
            users.setdefault(name, []).append(pattern.match.module)
    return users


@dataclass(frozen=True)
class Dropped:
    """An observer that belongs to no BN pattern (e.g. torch.ao's on a conv): removed, left float."""

    observer: str  # name of the observer node
    observed: str  # what it observed: "conv1 (call_module conv1)"


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` leaves in ``gm.meta`` for ``convert`` (or what adopting a torch.ao graph finds)."""

    patterns: tuple[Observed, ...]
    skips: tuple[Skip, ...]
    dropped: tuple[Dropped, ...] = ()  # observers convert removes without converting anything


@dataclass(frozen=True)
class Rewrite:
    """A pattern replaced by a quantized module."""

    observed: Observed
    qmodule: str  # qualified name of the installed quantized module
    input: Observation  # of the pattern's input observer
    output: Observation  # of the pattern's output observer
    backend: str = "native"  # the fxqbn.backends record that built it
    op: str = ""  # the kernel the installed module runs, as the report names it


@dataclass(frozen=True)
class Converted:
    """What ``rewrite_patterns`` did to a graph: the rewrites and the boundaries it added (nodes, and
    FloatIO modules holding a quantize and a dequantize each)."""

    rewrites: tuple[Rewrite, ...]
    quantize_nodes: tuple[str, ...]  # float -> quantized boundary nodes
    dequantize_nodes: tuple[str, ...]  # quantized -> float boundary nodes
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
