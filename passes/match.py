"""Matching: find every BatchNorm in a traced graph and decide, with a reason, what becomes of it.

Matching reads the graph and never edits it.
"""

from __future__ import annotations

import os
import re

from torch import fx, nn

from fxqbn.errors import FxqbnError
from fxqbn.qconfig import ActivationConfig

from .patterns import relu_input, rule_for
from .records import Match, Skip

__all__ = ["find_patterns", "source_of"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.dirname(os.path.abspath(module.__file__))) + os.sep for module in (fx, nn)
)  # torch/


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


def _match_one(
    position: int, node: fx.Node, module: nn.Module, modules: dict[str, nn.Module], config: ActivationConfig
) -> Match | Skip:
    name = str(node.target)
    kind = type(module).__name__

    source = source_of(node)

    def skip(reason: str) -> Skip:
        return Skip(position=position, node=node.name, module=name, pattern=kind, reason=reason, source=source)

    if rule_for(type(module), relu=False) is None:
        return skip(f"no quantized rule for {kind}")
    activation = config.spec_for(name, module)
    if activation is None:
        return skip("excluded by qconfig (None for this module)")
    if module.running_mean is None or module.running_var is None:
        return skip("track_running_stats=False: normalises with batch statistics")
    if module.training:
        raise FxqbnError(
            f"BatchNorm '{name}' is in training mode: calibrating it would overwrite its running "
            "statistics. Call model.eval() before fxqbn.prepare"
        )
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return skip("unsupported call: expected one positional tensor argument")
    relu, note = _fused_relu(node, modules)
    rule = rule_for(type(module), relu=relu is not None)
    assert rule is not None  # every BN type has both forms in RULES
    return Match(
        rule=rule,
        position=position,
        bn_node=node.name,
        relu_node=relu.name if relu is not None else None,
        module=name,
        activation=activation,
        source=source,
        note=note,
    )


def find_patterns(gm: fx.GraphModule, config: ActivationConfig) -> tuple[list[Match], list[Skip]]:
    """Every BatchNorm module call in ``gm``, in graph order: matched, or skipped with a reason.

    Raises FxqbnError for a BN that must not be calibrated (training mode) or whose qconfig
    cannot drive a quantized BN.
    """
    modules = dict(gm.named_modules())
    matches: list[Match] = []
    skips: list[Skip] = []
    for position, node in enumerate(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        found = _match_one(position, node, module, modules, config)
        (matches if isinstance(found, Match) else skips).append(found)
    return matches, skips
