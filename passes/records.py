"""Frozen records that flow one way through the passes.

Nodes are referred to by name, never held: ``copy.deepcopy`` of a GraphModule rebuilds
its nodes, and names are what survives.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxqbn.backends import BACKENDS
from fxqbn.qconfig import ActivationSpec
from fxqbn.qparams import Observation

from .patterns import Rule

__all__ = ["FunctionalBn", "Match", "Skip", "Observed", "Dropped", "Prepared", "Rewrite"]


@dataclass(frozen=True)
class FunctionalBn:
    """The tensors of an ``F.batch_norm`` call, as attribute targets of the GraphModule."""

    running_mean: str
    running_var: str
    weight: str | None  # None: no affine weight (ones)
    bias: str | None  # None: no affine bias (zeros)
    eps: float
    momentum: float | None


@dataclass(frozen=True)
class Match:
    """A BN pattern the rules accept (matching never edits the graph)."""

    rule: Rule  # which pattern matched
    position: int  # the BN node's index in graph order, for the report
    bn_node: str  # name of the BatchNorm node (call_module, or call_function F.batch_norm)
    input_node: str  # name of the node the BN normalises
    relu_node: str | None  # name of the fused ReLU node; None when not fused
    module: str  # qualified name of the BatchNorm module (functional: of the statistics' owner)
    activation: ActivationSpec  # observer for the pattern's input and output
    source: str = ""  # "file.py:123" of the BN call in the user's code ("" when unknown)
    note: str = ""  # why a ReLU after the BN was left unfused, when one was
    functional: FunctionalBn | None = None  # set for F.batch_norm; None for a BatchNorm module

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

    @property
    def op(self) -> str:
        """The kernel the installed module runs, as the report names it."""
        return BACKENDS[self.backend].op_for(self.observed.match.rule)
