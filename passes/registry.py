"""What fxqbn quantizes, declared once, as data: every BatchNorm spelling, every activation, every
pass-through, and the rules they make.

* ``BN_SPELLINGS``: one entry per way a graph spells a BatchNorm (module types, matched exactly;
  ``F.batch_norm``; the ATen forms torch.export leaves), each with its rule family (``kind``), its
  kernel dim (or None: the input's rank decides), the activation inside it (torch.ao's ``BNReLU``)
  and its reader (``passes.reading``: the statistics as attribute targets, or why not). Already int8
  BNs (torch.ao's quantized modules) are entries too, whose reader says so, so that every BN of a
  graph gets a report row.
* ``ACTIVATIONS``: what may follow a BN, as its float clamp ``lo <= y <= hi`` and the spellings that
  mean exactly it; its code-space computation (the kernel's ReLU variant, a clamp of the codes) is
  derived from the clamp. Constant ``hardtanh``/``clamp`` calls (``CLAMP_SPELLINGS``) name whichever
  activation has their bounds.
* ``PASSTHROUGH_SPELLINGS``: what may sit between a BN and its activation (Identity, eval Dropout).
* ``RULES``: every (BN kind, dim, activation) the kernels quantize, derived from the two tables: a
  new activation or BN kind is one entry above.

Matching and the tracer read these tables; tests are parametrised over them, entry by entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import fx, nn

from . import reading

__all__ = [
    "Activation", "BnSpelling", "Rule", "NO_ACTIVATION", "RELU", "RELU6", "ACTIVATIONS", "BN_SPELLINGS",
    "CLAMP_SPELLINGS", "PASSTHROUGH_SPELLINGS", "RULES", "RANKS", "RANK_TO_DIM", "module_targets", "derive_rules",
    "find_rule", "activation_for", "activation_name", "spelling_of", "bn_spelling", "read_bn", "read_activation",
    "passthrough_input", "activation_spellings",
]

aten = torch.ops.aten

RANKS = {1: (2, 3), 2: (4,), 3: (5,)}  # kernel dim -> the input ranks it takes
RANK_TO_DIM = {rank: dim for dim, ranks in RANKS.items() for rank in ranks}


# -- activations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """An activation fused after a BN: the float clamp it computes, ``lo <= y <= hi``, and the
    spellings ((node.op, target); modules by exact type) that mean exactly it."""

    name: str  # what the report appends to the pattern ("" for none), e.g. "ReLU6"
    lo: float = -math.inf
    hi: float = math.inf
    spellings: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if not self.lo <= self.hi or (self.name == "") != (self.lo == -math.inf and self.hi == math.inf):
            raise ValueError(f"activation {self.name!r}: clamp ({self.lo}, {self.hi}) is empty or misnamed")

    def __reduce__(self) -> tuple:
        """Pickled (with the records that hold it) by its clamp: its spellings name ops that do not pickle."""
        return _activation_of, (self.name, self.lo, self.hi)

    @property
    def relu(self) -> bool:
        """In code space: the kernel's ReLU variant (a clamp at the output zero point) computes the lower bound."""
        return self.lo == 0.0

    @property
    def clamp(self) -> bool:
        """In code space: a clamp of the codes to the float bounds follows the kernel (ReLU6's 6, any other bound)."""
        return self.hi != math.inf or self.lo not in (0.0, -math.inf)


def _activation_of(name: str, lo: float, hi: float) -> Activation:
    """The table's activation of that name and clamp (an unpickled record's), else one without spellings."""
    found = next((a for a in ACTIVATIONS if (a.name, a.lo, a.hi) == (name, lo, hi)), None)
    return found or Activation(name, lo, hi)


NO_ACTIVATION = Activation("")  # bn(x)
RELU = Activation("ReLU", 0.0, spellings=(
    ("call_module", nn.ReLU), ("call_function", F.relu), ("call_function", torch.relu), ("call_function", torch.relu_),
    ("call_method", "relu"), ("call_method", "relu_"), ("call_function", aten.relu.default), ("call_function", aten.relu_.default),
))
RELU6 = Activation("ReLU6", 0.0, 6.0, spellings=(
    ("call_module", nn.ReLU6), ("call_module", nnq.ReLU6),  # nnq.ReLU6: what torch.ao's convert_fx makes of nn.ReLU6
    ("call_function", F.relu6), ("call_function", aten.relu6.default),
))
ACTIVATIONS: tuple[Activation, ...] = (NO_ACTIVATION, RELU, RELU6)

# Constant clamps in any spelling: they mean the activation with their bounds (hardtanh(0, 6) is ReLU6),
# or an unnamed clamp, which whole-model int8 graphs can still lower in code space.
CLAMP_SPELLINGS: tuple[tuple[str, object, Callable], ...] = (
    ("call_module", nn.Hardtanh, reading.hardtanh_module),  # nn.Hardtanh(0, 6)
    ("call_function", F.hardtanh, reading.hardtanh_args),  # F.hardtanh(x, 0.0, 6.0): what export makes of relu6
    ("call_function", F.hardtanh_, reading.hardtanh_args),
    ("call_function", aten.hardtanh.default, reading.hardtanh_args),
    ("call_function", aten.hardtanh_.default, reading.hardtanh_args),
    ("call_function", torch.clamp, reading.clamp_args),  # torch.clamp(x, 0, 6)
    ("call_method", "clamp", reading.clamp_args),  # x.clamp(0, 6)
    ("call_method", "clamp_", reading.clamp_args),
    ("call_function", aten.clamp.default, reading.clamp_args),
    ("call_function", aten.clamp_.default, reading.clamp_args),
)


def activation_name(lo: float, hi: float) -> str:
    """What the report calls the float clamp (lo, hi): the activation's name, or ``clamp(lo, hi)``."""
    found = activation_for(lo, hi)
    return found.name if found is not None and found.name else f"clamp({lo:g}, {hi:g})"


def activation_for(lo: float, hi: float, activations: tuple[Activation, ...] | None = None) -> Activation | None:
    """The named activation whose clamp is (lo, hi); None when none is."""
    for activation in ACTIVATIONS if activations is None else activations:
        if (activation.lo, activation.hi) == (lo, hi) and activation.name:
            return activation
    return None


# -- pass-throughs ---------------------------------------------------------------------------------

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# (node.op, target, test): test(node, module) -> True when the call returns its input unchanged.
PASSTHROUGH_SPELLINGS: tuple[tuple[str, object, Callable], ...] = (
    ("call_module", nn.Identity, lambda node, module: True),  # timm's BatchNormAct2d drop = nn.Identity()
    *(("call_module", kind, lambda node, module: not module.training) for kind in _DROPOUTS),  # eval Dropout
    ("call_function", F.dropout, lambda node, module: reading.arg(node, 2, "training", True) is False),
    ("call_function", aten.dropout.default, lambda node, module: reading.arg(node, 2, "train") is False),
)


# -- BatchNorm spellings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BnSpelling:
    """One way a graph spells a BatchNorm."""

    name: str  # what the report calls the spelling: "BatchNorm2d", "F.batch_norm", "aten.batch_norm", ...
    op: str  # node.op
    target: object  # module type (matched exactly: a subclass may compute something else) or function
    read: Callable  # reading.*: (node, module or None) -> BnCall, or why it is a BN that cannot be quantized
    kind: str = "BatchNorm"  # the rule family: "BatchNorm" (modules), "BNReLU" (torch.ao's fused module), "F.batch_norm"
    dim: int | None = None  # the kernel dim the spelling fixes; None: the input's rank decides
    inner: Activation = NO_ACTIVATION  # an activation inside the spelling (BNReLU: ReLU)
    momentum_arg: int | None = None  # functional spellings: the position of momentum (the keyword is "momentum")
    named_by: object = None  # what prepare's skip= and a QConfigMapping's object types name it by (None: ``target``)

    @property
    def user_type(self) -> object:
        return self.target if self.named_by is None else self.named_by


def _module(name: str, target: type, dim: int | None, kind: str = "BatchNorm", inner: Activation = NO_ACTIVATION) -> BnSpelling:
    return BnSpelling(name, "call_module", target, reading.module_bn, kind, dim, inner)


def _int8(prefix: str, target: type) -> BnSpelling:
    return BnSpelling(f"{prefix}.{target.__name__}", "call_module", target, reading.already_int8)


BN_SPELLINGS: tuple[BnSpelling, ...] = (
    _module("BatchNorm1d", nn.BatchNorm1d, 1),  # self.bn(x), x (N, C[, L])
    _module("BatchNorm2d", nn.BatchNorm2d, 2),
    _module("BatchNorm3d", nn.BatchNorm3d, 3),
    _module("SyncBatchNorm", nn.SyncBatchNorm, None),  # what DDP training leaves; in eval a plain BN of any rank
    _module("BNReLU2d", nni.BNReLU2d, 2, "BNReLU", RELU),  # torch.ao's fused float BN+ReLU, its ReLU inside
    _module("BNReLU3d", nni.BNReLU3d, 3, "BNReLU", RELU),
    BnSpelling("F.batch_norm", "call_function", F.batch_norm, reading.f_batch_norm, "F.batch_norm", momentum_arg=6),  # timm
    BnSpelling(  # torch.export's eval BN; skip= and qconfig name it F.batch_norm
        "aten.batch_norm", "call_function", aten.batch_norm.default, reading.aten_batch_norm, "F.batch_norm", momentum_arg=6,
        named_by=F.batch_norm,
    ),
    BnSpelling(  # after torch.export's decompositions; read through its getitem 0
        "aten._native_batch_norm_legit_no_training", "call_function", aten._native_batch_norm_legit_no_training.default,
        reading.aten_legit, "F.batch_norm", momentum_arg=5, named_by=F.batch_norm,
    ),
    _int8("nnq", nnq.BatchNorm2d), _int8("nnq", nnq.BatchNorm3d), _int8("nniq", nniq.BNReLU2d), _int8("nniq", nniq.BNReLU3d),  # torch.ao's int8 BNs
)


def module_targets() -> frozenset[type]:
    """The module types of the table: the tracer keeps each as one call_module node."""
    return frozenset(s.target for s in BN_SPELLINGS if s.op == "call_module")


def spelling_of(op: str, target: object) -> BnSpelling | None:
    """The BN spelling of a call (``target``: a call_module's module type), or None when it is no BN."""
    for spelling in BN_SPELLINGS:
        if spelling.op == op and spelling.target is target:
            return spelling
    return None


# -- rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One quantizable pattern: a BN of ``kind`` and ``dim``, then ``activation`` (``prefused``: inside it)."""

    kind: str  # a BnSpelling.kind
    dim: int  # the kernel's spatial rank: 1, 2 or 3
    activation: Activation = NO_ACTIVATION
    prefused: bool = False  # the activation is inside the BN's spelling (torch.ao's BNReLU modules)

    def __post_init__(self) -> None:
        if self.dim not in RANKS:
            raise ValueError(f"rule ({self.kind!r}, {self.dim!r}): dim must be 1, 2 or 3")

    @property
    def name(self) -> str:
        """What the report calls it, e.g. ``BatchNorm2d+ReLU6``, ``F.batch_norm1d``, ``BNReLU2d``."""
        return f"{self.kind}{self.dim}d" + (f"+{self.activation.name}" if self.activation.name and not self.prefused else "")


def _rules(spellings: tuple[BnSpelling, ...], activations: tuple[Activation, ...]) -> tuple[Rule, ...]:
    """Every (kind, dim, activation) the quantizable spellings make: a spelling's dim (any, when the
    input's rank decides) with its inner activation, or with each activation when it has none."""
    rules: dict[tuple, Rule] = {}
    for s in spellings:
        if s.read is not reading.already_int8:
            for dim in [s.dim] if s.dim is not None else list(RANKS):
                for activation in (s.inner,) if s.inner.name else activations:
                    rules.setdefault((s.kind, dim, activation.name), Rule(s.kind, dim, activation, bool(s.inner.name)))
    return tuple(rules.values())


def derive_rules() -> tuple[Rule, ...]:
    """The rules of the tables as they are now (``RULES`` is derived once, at import)."""
    return _rules(BN_SPELLINGS, ACTIVATIONS)


RULES: tuple[Rule, ...] = derive_rules()


def find_rule(kind: str, dim: int, activation: Activation, rules: tuple[Rule, ...] | None = None) -> Rule | None:
    """The rule for (kind, dim, activation) in ``rules`` (default ``RULES``); None when none."""
    for rule in RULES if rules is None else rules:
        if (rule.kind, rule.dim, rule.activation) == (kind, dim, activation):
            return rule
    return None


# -- lookups ---------------------------------------------------------------------------------------

Modules = dict[str, nn.Module]


def _called(node: fx.Node, modules: Modules) -> tuple[object, nn.Module | None]:
    """(what a node calls, as the tables name it: a module's type or the target; the module or None)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return type(module), module
    return node.target, None


def bn_spelling(node: fx.Node, modules: Modules) -> BnSpelling | None:
    """The BN spelling ``node`` is, or None when it is no BN of the table."""
    target, _ = _called(node, modules)
    return spelling_of(node.op, target)


def read_bn(node: fx.Node, modules: Modules) -> reading.BnCall | str | None:
    """``node`` as a BN record, the reason it is a BN that cannot be quantized, or None if no BN."""
    spelling = bn_spelling(node, modules)
    return None if spelling is None else spelling.read(node, _called(node, modules)[1])


def activation_spellings() -> tuple[tuple[str, object], ...]:
    """(node.op, target) of every activation and constant clamp spelling."""
    return tuple(s for a in ACTIVATIONS for s in a.spellings) + tuple((op, target) for op, target, _ in CLAMP_SPELLINGS)


_INPLACE_OK = {"inplace", "input", "min_val", "max_val", "min", "max"}


def read_activation(node: fx.Node, modules: Modules) -> reading.ActivationCall | None:
    """``node`` as an activation on one tensor, or None when it is none (or not a constant clamp)."""
    target, module = _called(node, modules)
    x = reading.arg(node, 0, "input") if node.op != "call_method" else (node.args[0] if node.args else None)
    if not isinstance(x, fx.Node) or set(node.kwargs) - _INPLACE_OK:
        return None
    for activation in ACTIVATIONS:
        if any(node.op == op and (target is spelled or target == spelled) for op, spelled in activation.spellings):
            return reading.ActivationCall(node.name, x.name, activation.lo, activation.hi)
    for op, spelled, bounds in CLAMP_SPELLINGS:
        if node.op == op and (target is spelled or target == spelled):
            found = bounds(node, module)
            return None if found is None else reading.ActivationCall(node.name, x.name, *found)
    return None


def passthrough_input(node: fx.Node, modules: Modules) -> fx.Node | None:
    """The tensor ``node`` returns unchanged (Identity, eval Dropout, ...); None when it is no pass-through."""
    target, module = _called(node, modules)
    x = reading.arg(node, 0, "input")
    if not isinstance(x, fx.Node):
        return None
    for op, spelled, test in PASSTHROUGH_SPELLINGS:
        if node.op == op and target is spelled and test(node, module):
            return x
    return None
