"""The steps every entry shares once its patterns are matched (``fxqbn.convert``, ``fxqbn.lower``,
``fxqbn.load``): read the qparams, plan, build the int8 modules, rewrite, install, report.

    patterns (passes.Match, each with its Boundary)
      -> read_observers (observed graphs) -> passes.plan_patterns -> refuse_unbuildable
      -> build_modules (the backend's) -> passes.rewrite_patterns -> install -> report

``fxqbn.convert`` given held-out inputs measures each planned pattern's sensitivity (``probes``,
``fxqbn.sensitivity``) between building and rewriting; with ``keep_float_below``, ``keep_float``
turns the patterns under it into skips and the kept ones are planned and built again.

Only the entries differ in how they find the patterns (``passes.find_patterns`` with their graph's
``GraphKind``) and in what they check first.
"""

from __future__ import annotations

import operator
import time
from dataclasses import replace
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import fx, nn

from fxqbn.passes import CODES, FLOAT, QUANTIZED, Converted, Dropped, Folded, Match, Plan, Rewrite, Skip, observer_users

from .backends import BACKENDS, Backend, BnTensors
from .errors import FxqbnError
from .lowered import ByRank, LoweredBatchNorm
from .nn import own_many
from .qparams import Observation, read_many
from .report import Report, ReportRow, ReportSummary, folded_row, skipped_row
from .sensitivity import Probe, alone
from .tracing import set_training_flags

__all__ = ["read_observers", "refuse_unbuildable", "build_modules", "probes", "keep_float", "released_observers", "install",
           "drop_unread_attributes", "report", "measured"]


def read_observers(gm: fx.GraphModule, patterns: Sequence[Match]) -> dict[str, Observation]:
    """The Observation (qparams, range) of every observer node the patterns use, each read once.

    Raises FxqbnError listing the BN modules whose observers never saw data, or naming the
    observer whose qparams the kernel cannot take.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    users = observer_users(patterns)
    readings = read_many({name: gm.get_submodule(str(nodes[name].target)) for name in users})
    idle = [name for name, reading in readings.items() if reading is None]
    if idle:
        modules = sorted({module for name in idle for module in users[name]})
        raise FxqbnError(
            f"observers never saw data for BatchNorm {', '.join(repr(m) for m in modules)}: run calibration "
            "batches through the prepared model (in eval mode, under torch.no_grad()) before fxqbn.convert"
        )
    for name, reading in readings.items():
        if isinstance(reading, FxqbnError):
            raise FxqbnError(
                f"observer '{name}' (for BatchNorm {', '.join(repr(m) for m in users[name])}): {reading}. "
                "Check the calibration data for NaN or infinite values"
            )
    return readings  # type: ignore[return-value]


def refuse_unbuildable(plans: Sequence[Plan], backend: Backend) -> tuple[list[Plan], list[Skip]]:
    """The plans ``backend`` can build; the others as skips with the reason (a kernel on plain codes
    needs the input qparams when it is built; a torch.ao graph may show them only on the tensor)."""
    kept, skips = [], []
    fallback = next(name for name, b in BACKENDS.items() if b.consumes == QUANTIZED)
    for plan in plans:
        m = plan.match
        if backend.consumes == CODES and plan.input is None:
            skips.append(Skip(
                position=m.position, node=m.bn_node, module=m.module, pattern=m.bn.spelling, source=m.source,
                reason=f"the graph does not show the qparams of its input {m.boundary.input}'s value, which the "
                       f"{backend.name} kernel needs at build time: use backend={fallback!r}, which reads them off the tensor",
            ))
        else:
            kept.append(plan)
    return kept, skips


def bn_tensors(root: nn.Module, match: Match) -> BnTensors:
    """The BN's tensors, from the attribute targets its record names; an observed BN module's eps and
    momentum as they are now (not as at prepare), an int8 graph's as the graph holds them."""
    b = match.bn
    mean, var = operator.attrgetter(b.running_mean)(root), operator.attrgetter(b.running_var)(root)
    weight = None if b.weight is None else operator.attrgetter(b.weight)(root)
    bias = None if b.bias is None else operator.attrgetter(b.bias)(root)
    if b.module is None or match.rule is None:
        return BnTensors(mean, var, weight, bias, b.eps, match.momentum)
    module = root.get_submodule(b.module)
    return BnTensors(mean, var, weight, bias, module.eps, module.momentum)


def _module(plan: Plan, tensors: BnTensors, backend: Backend) -> nn.Module:
    """The int8 BN of one plan: the backend's kernel (one per dim when the rank is known only at run
    time), wrapped when the graph's edges hold the other kind of int8 tensor, or quantized tensors."""
    m, qout = plan.match, plan.output.qparams
    qin = plan.input.qparams if plan.input is not None else qout
    dims = (m.dim,) if m.dim is not None else (1, 2, 3)
    kernels = {d: backend.build(d, plan.relu, tensors, qin, qout, plan.clamp, m.bn.owner or m.bn_node) for d in dims}
    module = kernels[m.dim] if m.dim is not None else ByRank(kernels)
    holds = m.boundary.holds
    if holds == FLOAT or holds == backend.consumes == CODES:
        return module  # observed graphs: the backend's own boundaries surround it; codes in and out
    return LoweredBatchNorm(module, backend.consumes, holds, None if plan.input is None else plan.input.qparams, qout)


def build_modules(root: nn.Module, plans: Sequence[Plan], backend: Backend) -> list[nn.Module]:
    """Every plan's int8 module, the statistics of all checked (at once) before any is built."""
    tensors = [bn_tensors(root, p.match) for p in plans]
    owned = own_many([(p.match.module, t) for p, t in zip(plans, tensors)])  # checked float32 copies
    return [
        _module(p, BnTensors(mean, var, weight, bias, t.eps, t.momentum), backend)
        for p, t, (mean, var, weight, bias) in zip(plans, tensors, owned)
    ]


def probes(plans: Sequence[Plan], modules: Sequence[nn.Module], backend: Backend) -> list[Probe]:
    """Each planned pattern of an observed graph as a ``Probe``: its module between its own boundaries."""
    return [
        Probe(p.match.bn_node, p.match.input_node, p.match.output_node,
              alone(backend.quantize(p.input.qparams), module, backend.dequantize(p.output.qparams)))
        for p, module in zip(plans, modules, strict=True)
    ]


def kept_float_reason(sensitivity: float, threshold: float) -> str:
    return f"kept float: sensitivity {sensitivity:.1f} dB < keep_float_below={threshold:g} dB"


def keep_float(patterns: Sequence[Match], sensitivity: Mapping[str, float], threshold: float) -> tuple[list[Match], list[Skip]]:
    """The patterns whose sensitivity (BN node -> dB) is at least ``threshold``; the others as skips saying so."""
    kept, skips = [], []
    for m in patterns:
        if sensitivity[m.bn_node] < threshold:
            reason = kept_float_reason(sensitivity[m.bn_node], threshold)
            skips.append(Skip(position=m.position, node=m.bn_node, module=m.module, pattern=m.pattern, reason=reason, source=m.source))
        else:
            kept.append(m)
    return kept, skips


def released_observers(patterns: Sequence[Match], kept: Sequence[Match]) -> list[Dropped]:
    """The observers of ``patterns`` that no ``kept`` pattern reads (rewriting removes them, as torch.ao's
    observers outside any pattern); none is reported, their patterns' skips are."""
    used = observer_users(kept)
    names = dict.fromkeys(n for m in patterns for n in (m.boundary.input, m.boundary.output) if n not in used)
    return [Dropped(name, "a BatchNorm pattern kept float") for name in names]


def install(gm: fx.GraphModule, graph: fx.Graph, new_modules: Mapping[str, nn.Module]) -> fx.GraphModule:
    """``gm`` running ``graph``, with ``new_modules`` added at their targets (each taking the training
    flag of the module it replaces) and the submodules nothing calls any more removed."""
    set_training_flags(new_modules, gm)
    for target, module in new_modules.items():
        gm.add_submodule(target, module)
    gm.graph = graph  # generates its code
    gm.delete_all_unused_submodules()
    return gm


def drop_unread_attributes(gm: fx.GraphModule, before: Iterable[str]) -> None:
    """Delete the attributes among ``before`` (get_attr targets of the old graph) that no node of ``gm``'s
    graph reads any more, directly or through a module it calls."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for target in dict.fromkeys(before):
        parent, _, leaf = target.rpartition(".")
        owners = {".".join(target.split(".")[:k]) for k in range(1, target.count(".") + 1)}
        if target in read or owners & called:
            continue
        try:
            owner = gm.get_submodule(parent)
        except AttributeError:  # its module went with it (GraphModule.delete_all_unused_submodules)
            continue
        if hasattr(owner, leaf):
            delattr(owner, leaf)


def _row(rewrite: Rewrite) -> ReportRow:
    plan, m = rewrite.plan, rewrite.match
    qin, qout = plan.input, plan.output
    return ReportRow(
        node=m.bn_node, module=m.module, pattern=m.pattern, op=plan.op, status="rewritten", reason=m.note, source=m.source,
        dtype=str(qout.qparams.dtype).removeprefix("torch."), observer=qout.observer,
        input_scale=qin.qparams.scale if qin else None, input_zero_point=qin.qparams.zero_point if qin else None,
        input_min=qin.min_val if qin else None, input_max=qin.max_val if qin else None,
        output_scale=qout.qparams.scale, output_zero_point=qout.qparams.zero_point,
        output_min=qout.min_val, output_max=qout.max_val,
    )


def report(
    converted: Converted, skips: Sequence[Skip], start: float, dropped: Sequence[Dropped] = (), lowered_into: str = "",
    folded: Sequence[Folded] = (),
) -> Report:
    """Every BN's row in graph order (rewritten, folded, skipped), the totals, and the observers removed without a pattern."""
    quantize, dequantize = converted.boundary_counts()
    summary = ReportSummary(
        rewritten=len(converted.rewrites), skipped=len(skips), quantize_nodes=quantize, dequantize_nodes=dequantize,
        convert_seconds=time.perf_counter() - start, lowered_into=lowered_into, folded=len(folded),
    )
    rows: list[tuple[int, Any]] = [(rw.match.position, _row(rw)) for rw in converted.rewrites]
    rows += [(skip.position, skipped_row(skip)) for skip in skips]
    rows += [(f.position, folded_row(f.node, f.module, f.pattern, f.into, f.source)) for f in folded]
    notes = tuple(f"{d.observer} on {d.observed}: not part of a BN pattern; removed, left float" for d in dropped)
    return Report(rows=tuple(row for _, row in sorted(rows, key=lambda item: item[0])), summary=summary, dropped=notes)


def measured(report: Report, sensitivity: Mapping[str, float], model_sqnr: float, threshold: float | None, kept: int) -> Report:
    """``report`` with what held-out inputs measured: each pattern's sensitivity, the model's output SQNR, and
    the ``keep_float_below`` threshold with the number of patterns it kept float."""
    summary = replace(report.summary, model_sqnr_db=model_sqnr, keep_float_below=threshold, kept_float=kept)
    return replace(report.with_sensitivity(dict(sensitivity)), summary=summary)
