"""The BatchNorm patterns fxqbn quantizes, declared once, as data.

A rule is (BN kind, dim, activation). ``passes.spellings`` normalises every way a graph spells a
BatchNorm, an activation or a pass-through op; this module says which combinations are quantized:

* ``BN_KINDS``: the BN spellings a rule can name ("BatchNorm": the BatchNorm modules and
  SyncBatchNorm in eval, by its input's rank; "F.batch_norm": the functional and ATen forms;
  "BNReLU": torch.ao's fused float module, its ReLU inside);
* ``ACTIVATIONS``: what may follow the BN, as its float clamp (the spellings' ``(lo, hi)``);
* ``RULES``: the table, one entry per (kind, dim, activation): BatchNorm2d+ReLU6 is one entry. A new
  activation is an ``Activation`` (its float clamp), its entries here, and its kernel in
  ``fxqbn.backends.KERNELS``.

Tests are parametrised over ``RULES`` x ``fxqbn.backends.BACKENDS`` and pick new entries up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.ao.nn.intrinsic as nni
import torch.nn.functional as F
from torch import nn

from fxqbn import nn as qnn

__all__ = [
    "Activation", "Rule", "RULES", "ACTIVATIONS", "NO_ACTIVATION", "RELU", "RELU6", "BN_KINDS", "MODULE_KINDS",
    "MODULE_TARGETS", "RANK_TO_DIM", "rule_for", "find_rule", "activation_for",
]


@dataclass(frozen=True)
class Activation:
    """An activation fused after a BN: the float clamp it computes, ``lo <= y <= hi``."""

    name: str  # what the report appends to the pattern ("" for none), e.g. "ReLU6"
    lo: float = -math.inf
    hi: float = math.inf

    def __post_init__(self) -> None:
        if not self.lo <= self.hi or (self.name == "") != (self.lo == -math.inf and self.hi == math.inf):
            raise ValueError(f"activation {self.name!r}: clamp ({self.lo}, {self.hi}) is empty or misnamed")


NO_ACTIVATION = Activation("")  # bn(x)
RELU = Activation("ReLU", 0.0)  # nn.ReLU, F.relu(inplace=...), torch.relu(_), x.relu(_)(), aten.relu
RELU6 = Activation("ReLU6", 0.0, 6.0)  # nn.ReLU6, F.relu6, hardtanh(0, 6), clamp(0, 6) in any spelling
ACTIVATIONS: tuple[Activation, ...] = (NO_ACTIVATION, RELU, RELU6)

BN_KINDS = ("BatchNorm", "F.batch_norm", "BNReLU")

# Module types a "BatchNorm"/"BNReLU" rule stands for -> (kind, dim; None: the input's rank decides).
# Matched exactly: a subclass may compute something else.
MODULE_KINDS: dict[type, tuple[str, int | None]] = {
    nn.BatchNorm1d: ("BatchNorm", 1),
    nn.BatchNorm2d: ("BatchNorm", 2),
    nn.BatchNorm3d: ("BatchNorm", 3),
    nn.SyncBatchNorm: ("BatchNorm", None),  # what DDP training leaves; in eval it is a plain BN
    nni.BNReLU2d: ("BNReLU", 2),
    nni.BNReLU3d: ("BNReLU", 3),
}
MODULE_TARGETS = frozenset(MODULE_KINDS)  # modules the tracer keeps as one call_module node

# The input ranks each kernel dim takes, and back.
RANK_TO_DIM = {rank: dim for dim, ranks in qnn.RANKS.items() for rank in ranks}


@dataclass(frozen=True)
class Rule:
    """One quantizable pattern: a BN of ``kind`` and ``dim``, then ``activation`` (BNReLU: inside)."""

    kind: str  # one of BN_KINDS
    dim: int  # the kernel's spatial rank: 1, 2 or 3
    activation: Activation = NO_ACTIVATION

    def __post_init__(self) -> None:
        if self.kind not in BN_KINDS or self.dim not in qnn.RANKS:
            raise ValueError(f"rule ({self.kind!r}, {self.dim!r}): kind must be one of {BN_KINDS}, dim 1, 2 or 3")
        if self.prefused and self.activation != RELU:
            raise ValueError(f"rule {self.name}: torch.ao's BNReLU module holds a ReLU")

    @property
    def name(self) -> str:
        """What the report calls it, e.g. ``BatchNorm2d+ReLU6``, ``F.batch_norm1d``, ``BNReLU2d``."""
        if self.prefused:
            return f"BNReLU{self.dim}d"
        stem = f"F.batch_norm{self.dim}d" if self.kind == "F.batch_norm" else f"BatchNorm{self.dim}d"
        return stem + (f"+{self.activation.name}" if self.activation.name else "")

    @property
    def prefused(self) -> bool:
        """True for torch.ao's fused BN+ReLU modules: the ReLU is inside the module, not after it."""
        return self.kind == "BNReLU"

    @property
    def relu(self) -> bool:
        """True when the activation is exactly ReLU (what the ``_relu`` kernels compute)."""
        return self.activation == RELU


RULES: tuple[Rule, ...] = (
    Rule(kind="BatchNorm", dim=1, activation=NO_ACTIVATION),  # bn(x), x (N, C[, L])
    Rule(kind="BatchNorm", dim=1, activation=RELU),  # relu(bn(x)), through Identity / eval Dropout
    Rule(kind="BatchNorm", dim=1, activation=RELU6),  # relu6(bn(x)), hardtanh(bn(x), 0, 6), bn(x).clamp(0, 6)
    Rule(kind="BatchNorm", dim=2, activation=NO_ACTIVATION),  # x (N, C, H, W)
    Rule(kind="BatchNorm", dim=2, activation=RELU),
    Rule(kind="BatchNorm", dim=2, activation=RELU6),  # MobileNetV2's conv -> BN -> ReLU6
    Rule(kind="BatchNorm", dim=3, activation=NO_ACTIVATION),  # x (N, C, D, H, W)
    Rule(kind="BatchNorm", dim=3, activation=RELU),
    Rule(kind="BatchNorm", dim=3, activation=RELU6),
    Rule(kind="BNReLU", dim=2, activation=RELU),  # torch.ao's fused BN+ReLU module
    Rule(kind="BNReLU", dim=3, activation=RELU),
    Rule(kind="F.batch_norm", dim=1, activation=NO_ACTIVATION),  # F.batch_norm(x, m, v, ...), x (N, C[, L])
    Rule(kind="F.batch_norm", dim=1, activation=RELU),  # timm's BatchNormAct: F.batch_norm -> Identity -> act
    Rule(kind="F.batch_norm", dim=1, activation=RELU6),
    Rule(kind="F.batch_norm", dim=2, activation=NO_ACTIVATION),
    Rule(kind="F.batch_norm", dim=2, activation=RELU),
    Rule(kind="F.batch_norm", dim=2, activation=RELU6),
    Rule(kind="F.batch_norm", dim=3, activation=NO_ACTIVATION),
    Rule(kind="F.batch_norm", dim=3, activation=RELU),
    Rule(kind="F.batch_norm", dim=3, activation=RELU6),
)


def find_rule(kind: str, dim: int, activation: Activation, rules: tuple[Rule, ...] | None = None) -> Rule | None:
    """The rule for (kind, dim, activation) in ``rules`` (default ``RULES``); None when none."""
    for rule in RULES if rules is None else rules:
        if (rule.kind, rule.dim, rule.activation) == (kind, dim, activation):
            return rule
    return None


def activation_for(lo: float, hi: float, rules: tuple[Rule, ...] | None = None) -> Activation | None:
    """The activation some rule names for the float clamp (lo, hi); None when none does."""
    for rule in RULES if rules is None else rules:
        if (rule.activation.lo, rule.activation.hi) == (lo, hi) and rule.activation.name:
            return rule.activation
    return None


_TARGET_KINDS = {F.batch_norm: ("F.batch_norm", None), **MODULE_KINDS}


def rule_for(target: object, relu: bool, dim: int | None = None) -> Rule | None:
    """The rule for a BN target (module type or ``F.batch_norm``) with or without ReLU; ``dim``
    for targets whose type does not fix it. None when none."""
    kind, fixed = _TARGET_KINDS.get(target, (None, None))  # type: ignore[call-overload]
    dim = fixed if fixed is not None else dim
    if kind is None or dim is None:
        return None
    return find_rule(kind, dim, RELU if relu or kind == "BNReLU" else NO_ACTIVATION)
