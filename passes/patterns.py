"""The BatchNorm patterns fxqbn quantizes, declared once, as data.

Adding a pattern (BatchNorm1d, BN+ReLU6, ...) is one entry in ``RULES``; tests are
parametrised over the table and pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.nn.intrinsic as nni
import torch.nn.functional as F
from torch import fx, nn

from fxqbn import nn as qnn
from fxqbn.qops import BN_OP_NAMES

__all__ = ["Rule", "RULES", "RANK_TO_DIM", "RELU_SPELLINGS", "MODULE_TARGETS", "rule_for", "relu_input"]


@dataclass(frozen=True)
class Rule:
    """One quantizable pattern.

    name: what the report calls it, e.g. ``BatchNorm2d+ReLU``.
    target: what the BN node calls: a BatchNorm module type (matched exactly, not subclasses)
        or ``F.batch_norm`` (whose statistics must be module attributes).
    relu: True when a ReLU that is the BN output's only user is fused into the kernel.
    qmodule: the ``fxqbn.nn`` module that replaces the pattern; its dim picks the kernel.
    """

    name: str
    target: object
    relu: bool
    qmodule: type

    def __post_init__(self) -> None:
        module_rule = isinstance(self.target, type)
        replaces = (self.qmodule._FLOAT_MODULE, self.qmodule._FUSED_MODULE)
        if self.qmodule._RELU != self.relu or (module_rule and self.target not in replaces):
            raise TypeError(f"rule {self.name}: {self.qmodule.__name__} does not compute {self.name}")

    @property
    def prefused(self) -> bool:
        """True for torch.ao's fused BN+ReLU modules: the ReLU is inside the module, not after it."""
        return self.target is self.qmodule._FUSED_MODULE

    @property
    def dim(self) -> int:
        return self.qmodule._DIM

    @property
    def op(self) -> str:
        """The quantized kernel the replacement calls, e.g. ``quantized::batch_norm2d_relu``."""
        return BN_OP_NAMES[(self.dim, self.relu)]


RULES: tuple[Rule, ...] = (
    Rule(name="BatchNorm1d", target=nn.BatchNorm1d, relu=False, qmodule=qnn.BatchNorm1d),  # bn(x), x (N, C[, L])
    Rule(name="BatchNorm1d+ReLU", target=nn.BatchNorm1d, relu=True, qmodule=qnn.BNReLU1d),  # relu(bn(x))
    Rule(name="BatchNorm2d", target=nn.BatchNorm2d, relu=False, qmodule=qnn.BatchNorm2d),  # bn(x)
    Rule(name="BatchNorm2d+ReLU", target=nn.BatchNorm2d, relu=True, qmodule=qnn.BNReLU2d),  # relu(bn(x))
    Rule(name="BatchNorm3d", target=nn.BatchNorm3d, relu=False, qmodule=qnn.BatchNorm3d),  # bn(x)
    Rule(name="BatchNorm3d+ReLU", target=nn.BatchNorm3d, relu=True, qmodule=qnn.BNReLU3d),  # relu(bn(x))
    Rule(name="BNReLU2d", target=nni.BNReLU2d, relu=True, qmodule=qnn.BNReLU2d),  # torch.ao's fused BN+ReLU module
    Rule(name="BNReLU3d", target=nni.BNReLU3d, relu=True, qmodule=qnn.BNReLU3d),  # torch.ao's fused BN+ReLU module
    Rule(name="F.batch_norm1d", target=F.batch_norm, relu=False, qmodule=qnn.BatchNorm1d),  # F.batch_norm(x, m, v, ...), x (N, C[, L])
    Rule(name="F.batch_norm1d+ReLU", target=F.batch_norm, relu=True, qmodule=qnn.BNReLU1d),  # relu(F.batch_norm(x, ...))
    Rule(name="F.batch_norm2d", target=F.batch_norm, relu=False, qmodule=qnn.BatchNorm2d),  # x (N, C, H, W)
    Rule(name="F.batch_norm2d+ReLU", target=F.batch_norm, relu=True, qmodule=qnn.BNReLU2d),
    Rule(name="F.batch_norm3d", target=F.batch_norm, relu=False, qmodule=qnn.BatchNorm3d),  # x (N, C, D, H, W)
    Rule(name="F.batch_norm3d+ReLU", target=F.batch_norm, relu=True, qmodule=qnn.BNReLU3d),
)

# Module types some rule replaces.
MODULE_TARGETS = frozenset(rule.target for rule in RULES if isinstance(rule.target, type))

# The input ranks each kernel dim takes.
RANK_TO_DIM = {rank: dim for dim, ranks in qnn.RANKS.items() for rank in ranks}


def rule_for(target: object, relu: bool, dim: int | None = None) -> Rule | None:
    """The rule for a BN target with or without a fused ReLU (functional BN: also its dim); None when none."""
    for rule in RULES:
        if rule.target is target and rule.relu == relu and (dim is None or rule.dim == dim):
            return rule
    return None


# Every way a traced graph spells ReLU, as (node.op, target); call_module targets match by type.
RELU_SPELLINGS: tuple[tuple[str, object], ...] = (
    ("call_module", nn.ReLU),  # self.relu = nn.ReLU(inplace=...); self.relu(x)
    ("call_function", F.relu),  # F.relu(x), F.relu(x, inplace=True)
    ("call_function", torch.relu),  # torch.relu(x)
    ("call_function", torch.relu_),  # torch.relu_(x)
    ("call_method", "relu"),  # x.relu()
    ("call_method", "relu_"),  # x.relu_()
)


def relu_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor ``node`` applies ReLU to, whatever the spelling; None when ``node`` is no ReLU."""
    if node.op == "call_module":
        target: object = type(modules.get(node.target))  # type: ignore[arg-type]
    else:
        target = node.target
    if (node.op, target) not in RELU_SPELLINGS:
        return None
    extra = set(node.kwargs) - {"inplace", "input"}
    arg = node.args[0] if node.args else node.kwargs.get("input")
    if extra or len(node.args) > 2 or not isinstance(arg, fx.Node):
        return None
    return arg
