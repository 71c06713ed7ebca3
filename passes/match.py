"""Matching: find every BatchNorm in a traced graph and decide, with a reason, what becomes of it.

A BatchNorm is a call of a BatchNorm module or of ``F.batch_norm``. Matching reads the graph
(and, for ranks and dtypes, the ``tensor_meta`` that shape propagation left on its nodes) and
never edits it.
"""

from __future__ import annotations

import inspect
import operator
import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxqbn.errors import FxqbnError
from fxqbn.qconfig import ActivationConfig

from .patterns import MODULE_TARGETS, RANK_TO_DIM, relu_input, rule_for
from .records import FunctionalBn, Match, Skip

__all__ = ["find_patterns", "source_of"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__))) + os.sep,)  # torch/
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)

SkipPredicate = Callable[[str, object], bool]  # (module name, module type or function) -> skip?


def source_of(node: fx.Node) -> str:
    """``file.py:123`` of the innermost user frame in the node's recorded stack trace, or ""."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [(path, line) for path, line in frames if not os.path.abspath(path).startswith(_LIBRARY_DIRS)]
    if not user:
        return ""
    path, line = user[-1]
    return f"{os.path.basename(path)}:{line}"


def _fused_relu(bn: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, str]:
    """The ReLU to fuse after ``bn`` (or None), and a note when a ReLU user is left unfused."""
    users = list(bn.users)
    relus = [u for u in users if relu_input(u, modules) is bn]
    if len(users) == 1 and relus:
        return relus[0], ""
    if relus:
        return None, f"ReLU not fused: the BN output has {len(users)} users"
    return None, ""


def _tensor_problem(statistic: torch.Tensor) -> str:
    """Why a BN whose statistics are ``statistic``'s dtype and device cannot be quantized; "" if it can."""
    if statistic.dtype != torch.float32 or statistic.device.type != "cpu":
        return (
            f"holds {statistic.dtype} statistics on {statistic.device.type}; the quantized kernel computes "
            "in float32 on the CPU: convert the model with model.float().cpu()"
        )
    return ""


def _rank(value: fx.Node) -> int | None:
    meta = value.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _functional_parts(node: fx.Node) -> tuple[FunctionalBn | None, str, str]:
    """(tensors, owner module name, reason it cannot be quantized or "") of an ``F.batch_norm`` node."""
    try:
        bound = _BATCH_NORM_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        return None, "", f"unsupported F.batch_norm call: {exc}"
    bound.apply_defaults()
    a = bound.arguments
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None, "", "unsupported F.batch_norm call: the input must be the first positional argument"

    def attr(value: object) -> str | None:
        return str(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else None

    mean, var = attr(a["running_mean"]), attr(a["running_var"])
    owner = (mean or "").rpartition(".")[0]
    if a["training"] is not False:
        return None, owner, "F.batch_norm with training=True (or not a constant) normalises with batch statistics"
    if mean is None or var is None:
        return None, owner, "F.batch_norm whose running statistics are not module buffers or parameters (get_attr)"
    for key in ("weight", "bias"):
        if a[key] is not None and attr(a[key]) is None:
            return None, owner, f"F.batch_norm whose {key} is not a module buffer or parameter (get_attr)"
    if not isinstance(a["eps"], (int, float)) or not (a["momentum"] is None or isinstance(a["momentum"], (int, float))):
        return None, owner, "F.batch_norm whose eps or momentum is not a constant"
    parts = FunctionalBn(
        running_mean=mean, running_var=var, weight=attr(a["weight"]), bias=attr(a["bias"]),
        eps=float(a["eps"]), momentum=a["momentum"],
    )
    return parts, owner, ""


class _Matcher:
    def __init__(self, root: nn.Module, config: ActivationConfig, skip: SkipPredicate, refuse_training: bool) -> None:
        self.root = root
        self.refuse_training = refuse_training
        self.config = config
        self.skip_requested = skip
        self.modules = dict(root.named_modules(remove_duplicate=False))

    def match(self, position: int, node: fx.Node) -> Match | Skip | None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in MODULE_TARGETS:
            return self._match_module(position, node, module)
        if node.op == "call_function" and node.target is F.batch_norm:
            return self._match_functional(position, node)
        return None

    def _skip(self, position: int, node: fx.Node, name: str, pattern: str, reason: str) -> Skip:
        return Skip(position=position, node=node.name, module=name, pattern=pattern, reason=reason, source=source_of(node))

    def _match_module(self, position: int, node: fx.Node, module: nn.Module) -> Match | Skip:
        name, kind = str(node.target), type(module)
        rule = rule_for(kind, relu=False) or rule_for(kind, relu=True)
        if rule is None:
            return self._skip(position, node, name, kind.__name__, f"no quantized rule for {kind.__name__}")
        bn = module[0] if rule.prefused else module
        component = type(bn) if rule.prefused else None  # torch.ao's fused BNReLU: its BatchNorm's type
        if self.skip_requested(name, kind) or (component is not None and self.skip_requested(name, component)):
            return self._skip(position, node, name, kind.__name__, "skipped on request (prepare's skip argument)")
        activation = self.config.spec_for(name, kind, first_component=component)
        if activation is None:
            return self._skip(position, node, name, kind.__name__, "excluded by qconfig (None for this module)")
        if bn.running_mean is None or bn.running_var is None:
            return self._skip(position, node, name, kind.__name__, "track_running_stats=False: normalises with batch statistics")
        if bn.training and self.refuse_training:
            raise FxqbnError(
                f"BatchNorm '{name}' is in training mode: calibrating it would overwrite its running "
                "statistics. Call model.eval() before fxqbn.prepare"
            )
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return self._skip(position, node, name, kind.__name__, "unsupported call: expected one positional tensor argument")
        problem = _tensor_problem(bn.running_mean)
        if problem:
            raise FxqbnError(f"BatchNorm '{name}' {problem}")
        return self._match(position, node, name, kind, activation)

    def _match_functional(self, position: int, node: fx.Node) -> Match | Skip:
        parts, owner, reason = _functional_parts(node)
        name = owner or node.name
        value = node.args[0] if node.args else node.kwargs.get("input")
        rank = _rank(value) if isinstance(value, fx.Node) else None
        dim = RANK_TO_DIM.get(rank) if rank is not None else None
        pattern = f"F.batch_norm{dim}d" if dim else "F.batch_norm"
        if parts is None:
            return self._skip(position, node, name, pattern, reason)
        if dim is None:
            return self._skip(position, node, name, pattern, f"input rank {rank} unknown or unsupported (2 to 5 dims)")
        if self.skip_requested(name, F.batch_norm):
            return self._skip(position, node, name, pattern, "skipped on request (prepare's skip argument)")
        activation = self.config.spec_for(name, F.batch_norm)
        if activation is None:
            return self._skip(position, node, name, pattern, "excluded by qconfig (None for this module)")
        problem = _tensor_problem(operator.attrgetter(parts.running_mean)(self.root))
        if problem:
            raise FxqbnError(f"F.batch_norm node '{node.name}' ({name}) {problem}")
        return self._match(position, node, name, F.batch_norm, activation, dim=dim, functional=parts, value=value)

    def _match(self, position, node, name, target, activation, dim=None, functional=None, value=None) -> Match:
        prefused = rule_for(target, relu=False, dim=dim) is None  # the ReLU is inside the module
        relu, note = (None, "") if prefused else _fused_relu(node, self.modules)
        rule = rule_for(target, relu=prefused or relu is not None, dim=dim)
        assert rule is not None  # every target has both forms in RULES
        return Match(
            rule=rule, position=position, bn_node=node.name, input_node=(value or node.args[0]).name,
            relu_node=relu.name if relu is not None else None, module=name, activation=activation,
            source=source_of(node), note=note, functional=functional,
        )


def find_patterns(
    graph: fx.Graph,
    root: nn.Module,
    config: ActivationConfig,
    skip: SkipPredicate = lambda name, kind: False,
    refuse_training: bool = True,
) -> tuple[list[Match], list[Skip]]:
    """Every BatchNorm call in ``graph`` (whose targets resolve in ``root``), in graph order:
    matched, or skipped with a reason. ``F.batch_norm`` nodes need ``tensor_meta`` on their input
    (``fxqbn.tracing.propagate_shapes``) for their rank.

    Raises FxqbnError for a matched BN that must not be calibrated (training mode, unless
    ``refuse_training`` is False: a graph someone else calibrated), whose statistics are not
    float32 on the CPU, or whose qconfig cannot drive a quantized BN.
    """
    matcher = _Matcher(root, config, skip, refuse_training)
    matches: list[Match] = []
    skips: list[Skip] = []
    for position, node in enumerate(graph.nodes):
        found = matcher.match(position, node)
        if found is not None:
            (matches if isinstance(found, Match) else skips).append(found)
    return matches, skips
