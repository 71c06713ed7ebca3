"""Matching: find every BatchNorm in a traced graph and decide, with a reason, what becomes of it.

A BatchNorm is any spelling ``passes.spellings`` reads (a BatchNorm module, SyncBatchNorm,
torch.ao's fused BNReLU, ``F.batch_norm``, the ATen forms), normalised into one ``BnCall``; the
activation after it (through Identity / eval Dropout) is read as its float clamp. Matching reads the
graph (and, for ranks, the ``tensor_meta`` that shape propagation left on its nodes) and never edits it.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable

import torch.nn.functional as F
from torch import fx, nn

from fxqbn.errors import FxqbnError
from fxqbn.qconfig import ActivationConfig

from . import patterns
from .graph_facts import rank as _rank
from .graph_facts import tensor_problem as _tensor_problem
from .patterns import MODULE_KINDS, NO_ACTIVATION, RANK_TO_DIM, Activation, activation_for
from .records import Match, Skip
from .spellings import MOMENTUM_ARG, BnCall, activation_name, passthrough_input, read_activation, read_bn

__all__ = ["find_patterns", "source_of", "needs_shapes"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__))) + os.sep,)  # torch/

SkipPredicate = Callable[[str, object], bool]  # (module name, module type or function) -> skip?


def source_of(node: fx.Node) -> str:
    """``file.py:123`` of the innermost user frame in the node's recorded stack trace, or ""."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [(path, line) for path, line in frames if not os.path.abspath(path).startswith(_LIBRARY_DIRS)]
    if not user:
        return ""
    path, line = user[-1]
    return f"{os.path.basename(path)}:{line}"


def _bn_module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The BatchNorm-like module ``node`` calls (any _BatchNorm, torch.ao's fused BNReLU); None otherwise."""
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    return module if isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in MODULE_KINDS else None


def needs_shapes(graph: fx.Graph, root: nn.Module) -> bool:
    """Whether some BN's kernel dim depends on its input's rank (F.batch_norm, SyncBatchNorm, ATen forms)."""
    modules = dict(root.named_modules(remove_duplicate=False))
    for node in graph.nodes:
        module = _bn_module(node, modules)
        if module is not None and MODULE_KINDS.get(type(module), ("", 0))[1] is None:
            return True
        if module is None and node.op == "call_function" and isinstance(read_bn(node, modules), BnCall):
            return True
    return False


class _Chain:
    """What follows a BN output: the nodes to fuse (pass-throughs, then the activation) and its Activation."""

    def __init__(self, nodes: tuple[str, ...] = (), activation: Activation = NO_ACTIVATION, note: str = "") -> None:
        self.nodes, self.activation, self.note = nodes, activation, note


def _activation_chain(output: fx.Node, modules: dict[str, nn.Module]) -> _Chain:
    """The activation to fuse after ``output`` (through pass-throughs, each the only user of the
    value before it), or none, with a note when an activation is left unfused."""
    value, passed = output, []
    while True:
        users = list(value.users)
        calls = [read_activation(u, modules) for u in users]
        found = [c for c in calls if c is not None and c.input == value.name]
        if len(users) != 1:
            if not found:
                return _Chain()
            what = activation_name(found[0].lo, found[0].hi)
            return _Chain(note=f"{what} not fused: the BN output has {len(users)} users")
        if passthrough_input(users[0], modules) is value:
            passed.append(users[0].name)
            value = users[0]
            continue
        if not found:
            return _Chain()
        activation = activation_for(found[0].lo, found[0].hi)
        if activation is None:
            return _Chain(note=f"{activation_name(found[0].lo, found[0].hi)} not fused: no rule has that activation")
        return _Chain((*passed, users[0].name), activation)


class _Matcher:
    def __init__(self, root: nn.Module, config: ActivationConfig, skip: SkipPredicate, refuse_training: bool) -> None:
        self.root = root
        self.refuse_training = refuse_training
        self.config = config
        self.skip_requested = skip
        self.modules = dict(root.named_modules(remove_duplicate=False))

    def match(self, position: int, node: fx.Node) -> Match | Skip | None:
        module = _bn_module(node, self.modules)
        if module is not None:
            return self._match_module(position, node, module)
        if node.op == "call_function":
            call = read_bn(node, self.modules)
            if call is not None:
                return self._match_functional(position, node, call)
        return None

    def hidden(self, position: int, node: fx.Node) -> list[Skip]:
        """The BNs inside a module the tracer kept as one node (e.g. a block timm declares
        untraceable): skipped, as nothing of the graph reaches them."""
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        if module is None or _bn_module(node, self.modules) is not None:
            return []
        where = f"inside {type(module).__name__} '{node.target}', which the tracer keeps as one call (a leaf module)"
        inside = sorted((name, type(bn).__name__) for name, bn in module.named_modules() if name and isinstance(bn, nn.modules.batchnorm._BatchNorm))
        return [self._skip(position, node, f"{node.target}.{name}", kind, f"{where}: kept float") for name, kind in inside]

    def _skip(self, position: int, node: fx.Node, name: str, pattern: str, reason: str) -> Skip:
        return Skip(position=position, node=node.name, module=name, pattern=pattern, reason=reason, source=source_of(node))

    def _refuse_training_mode(self, name: str, bn: nn.Module) -> None:
        if not bn.training:
            return
        if self.refuse_training:
            raise FxqbnError(
                f"BatchNorm '{name}' is in training mode: calibrating it would overwrite its running "
                "statistics. Call model.eval() before fxqbn.prepare"
            )
        raise FxqbnError(f"BatchNorm '{name}' is in training mode: call .eval() on the observed model before fxqbn.convert")

    def _match_module(self, position: int, node: fx.Node, module: nn.Module) -> Match | Skip:
        name, kind = str(node.target), type(module)
        if kind not in MODULE_KINDS:
            return self._skip(position, node, name, kind.__name__, f"no quantized rule for {kind.__name__}")
        bn = module[0] if MODULE_KINDS[kind][0] == "BNReLU" else module
        component = type(bn) if bn is not module else None  # torch.ao's fused BNReLU: its BatchNorm's type
        if self.skip_requested(name, kind) or (component is not None and self.skip_requested(name, component)):
            return self._skip(position, node, name, kind.__name__, "skipped on request (prepare's skip argument)")
        activation = self.config.spec_for(name, kind, first_component=component)
        if activation is None:
            return self._skip(position, node, name, kind.__name__, "excluded by qconfig (None for this module)")
        if bn.running_mean is None or bn.running_var is None:
            return self._skip(position, node, name, kind.__name__, "track_running_stats=False: normalises with batch statistics")
        self._refuse_training_mode(name, bn)
        call = read_bn(node, self.modules)
        if not isinstance(call, BnCall):
            return self._skip(position, node, name, kind.__name__, str(call))
        self._check_tensors(f"BatchNorm '{name}'", call, name)
        return self._match(position, node, call, MODULE_KINDS[kind], kind.__name__, activation, bn.momentum)

    def _match_functional(self, position: int, node: fx.Node, call: BnCall | str) -> Match | Skip:
        value = node.args[0] if node.args else node.kwargs.get("input")
        rank = _rank(value) if isinstance(value, fx.Node) else None
        dim = RANK_TO_DIM.get(rank) if rank is not None else None
        pattern = f"F.batch_norm{dim}d" if dim else "F.batch_norm"
        if isinstance(call, str):
            owner = _statistics_owner(node)
            return self._skip(position, node, owner or node.name, pattern, call)
        name = call.owner or node.name
        if self.skip_requested(name, F.batch_norm):
            return self._skip(position, node, name, pattern, "skipped on request (prepare's skip argument)")
        activation = self.config.spec_for(name, F.batch_norm)
        if activation is None:
            return self._skip(position, node, name, pattern, "excluded by qconfig (None for this module)")
        self._check_tensors(f"F.batch_norm node '{node.name}' ({name})", call, name)
        at = MOMENTUM_ARG[call.spelling]
        momentum = node.args[at] if len(node.args) > at else node.kwargs.get("momentum", 0.1)
        momentum = float(momentum) if isinstance(momentum, (int, float)) else None
        return self._match(position, node, call, ("F.batch_norm", None), pattern, activation, momentum)

    def _check_tensors(self, who: str, call: BnCall, name: str) -> None:
        """Refuse statistics the kernel cannot take (dtype, device), naming ``who``; their values are
        checked by ``prepare`` for the matches (a BN torch.ao left unobserved is not refused)."""
        problem = _tensor_problem(operator.attrgetter(call.running_mean)(self.root))
        if problem:
            raise FxqbnError(f"{who} {problem}")

    def _match(self, position, node, call, kind_dim, pattern, activation, momentum) -> Match | Skip:
        kind, dim = kind_dim
        rank = _rank(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if dim is None:
            dim = RANK_TO_DIM.get(rank) if rank is not None else None
            if dim is None:
                return self._skip(position, node, call.owner or node.name, pattern, f"input rank {rank} unknown or unsupported (2 to 5 dims)")
        chain = _Chain(activation=patterns.RELU) if kind == "BNReLU" else _activation_chain(self._node(call.output, node), self.modules)
        rule = patterns.find_rule(kind, dim, chain.activation)
        note = chain.note
        if rule is None and chain.activation != NO_ACTIVATION and kind != "BNReLU":
            note = f"{chain.activation.name} not fused: no rule for {kind} {dim}d + {chain.activation.name}"
            chain, rule = _Chain(), patterns.find_rule(kind, dim, NO_ACTIVATION)
        if rule is None:
            return self._skip(position, node, call.owner or node.name, pattern, f"no quantized rule for {pattern} ({dim}d)")
        return Match(
            rule=rule, position=position, bn=call, chain=chain.nodes, module=call.owner or node.name,
            activation=activation, momentum=momentum, source=source_of(node), note=note,
        )

    @staticmethod
    def _node(name: str, near: fx.Node) -> fx.Node:
        """The node called ``name`` in ``near``'s graph (the BN itself, or its getitem 0)."""
        if near.name == name:
            return near
        return next(user for user in near.users if user.name == name)


def _statistics_owner(node: fx.Node) -> str:
    """The module owning a functional BN's running mean (its get_attr's parent), or ""."""
    for arg in node.all_input_nodes:
        if arg.op == "get_attr" and str(arg.target).endswith("running_mean"):
            return str(arg.target).rpartition(".")[0]
    return ""


def find_patterns(
    graph: fx.Graph,
    root: nn.Module,
    config: ActivationConfig,
    skip: SkipPredicate = lambda name, kind: False,
    refuse_training: bool = True,
) -> tuple[list[Match], list[Skip]]:
    """Every BatchNorm call in ``graph`` (whose targets resolve in ``root``), in graph order:
    matched, or skipped with a reason. A BN whose dim the input's rank decides (``F.batch_norm``,
    SyncBatchNorm) needs ``tensor_meta`` on its input (``fxqbn.tracing.propagate_shapes``).

    Raises FxqbnError for a matched BN that must not be calibrated (training mode; with
    ``refuse_training`` False, for a graph someone else calibrated, the message says to call
    .eval() before convert), whose statistics are not float32 on the CPU, or whose qconfig cannot
    drive a quantized BN.
    """
    matcher = _Matcher(root, config, skip, refuse_training)
    matches: list[Match] = []
    skips: list[Skip] = []
    for position, node in enumerate(graph.nodes):
        found = matcher.match(position, node)
        if found is not None:
            (matches if isinstance(found, Match) else skips).append(found)
        else:
            skips.extend(matcher.hidden(position, node))
    return matches, skips
