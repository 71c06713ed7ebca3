"""``fxqbn.lower``: int8 BatchNorms inside whole-model int8 graphs (torch.ao ``convert_fx``, torchao ``convert_pt2e``).

    q = convert_pt2e(prepare_pt2e(...))   # or convert_fx(prepare_fx(...))
    lowered = fxqbn.lower(q)             # float BNs between a dequantize and a quantize -> one int8 BN each,
    print(fxqbn.get_report(lowered))     # where the cost model (fxqbn.cost) says int8 costs less

No calibration: the qparams are the graph's. The steps: check the arguments, copy the graph module
(shape pass on ``example_inputs`` if given), match (``passes.find_patterns`` with the graph's kind),
choose each BN's kernel (``backend=`` forced, else ``fxqbn.cost``), then per backend the steps every
entry shares (``fxqbn.pipeline``): plan, build; then rewrite, install, report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from fxqbn.passes import Match, Plan, Skip, find_patterns, int8_kind, plan_patterns, rewrite_patterns
from fxqbn.passes.boundaries import GraphKind

from . import pipeline
from .backends import BACKENDS, Backend, backend_named
from .copying import graph_copy
from .cost import COST_MODEL, FLOAT, NATIVE, Choice, site_of
from .errors import FxqbnError
from .state import LOWERED_KEY, REPORT_KEY, attach, attached
from .tracing import propagate_shapes

__all__ = ["lower", "BN_CHOICES"]


BN_CHOICES = ("auto", "int8")  # lower(bn=...): the cost model per BN, or every BN int8


def _check(gm: object, backend: object, bn: object) -> tuple[GraphKind, Backend | None]:
    """(the graph's kind, the forced backend or None) for valid arguments; FxqbnError otherwise."""
    if not isinstance(gm, fx.GraphModule):
        raise FxqbnError(
            f"fxqbn.lower expects the GraphModule returned by torch.ao convert_fx or torchao convert_pt2e, "
            f"got {type(gm).__name__}"
        )
    if attached(gm, REPORT_KEY) is not None:
        raise FxqbnError("this model was already converted or lowered by fxqbn: lower the torch.ao / PT2E result itself")
    if bn not in BN_CHOICES:
        raise FxqbnError(f"unknown bn={bn!r}: 'auto' (the cost model keeps a BN float where int8 costs more) or 'int8' (every BN int8)")
    chosen = None if backend is None else backend_named(backend)
    return int8_kind(gm.graph), chosen


def _choices(out: fx.GraphModule, matches: Sequence[Match], forced: Backend | None, bn: str) -> dict[str, Choice]:
    """BN node -> its kernel and why: forced by ``backend=``, else the cost model (``bn='int8'``: its int8 kernel)."""
    if forced is not None:
        return {m.bn_node: Choice(forced.name, f"int8 {forced.name} kernel: backend={forced.name!r} forces int8") for m in matches}
    nodes = {node.name: node for node in out.graph.nodes}
    return {m.bn_node: COST_MODEL.choose(site_of(nodes, out, m), int8=bn == "int8") for m in matches}


def _kept_float(m: Match, choice: Choice) -> Skip:
    return Skip(position=m.position, node=m.bn_node, module=m.module, pattern=m.bn.spelling, source=m.source, reason=choice.reason)


def _with_reason(plan: Plan, reason: str) -> Plan:
    """``plan`` whose report row says why its kernel was chosen (after any note of the match)."""
    m = plan.match
    return replace(plan, match=replace(m, note="; ".join(filter(None, (m.note, reason)))))


def _build(out: fx.GraphModule, matches: Sequence[Match], choices: dict[str, Choice]) -> tuple[list[Plan], list[nn.Module], list[Skip]]:
    """The plans and modules of the matches chosen int8, per backend (in graph order), and the skips."""
    built: list[tuple[Plan, nn.Module]] = []
    skips = [_kept_float(m, choices[m.bn_node]) for m in matches if choices[m.bn_node].kernel == FLOAT]
    for name, backend in BACKENDS.items():
        group = [m for m in matches if choices[m.bn_node].kernel == name]
        plans, refused = pipeline.refuse_unbuildable(plan_patterns(group, {}, backend), backend)
        plans = [_with_reason(p, choices[p.match.bn_node].reason) for p in plans]
        built += zip(plans, pipeline.build_modules(out, plans, backend))
        skips += refused
    built.sort(key=lambda pm: pm[0].match.position)
    return [p for p, _ in built], [m for _, m in built], skips


def lower(gm: fx.GraphModule, backend: str | None = None, bn: str = "auto", example_inputs: Any = None) -> fx.GraphModule:
    """Replace the float BN patterns of a whole-model int8 graph that sit between a dequantize and a
    per-tensor quantize (BN, any spelling and dim, then Identity / eval Dropout, then ReLU, ReLU6 or a
    constant clamp) by one int8 BN that reads the int8 value and produces the quantize's codes, where
    that costs less than the float BN (docs/lower.md: the cost model).

    Args:
        gm: a GraphModule returned by torch.ao ``convert_fx`` or torchao ``convert_pt2e``. Never changed.
        backend: ``None``: per BN, the cost model (``fxqbn.cost``) picks the fused kernel, the native
            one or keeps the float BN; ``"native"`` / ``"fused"``: that kernel for every BN (forced int8;
            the module converts at its edges when the kernel works on the other kind of tensor).
        bn: ``"auto"`` (the cost model may keep a BN float) or ``"int8"``: every BN int8, on the cost
            model's kernel (integer-only targets).
        example_inputs: optional inputs of ``gm`` (a tuple); run once on a copy so the cost model sees
            each BN's input shape and layout (torch.ao graphs record none).

    Returns:
        A new GraphModule; ``fxqbn.get_report`` lists every BN: lowered (the reason names the kernel
        and why), or skipped with the reason.
    """
    start = time.perf_counter()
    kind, forced = _check(gm, backend, bn)
    out = graph_copy(gm)
    if example_inputs is not None:
        propagate_shapes(out, out.graph, (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs))
    matches, skips = find_patterns(out.graph, out, kind)
    choices = _choices(out, matches, forced, bn)
    plans, modules, kept = _build(out, matches, choices)
    read_before = [str(n.target) for n in out.graph.nodes if n.op == "get_attr"]
    graph, converted, new = rewrite_patterns(out.graph, out, plans, modules, forced or BACKENDS[NATIVE])
    converted = replace(converted, rewrites=tuple(replace(rw, backend=choices[rw.match.bn_node].kernel) for rw in converted.rewrites))
    pipeline.install(out, graph, new)
    pipeline.drop_unread_attributes(out, read_before)
    attach(out, REPORT_KEY, pipeline.report(converted, skips + kept, start, lowered_into=kind.name))
    attach(out, LOWERED_KEY, tuple(p.match for p in plans))
    return out
