"""Frozen records that flow one way through the passes.

Nodes are referred to by name, never held: ``copy.deepcopy`` of a GraphModule rebuilds
its nodes, and names are what survives.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxqbn.qconfig import ActivationSpec
from fxqbn.qparams import QParams

from .patterns import Rule

__all__ = ["Match", "Skip", "Observed", "Prepared", "Rewrite"]


@dataclass(frozen=True)
class Match:
    """A BN pattern the rules accept (matching never edits the graph)."""

    rule: Rule  # which pattern matched
    position: int  # the BN node's index in graph order, for the report
    bn_node: str  # name of the BatchNorm call_module node
    relu_node: str | None  # name of the fused ReLU node; None when not fused
    module: str  # qualified name of the BatchNorm module
    activation: ActivationSpec  # observer for the pattern's input and output
    note: str = ""  # why a ReLU after the BN was left unfused, when one was

    @property
    def output_node(self) -> str:
        """The node whose value the pattern produces: the ReLU when fused, else the BN."""
        return self.relu_node or self.bn_node


@dataclass(frozen=True)
class Skip:
    """A BatchNorm found in the graph and left float, with the reason (shown in the report)."""

    position: int  # the BN node's index in graph order
    node: str  # name of the BatchNorm node
    module: str  # qualified name of the BatchNorm module
    pattern: str  # e.g. "BatchNorm2d"
    reason: str  # why it stays float

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError(f"skip of {self.node} has no reason")


@dataclass(frozen=True)
class Observed:
    """A matched pattern with its observers in the graph."""

    match: Match
    input_observer: str  # name of the observer node (and submodule) on the pattern's input
    output_observer: str  # name of the observer node (and submodule) on the pattern's output


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` leaves in ``gm.meta`` for ``convert``."""

    patterns: tuple[Observed, ...]
    skips: tuple[Skip, ...]


@dataclass(frozen=True)
class Rewrite:
    """A pattern replaced by a quantized module."""

    observed: Observed
    qmodule: str  # qualified name of the installed quantized module
    input_qparams: QParams
    output_qparams: QParams
    op: str = ""  # the kernel the installed module runs, as the report names it
