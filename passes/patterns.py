"""The BatchNorm patterns fxqbn quantizes, declared once, as data.

Adding a pattern (BatchNorm1d, BN+ReLU6, ...) is one entry in ``RULES``; tests are
parametrised over the table and pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxqbn import nn as qnn
from fxqbn.qops import BN_OP_NAMES

__all__ = ["Rule", "RULES", "RELU_SPELLINGS", "rule_for", "relu_input"]


@dataclass(frozen=True)
class Rule:
    """One quantizable pattern.

    name: what the report calls it, e.g. ``BatchNorm2d+ReLU``.
    bn_type: the float BatchNorm module type matched (exactly, not subclasses).
    relu: True when a ReLU that is the BN output's only user is fused into the kernel.
    qmodule: the ``fxqbn.nn`` module that replaces the pattern.
    """

    name: str
    bn_type: type
    relu: bool
    qmodule: type

    def __post_init__(self) -> None:
        if self.qmodule._RELU != self.relu or self.qmodule._FLOAT_MODULE is not self.bn_type:
            raise TypeError(f"rule {self.name}: {self.qmodule.__name__} does not compute {self.name}")

    @property
    def op(self) -> str:
        """The quantized kernel the replacement calls, e.g. ``quantized::batch_norm2d_relu``."""
        return BN_OP_NAMES[(self.qmodule._DIM, self.relu)]


RULES: tuple[Rule, ...] = (
    Rule(name="BatchNorm2d", bn_type=nn.BatchNorm2d, relu=False, qmodule=qnn.BatchNorm2d),  # bn(x)
    Rule(name="BatchNorm2d+ReLU", bn_type=nn.BatchNorm2d, relu=True, qmodule=qnn.BNReLU2d),  # relu(bn(x))
    Rule(name="BatchNorm3d", bn_type=nn.BatchNorm3d, relu=False, qmodule=qnn.BatchNorm3d),  # bn(x)
    Rule(name="BatchNorm3d+ReLU", bn_type=nn.BatchNorm3d, relu=True, qmodule=qnn.BNReLU3d),  # relu(bn(x))
)

_RULES_BY_KEY = {(rule.bn_type, rule.relu): rule for rule in RULES}


def rule_for(bn_type: type, relu: bool) -> Rule | None:
    """The rule for a BN module type with or without a fused ReLU; None when there is none."""
    return _RULES_BY_KEY.get((bn_type, relu))


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
